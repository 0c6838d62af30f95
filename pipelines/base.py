"""What every image generator in `pipelines/` looks like to the jobs and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Request:
    """One image to generate. Class-conditional models read `class_label`, text-to-image models `prompt`."""

    id: str
    seed: int
    class_label: int | None = None
    prompt: str | None = None


@dataclass
class GenerationResult:
    images: np.ndarray  # uint8 (B, H, W, C), C = 1 or 3
    # The sampler's final output before decoding to pixels (latents for latent models, pixels in [-1, 1] for
    # pixel-space ones). Fidelity metrics such as the relative error against an uncached run are taken on it.
    final: torch.Tensor
    seconds: float  # wall time of the whole batch, decoding included
    denoise_seconds: float  # wall time of the denoising loop alone
    extras: dict = field(default_factory=dict)


class Generator(Protocol):
    architecture: str  # "dit" or "flux"
    model_id: str
    transformer: torch.nn.Module
    device: torch.device
    num_inference_steps: int

    def signature(self): ...  # -> invardiff.plan.PipelineSignature

    def generate(self, requests: Sequence[Request]) -> GenerationResult: ...


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C)."""
    x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
