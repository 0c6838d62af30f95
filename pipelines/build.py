"""Turn a model spec into a ready generator.

A spec is one of:
  digits            the embedded class-conditional digits DiT (the default everywhere)
  tiny-dit          a tiny random-init DiT (tests, smoke runs)
  tiny-flux         a tiny random-init FLUX pipeline with offline text encoders (tests, smoke runs)
  loadtest[:S]      no model: a constant-cost stand-in (S seconds per batch, default 0) that measures the
                    job's own capacity (pipelines/loadtest.py); never a default
  PATH or URI       a diffusers-layout checkpoint (DiT-XL/2 or FLUX.1), local or any fsspec URI such as s3://
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines import digits, loadtest

EMBEDDED_MODELS = ("digits", "tiny-dit", "tiny-flux", "loadtest")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GeneratorConfig:
    model: str = "digits"
    num_inference_steps: int | None = None  # None: the architecture's default (DiT 50, FLUX 28)
    guidance_scale: float | None = None  # None: the model's default
    dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    height: int | None = None  # FLUX only (default: the VAE's sample size); DiT resolution is fixed by the checkpoint
    width: int | None = None
    true_cfg_scale: float = 1.0  # FLUX only; > 1 runs separate cond/uncond calls
    storage_options: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        # 0 would read as "the default" below and quietly run 50 steps; the CLI says so for --steps, this for the API
        for name in ("num_inference_steps", "height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


# Measured on 100 seeded samples (BENCHMARKS.md): classifier accuracy 91% unguided, 97% at 1.5, 35% at 3.0
# (the 16 px model saturates under strong guidance).
DIGITS_DEFAULT_GUIDANCE = 1.5


def class_names(model: str) -> list[str] | None:
    """What each class id of a class-conditional model means, where we know it: the digits model's classes
    are the digits. Random-init models have no meaning for theirs, and a checkpoint's are not in its files."""
    return [str(digit) for digit in range(digits.NUM_CLASSES)] if model == "digits" else None


def build_generator(config: GeneratorConfig):
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    if config.model == "digits":
        return _digits_generator(config)
    if config.model == "tiny-dit":
        return _tiny_dit_generator(config)
    if loadtest.is_loadtest(config.model):
        return loadtest.LoadTestGenerator(
            seconds_per_batch=loadtest.batch_seconds(config.model),
            num_inference_steps=config.num_inference_steps or 50,
            model_id=config.model,
            device=config.resolved_device(),
        )
    if config.model == "tiny-flux":
        from pipelines.flux import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(seed=0, dtype=DTYPES[config.dtype])
        return _flux_generator(pipe, config, model_id="tiny-flux")
    return _checkpoint_generator(config)


def _ddim(scheduler_config: dict):
    from diffusers import DDIMScheduler

    # InvarDiff's plan assumes a deterministic trajectory, so DiT always samples with DDIM (eta = 0).
    return DDIMScheduler.from_config(scheduler_config)


def _digits_generator(config: GeneratorConfig):
    from diffusers import DiTTransformer2DModel

    from pipelines.fetch import model_fingerprint

    if not (digits.WEIGHTS_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"embedded weights missing at {digits.WEIGHTS_DIR}; run `python -m jobs.train_digits` to recreate them"
        )
    transformer = DiTTransformer2DModel.from_pretrained(digits.WEIGHTS_DIR)
    return _dit_generator(
        transformer,
        _ddim(digits.SCHEDULER_CONFIG),
        config,
        num_classes=digits.NUM_CLASSES,
        model_id="embedded:digits-dit",
        fingerprint=model_fingerprint(transformer),
        default_guidance=DIGITS_DEFAULT_GUIDANCE,
    )


def _tiny_dit_generator(config: GeneratorConfig):
    from pipelines.fetch import model_fingerprint
    from pipelines.tiny import tiny_dit

    transformer = tiny_dit(seed=0)
    return _dit_generator(
        transformer,
        _ddim(digits.SCHEDULER_CONFIG),
        config,
        num_classes=transformer.config.num_embeds_ada_norm,
        model_id="tiny-dit",
        fingerprint=model_fingerprint(transformer),
        default_guidance=DIGITS_DEFAULT_GUIDANCE,
    )


