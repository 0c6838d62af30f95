"""Class-conditional DiT sampling: deterministic DDIM with classifier-free guidance, our own loop.

diffusers' `DiTPipeline` hard-codes the ImageNet null class (1000), so it cannot guide a model with a
learned null class at another index, and it hides the step index that caching needs. This loop is small,
batched, and seeds every row on its own so a row's image does not depend on its batchmates.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from pipelines.base import GenerationResult, Request, to_uint8


def _to(module, device, dtype):
    # Casting only when needed keeps diffusers from warning about (and re-casting) fp32-pinned modules.
    module = module.to(device)
    return module if module.dtype == dtype else module.to(dtype=dtype)


class DitGenerator:
    architecture = "dit"

    def __init__(
        self,
        transformer,
        scheduler,
        *,
        num_classes: int,
        model_id: str,
        fingerprint: str,
        vae=None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.transformer = _to(transformer, device, dtype).eval()
        self.vae = _to(vae, device, dtype).eval() if vae is not None else None
        self.scheduler = scheduler
        self.num_classes = num_classes
        # diffusers' LabelEmbedding puts the learned "no class" embedding right after the real classes.
        self.null_class = num_classes
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.device = torch.device(device)
        self.dtype = dtype

        config = transformer.config
        self.latent_channels = config.in_channels
        self.sample_size = config.sample_size
        # Checkpoints that learn the variance (DiT-XL/2) predict 2x channels; DDIM uses the noise half only.
        self.learned_sigma = config.out_channels == 2 * config.in_channels
        pixel_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.height = self.width = self.sample_size * pixel_scale

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def signature(self):
        from invardiff.adapters import get_adapter
        from invardiff.plan import PipelineSignature

        return PipelineSignature(
            architecture=self.architecture,
            model_id=self.model_id,
            model_fingerprint=self.fingerprint,
            scheduler=type(self.scheduler).__name__,
            num_inference_steps=self.num_inference_steps,
            height=self.height,
            width=self.width,
            guidance_mode="cfg-batched" if self.uses_cfg else "none",
            guidance_scale=float(self.guidance_scale),
            dtype=str(self.dtype).removeprefix("torch."),
            layers=get_adapter(self.transformer).layers(self.transformer),
        )

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        # Noise is drawn on the CPU, one generator per row, so the same seed gives the same start on any device.
        shape = (self.latent_channels, self.sample_size, self.sample_size)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(device=self.device, dtype=self.dtype)

    def check_requests(self, requests: Sequence[Request]) -> None:
        for r in requests:
            if r.class_label is None or not 0 <= int(r.class_label) < self.num_classes:
                raise ValueError(
                    f"row {r.id!r}: class_label must be an integer in [0, {self.num_classes - 1}], got {r.class_label!r}"
                )

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        x = noise * self.scheduler.init_noise_sigma
        if self.uses_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        for t in self.scheduler.timesteps:
            model_input = torch.cat([x, x]) if self.uses_cfg else x
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = t.expand(model_input.shape[0])
            eps = self.transformer(model_input, timestep=timestep, class_labels=labels).sample
            if self.learned_sigma:
                eps = eps[:, : self.latent_channels]
            if self.uses_cfg:
                cond, uncond = eps.chunk(2)
                eps = uncond + self.guidance_scale * (cond - uncond)
            x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def generate(self, requests: Sequence[Request]) -> GenerationResult:
        self.check_requests(requests)
        labels = torch.tensor([int(r.class_label) for r in requests], device=self.device)
        started = time.perf_counter()
        final = self.denoise(self.initial_noise([r.seed for r in requests]), labels)
        denoised = time.perf_counter()
        images = to_uint8(self.decode(final))
        return GenerationResult(
            images=images,
            final=final,
            seconds=time.perf_counter() - started,
            denoise_seconds=denoised - started,
        )
