"""Tiny randomly initialised DiT models for tests: built in milliseconds, no download, same seed, same weights.

Two shapes, mirroring the two real DiT setups this project runs:
- pixel space, like the embedded digits model (`pipelines/digits.py`): 1 channel, 16x16, epsilon only;
- latent space, like `facebook/DiT-XL-2-256`: 4 latent channels from an `AutoencoderKL`, and a learned variance,
  so the transformer outputs twice the input channels.
`save_tiny_dit` writes either in the real checkpoint's diffusers layout, for loader and fetch tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

NUM_CLASSES = 10

PIXEL_DIT_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=1,
    out_channels=1,
    sample_size=16,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
)
LATENT_DIT_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,  # epsilon and the variance interpolation, as DiT-XL-2 predicts them
    sample_size=8,  # latents of the tiny VAE for 16x16 images
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
)
# A 2-level Stable Diffusion-style VAE (quant convs, scaling factor 0.18215): 16x16x3 images <-> 8x8x4 latents.
TINY_DIT_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.18215,
)
# DDIM over the schedule each kind was trained with: DiT's linear betas, the digits model's cosine.
LATENT_DIT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
)
PIXEL_DIT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    clip_sample=True,
    clip_sample_range=1.0,
    timestep_spacing="trailing",
    set_alpha_to_one=False,
)


def tiny_dit(
    seed: int = 0,
    layers: int = 3,
    *,
    latent: bool = False,
    with_vae: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """A tiny class-conditional `DiTTransformer2DModel` with `layers` blocks, in eval mode.

    Pixel space by default; `latent=True` gives the DiT-XL-2-shaped one, and `with_vae=True` returns
    `(transformer, vae)` with the matching tiny `AutoencoderKL`.
    """
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    if with_vae and not latent:
        raise ValueError("a pixel-space DiT has no VAE; pass latent=True with with_vae=True")
    config = LATENT_DIT_CONFIG if latent else PIXEL_DIT_CONFIG
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        # eval(): modules built from configs start in training mode, where the class embedding drops labels.
        transformer = _cast(DiTTransformer2DModel(num_layers=layers, **config).eval(), dtype)
        if not with_vae:
            return transformer
        vae = _cast(AutoencoderKL(**TINY_DIT_VAE_CONFIG).eval(), dtype)
    return transformer, vae


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Skipping the no-op cast also skips diffusers 0.42's spurious "should be kept in float32: []" warning.
    return model if dtype == torch.float32 else model.to(dtype)


def save_tiny_dit(directory: str | os.PathLike, seed: int = 0, layers: int = 3, *, latent: bool = False) -> Path:
    """Write a tiny DiT in the layout of `facebook/DiT-XL-2-256` and return the directory.

    `model_index.json` (a `DiTPipeline` with `id2label`), `transformer/`, `scheduler/` (a `DDIMScheduler`) and,
    for the latent kind, `vae/`. The pixel kind records its VAE as absent (`[null, null]`); load it with
    `DiTPipeline.from_pretrained(directory, vae=None)`, or load its parts by subfolder.
    """
    from diffusers import DDIMScheduler, DiTPipeline

    if latent:
        transformer, vae = tiny_dit(seed, layers, latent=True, with_vae=True)
        scheduler = DDIMScheduler(**LATENT_DIT_SCHEDULER_CONFIG)
    else:
        transformer, vae = tiny_dit(seed, layers), None
        scheduler = DDIMScheduler(**PIXEL_DIT_SCHEDULER_CONFIG)
    id2label = {str(i): f"class {i}" for i in range(NUM_CLASSES)}
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    # DiTPipeline reads id2label from model_index.json but does not record it there itself.
    pipeline.register_to_config(id2label=id2label)
    directory = Path(directory)
    pipeline.save_pretrained(directory)
    return directory