def _dit_generator(transformer, scheduler, config, *, num_classes, model_id, fingerprint, default_guidance, vae=None):
    from pipelines.dit import DitGenerator

    return DitGenerator(
        transformer,
        scheduler,
        vae=vae,
        num_classes=num_classes,
        model_id=model_id,
        fingerprint=fingerprint,
        num_inference_steps=config.num_inference_steps or 50,
        guidance_scale=default_guidance if config.guidance_scale is None else config.guidance_scale,
        device=config.resolved_device(),
        dtype=DTYPES[config.dtype],
    )


def _flux_generator(pipe, config: GeneratorConfig, *, model_id: str):
    from pipelines.flux import FluxGenerator

    kwargs = dict(
        num_inference_steps=config.num_inference_steps or 28,
        true_cfg_scale=config.true_cfg_scale,
        model_id=model_id,
        device=config.resolved_device(),
    )
    if config.guidance_scale is not None:
        kwargs["guidance_scale"] = config.guidance_scale
    # Unless asked otherwise, the resolution the model was built for: its VAE's sample size (1024 for FLUX.1,
    # 32 for tiny-flux, which would otherwise run at 1024x1024 for minutes per image).
    native = int(pipe.vae.config.sample_size)
    kwargs["height"] = config.height or native
    kwargs["width"] = config.width or native
    return FluxGenerator(pipe, **kwargs)


def known_architecture(model: str) -> str | None:
    """'dit' or 'flux' for an embedded model or a local checkpoint folder, without loading it; None for a URI
    (known once fetched)."""
    from pipelines import loadtest

    if model == "tiny-flux":
        return "flux"
    if model in EMBEDDED_MODELS or loadtest.is_loadtest(model):
        return "dit"
    if "://" in model and not model.startswith("file://"):
        return None
    return detect_architecture(Path(model.removeprefix("file://")).expanduser())


def detect_architecture(model_dir: Path) -> str:
    """'dit' or 'flux', from a diffusers layout's model_index.json or transformer config."""
    index = model_dir / "model_index.json"
    if index.exists():
        name = json.loads(index.read_text()).get("_class_name", "")
        if "Flux" in name:
            return "flux"
        if "DiT" in name:
            return "dit"
    for candidate in (model_dir / "transformer" / "config.json", model_dir / "config.json"):
        if candidate.exists():
            name = json.loads(candidate.read_text()).get("_class_name", "")
            if name == "DiTTransformer2DModel":
                return "dit"
            if name == "FluxTransformer2DModel":
                return "flux"
    raise ValueError(
        f"{model_dir} is not a DiT or FLUX checkpoint in diffusers layout "
        "(expected model_index.json naming DiTPipeline/FluxPipeline, or a transformer config.json)"
    )


def _checkpoint_generator(config: GeneratorConfig):
    from pipelines.fetch import local_model_dir, model_fingerprint

    model_dir = local_model_dir(config.model, storage_options=config.storage_options or None)
    dtype = DTYPES[config.dtype]
    if detect_architecture(model_dir) == "flux":
        from pipelines.flux import load_flux_pipeline

        pipe = load_flux_pipeline(model_dir, dtype=dtype, device=config.resolved_device())
        return _flux_generator(pipe, config, model_id=config.model)

    from diffusers import AutoencoderKL, DiTTransformer2DModel

    transformer_dir = model_dir / "transformer" if (model_dir / "transformer").exists() else model_dir
    transformer = DiTTransformer2DModel.from_pretrained(transformer_dir, torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=dtype) if (model_dir / "vae").exists() else None
    scheduler_file = model_dir / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else {}
    # DiT-XL/2 learns a null class at index num_embeds_ada_norm (1000 for ImageNet).
    return _dit_generator(
        transformer,
        _ddim(scheduler_config),
        config,
        vae=vae,
        num_classes=transformer.config.num_embeds_ada_norm,
        model_id=config.model,
        fingerprint=model_fingerprint(model_dir),
        default_guidance=4.0,
    )
