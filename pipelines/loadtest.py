"""The load-test model: a constant-cost stand-in for a generator, to measure the job's own capacity.

`--model loadtest` runs the whole generation job (manifest -> Ray Data actors -> run_batch -> Parquet) with
the model replaced by something that costs a fixed time per batch, 0 s unless asked: whatever rate the job
reaches then is the orchestration's ceiling (benchmarks/pipeline_capacity.py), the rate no GPU pool behind it
can exceed. It is never a default and its images mean nothing.

    loadtest            no model cost at all
    loadtest:0.05       each batch takes 50 ms, spent asleep as an actor waiting on its GPU would be

What it keeps from a real model: the embedded digits model's output (16x16 grayscale PNGs, built from a
seeded 8x8 pattern as the digits model's images are smooth 8x8 digits upscaled, so the PNGs are of a similar
size), the same output columns, and per-row determinism (one seed, one image, whatever the batch). It stands
in for a class-conditional model of 1000 classes, DiT-XL/2's ImageNet labels, so `--classes 0-999` manifests
run. The `transformer` is a random-init DiT of the digits model's shape that is never called: it is there so
that cache policies attach and count as they do on a real model (0 steps computed: none were).
"""

from __future__ import annotations

import hashlib
import time
from typing import Sequence

import numpy as np
import torch

from pipelines import digits
from pipelines.base import GenerationResult, Request

NAME = "loadtest"
NUM_CLASSES = 1000
_PATTERN = 8  # side of the seeded pattern each image is upscaled from


def is_loadtest(model: str) -> bool:
    return model == NAME or model.startswith(NAME + ":")


def batch_seconds(model: str) -> float:
    """The per-batch cost a `loadtest[:SECONDS]` spec asks for."""
    if model == NAME:
        return 0.0
    text = model.removeprefix(NAME + ":")
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"--model {model}: expected 'loadtest' or 'loadtest:SECONDS_PER_BATCH', e.g. loadtest:0.05") \
            from None
    if not 0.0 <= seconds < 3600.0:
        raise ValueError(f"--model {model}: seconds per batch must be in [0, 3600), got {text}")
    return seconds


def loadtest_images(seeds: Sequence[int], size: int = digits.IMAGE_SIZE) -> np.ndarray:
    """uint8 (B, size, size, 1): each row a seeded 8x8 pattern, upscaled by pixel repetition.

    The pattern is a hash (splitmix64) of (seed, pixel), computed for the whole batch at once: a seeded
    generator per row would cost more than the rest of the stand-in."""
    scale = size // _PATTERN
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 1).view(np.uint64)
    keys = seeds * np.uint64(_PATTERN * _PATTERN) + np.arange(_PATTERN * _PATTERN, dtype=np.uint64)
    patterns = (_splitmix64(keys) >> np.uint64(56)).astype(np.uint8).reshape(-1, _PATTERN, _PATTERN)
    return patterns.repeat(scale, axis=1).repeat(scale, axis=2)[..., None]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class LoadTestGenerator:
    architecture = "dit"

    def __init__(self, *, seconds_per_batch: float = 0.0, num_inference_steps: int = 50, model_id: str = NAME,
                 device: str = "cpu"):
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)  # the stand-in transformer is never called, but its fingerprint should not vary
        self.transformer = DiTTransformer2DModel(**{**digits.TRANSFORMER_CONFIG, "num_embeds_ada_norm": NUM_CLASSES})
        self.transformer.eval()
        self.seconds_per_batch = seconds_per_batch
        self.num_inference_steps = num_inference_steps
        self.model_id = model_id
        self.device = torch.device(device)
        self.height = self.width = digits.IMAGE_SIZE
        # Names what the images are made by, so a plan or an output made for a real model is never mistaken
        # for this one's.
        self.fingerprint = "sha256:" + hashlib.sha256(
            f"{NAME} {_PATTERN}->{digits.IMAGE_SIZE} {NUM_CLASSES} classes".encode()
        ).hexdigest()

    def signature(self):
        from invardiff.adapters import get_adapter
        from invardiff.plan import PipelineSignature

        return PipelineSignature(
            architecture=self.architecture,
            model_id=self.model_id,
            model_fingerprint=self.fingerprint,
            scheduler="LoadTest",
            num_inference_steps=self.num_inference_steps,
            height=self.height,
            width=self.width,
            guidance_mode="none",
            guidance_scale=1.0,
            dtype="float32",
            layers=get_adapter(self.transformer).layers(self.transformer),
        )

    def check_requests(self, requests: Sequence[Request]) -> None:
        for r in requests:
            if r.class_label is None or not 0 <= int(r.class_label) < NUM_CLASSES:
                raise ValueError(
                    f"row {r.id!r}: class_label must be an integer in [0, {NUM_CLASSES - 1}], got {r.class_label!r}"
                )

    def generate(self, requests: Sequence[Request]) -> GenerationResult:
        self.check_requests(requests)
        started = time.perf_counter()
        if self.seconds_per_batch:
            time.sleep(self.seconds_per_batch)
        denoised = time.perf_counter()
        images = loadtest_images([r.seed for r in requests], self.height)
        final = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return GenerationResult(
            images=images,
            final=final,
            seconds=time.perf_counter() - started,
            denoise_seconds=denoised - started,
        )
