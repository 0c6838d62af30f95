"""The Python API on a user's own diffusers pipeline: `enable`, `disable`, `calibrate`.

    import invardiff
    plan = invardiff.calibrate(pipe, [207, 360, 387, 974], num_inference_steps=50, target_speedup=3.0)
    invardiff.enable(pipe, plan)          # or a path: invardiff.enable(pipe, "plan.json")
    images = pipe(class_labels=[1, 2], num_inference_steps=50).images
    invardiff.disable(pipe)

diffusers' own convention is `transformer.enable_cache(config)` (`CacheMixin`). It accepts only diffusers' config
classes and `DiTTransformer2DModel` is no `CacheMixin` at all, so InvarDiff cannot plug into it; `enable` / `disable`
mirror it at the pipeline level instead, where they can also check each call against the plan:

* the number of denoising steps, when the pipeline sets its scheduler's timesteps (before anything runs);
* the resolution (latent size or token count) and, for FLUX, distilled guidance, at the first transformer call.

A call that does not match raises :class:`PlanCallMismatch` with one line saying what differs. Enabling a bare
transformer checks the architecture and layer counts only; then the caller keeps step counts in line
(`invardiff.reset_invardiff` between generations).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ._hookutils import unwrap
from .adapters import get_adapter
from .plan import PipelineSignature, Plan, PlanMismatchError
from .runtime import apply_invardiff, remove_invardiff, reset_invardiff

__all__ = ["PlanCallMismatch", "calibrate", "disable", "enable", "pipeline_signature"]

_ORIGINAL_SET_TIMESTEPS = "_invardiff_original_set_timesteps"


class PlanCallMismatch(ValueError):
    """A pipeline call that the enabled plan was not calibrated for (steps, resolution, guidance)."""


# ----------------------------------------------------------------------------------------------------------------
# What a pipeline is


def _transformer_of(pipe_or_transformer: Any) -> torch.nn.Module:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"expected a diffusers pipeline or transformer, got {type(pipe_or_transformer).__name__}")
    return unwrap(transformer)


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "transformer") and hasattr(obj, "scheduler")


def _vae_scale(pipe: Any) -> int:
    vae = getattr(pipe, "vae", None)
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def pipeline_signature(
    pipe: Any,
    *,
    num_inference_steps: int,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    true_cfg_scale: float = 1.0,
) -> PipelineSignature:
    """The signature a plan for ``pipe`` called with these arguments records (and is checked against)."""
    from .fingerprint import module_fingerprint

    transformer = _transformer_of(pipe)
    adapter = get_adapter(transformer)
    config = transformer.config
    if adapter.architecture == "dit":
        guidance_scale = 4.0 if guidance_scale is None else guidance_scale  # DiTPipeline's default
        height = width = config.sample_size * _vae_scale(pipe)
        guidance_mode = "cfg-batched" if guidance_scale > 1 else "none"
    else:
        guidance_scale = 3.5 if guidance_scale is None else guidance_scale  # FluxPipeline's default
        default = getattr(pipe, "default_sample_size", 128) * getattr(pipe, "vae_scale_factor", 8)
        height, width = height or default, width or default
        if true_cfg_scale > 1:
            guidance_mode = "cfg-separate"
        else:
            guidance_mode = "distilled" if getattr(config, "guidance_embeds", False) else "none"
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return PipelineSignature(
        architecture=adapter.architecture,
        model_id=str(name or type(transformer).__name__),
        model_fingerprint=module_fingerprint(transformer),
        scheduler=type(pipe.scheduler).__name__ if _is_pipeline(pipe) else "unknown",
        num_inference_steps=num_inference_steps,
        height=height,
        width=width,
        guidance_mode=guidance_mode,
        guidance_scale=float(guidance_scale),
        dtype=str(transformer.dtype).removeprefix("torch."),
        layers=adapter.layers(transformer),
    )


# ----------------------------------------------------------------------------------------------------------------
# enable / disable


def _as_plan(plan: Plan | str | os.PathLike) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise TypeError(f"expected an invardiff.Plan or a path to one, got {type(plan).__name__}")


def enable(pipe_or_transformer: Any, plan: Plan | str | os.PathLike) -> Plan:
    """Run every later generation of ``pipe_or_transformer`` under ``plan`` (a :class:`Plan` or a path/URI to one).
    Returns the plan. Raises :class:`invardiff.plan.PlanMismatchError` if the model is not the plan's kind."""
    plan = _as_plan(plan)
    transformer = _transformer_of(pipe_or_transformer)
    adapter = get_adapter(transformer)
    expected = plan.signature
    differs = [
        (name, mine, theirs)
        for name, mine, theirs in (
            ("architecture", expected.architecture, adapter.architecture),
            ("layers", dict(expected.layers), adapter.layers(transformer)),
        )
        if mine != theirs
    ]
    if differs:
        raise PlanMismatchError(plan.plan_id, differs)
    check = None
    if _is_pipeline(pipe_or_transformer):
        _guard_step_count(pipe_or_transformer, transformer, plan)
        check = _first_call_check(pipe_or_transformer, plan)
    apply_invardiff(transformer, plan, check_first_call=check)
    return plan


def disable(pipe_or_transformer: Any) -> None:
    """Detach the plan; the model computes exactly as before. A no-op when nothing is enabled."""
    remove_invardiff(_transformer_of(pipe_or_transformer))
    scheduler = getattr(pipe_or_transformer, "scheduler", None)
    if scheduler is not None and _ORIGINAL_SET_TIMESTEPS in vars(scheduler):
        del scheduler.set_timesteps  # the instance attribute; the class's method shows through again
        delattr(scheduler, _ORIGINAL_SET_TIMESTEPS)


def _guard_step_count(pipe: Any, transformer: torch.nn.Module, plan: Plan) -> None:
    """Every diffusers pipeline sets its scheduler's timesteps once, before the first denoising step: the one place
    a call's step count is known up front. Check it there, and start the generation with a clean cache."""
    scheduler = pipe.scheduler
    if _ORIGINAL_SET_TIMESTEPS in vars(scheduler):
        return
    original = scheduler.set_timesteps
    steps = plan.num_steps

    def set_timesteps(*args, **kwargs):
        result = original(*args, **kwargs)
        count = len(scheduler.timesteps)
        if count != steps:
            raise PlanCallMismatch(
                f"plan {plan.plan_id} was calibrated for {steps} denoising steps; this call runs {count} "
                f"(pass num_inference_steps={steps}, or calibrate a plan for {count})"
            )
        reset_invardiff(transformer)
        return result

    setattr(scheduler, _ORIGINAL_SET_TIMESTEPS, original)
    scheduler.set_timesteps = set_timesteps


def _first_call_check(pipe: Any, plan: Plan) -> Callable[[tuple, dict], None]:
    signature = plan.signature
    scale = _vae_scale(pipe)

    def check(args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            return
        if signature.architecture == "dit":
            size = hidden.shape[-1] * scale
            if size != signature.width:
                raise PlanCallMismatch(
                    f"plan {plan.plan_id} was calibrated for {signature.width}x{signature.height} images; this call "
                    f"generates {size}x{size}"
                )
            return
        # FLUX packs 2x2 latent patches into one token.
        tokens = (signature.height // (scale * 2)) * (signature.width // (scale * 2))
        if hidden.shape[1] != tokens:
            raise PlanCallMismatch(
                f"plan {plan.plan_id} was calibrated for {signature.width}x{signature.height} ({tokens} image tokens); "
                f"this call has {hidden.shape[1]} tokens (pass height={signature.height}, width={signature.width})"
            )
        distilled = kwargs.get("guidance") is not None
        if distilled != (signature.guidance_mode == "distilled"):
            raise PlanCallMismatch(
                f"plan {plan.plan_id} was calibrated with guidance mode {signature.guidance_mode}; this call "
                f"{'passes' if distilled else 'does not pass'} distilled guidance"
            )

    return check


# ----------------------------------------------------------------------------------------------------------------
# calibrate


class _PipelineRunner:
    """Runs a user's diffusers pipeline deterministically: one seeded generator per row, final sample out."""

    def __init__(self, pipe: Any, signature: PipelineSignature, call_kwargs: dict):
        self.pipe = pipe
        self.signature = signature
        self.call_kwargs = call_kwargs

    def run(self, inputs: Sequence[Any], seeds: Sequence[int]) -> torch.Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        common = dict(num_inference_steps=self.signature.num_inference_steps, generator=generators)
        if self.signature.architecture == "dit":
            # DiTPipeline always decodes; its images are the final sample here.
            out = self.pipe(class_labels=[int(i) for i in inputs], guidance_scale=self.signature.guidance_scale,
                            output_type="np", **common, **self.call_kwargs)  # fmt: skip
        else:
            out = self.pipe(prompt=[str(p) for p in inputs], guidance_scale=self.signature.guidance_scale,
                            height=self.signature.height, width=self.signature.width, output_type="latent",
                            **common, **self.call_kwargs)  # fmt: skip
        images = out.images
        return torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images


def calibrate(
    pipe: Any,
    inputs: Sequence[Any],
    *,
    num_inference_steps: int,
    preset: str | None = None,
    target_speedup: float | None = None,
    max_rel_error: float | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 10_000,
    held_out: Sequence[Any] | None = None,
    held_out_seed: int = 30_000,
    batch_size: int = 4,
    progress: Callable[[str], None] | None = None,
    **call_kwargs: Any,
) -> Plan:
    """A forecast plan for ``pipe`` (a diffusers ``DiTPipeline`` or ``FluxPipeline``) called with these arguments.

    ``inputs``: class labels (DiT) or prompts (FLUX), one calibration run each, seeded ``seed + i``. Give one goal:
    ``preset`` (quality 2x, balanced 2.5x, fast 3x, turbo 4x), ``target_speedup`` (counted) or ``max_rel_error``
    (relative error of the final sample on the calibration runs). ``held_out`` inputs (default: the first four
    inputs with seeds from ``held_out_seed``) are run afterwards and their relative error is recorded in the plan.
    Extra keyword arguments go to every pipeline call.
    """
    from .forecast import pool_errors
    from .forecast_recorder import ForecastErrorRecorder
    from .presets import FORECAST_PRESETS
    from .tuning import PROPAGATION_RUNS, ForecastTarget, choose_plan, fit_parts, propagation_gains, with_held_out_check

    goals = [g for g in (preset, target_speedup, max_rel_error) if g is not None]
    if len(goals) != 1:
        raise ValueError("give exactly one of preset=, target_speedup= or max_rel_error=")
    if preset is not None:
        if preset not in FORECAST_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(FORECAST_PRESETS)}, got {preset!r}")
        goal = ForecastTarget(speedup=FORECAST_PRESETS[preset], name=preset)
    else:
        goal = ForecastTarget(speedup=target_speedup, max_rel_error=max_rel_error)
    if not inputs:
        raise ValueError("calibration needs at least one input")
    say = progress or (lambda _m: None)
    transformer = _transformer_of(pipe)
    signature = pipeline_signature(
        pipe, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
        true_cfg_scale=call_kwargs.get("true_cfg_scale", 1.0),
    )  # fmt: skip
    if signature.guidance_mode == "cfg-separate":
        raise ValueError("forecast calibration needs one transformer call per step; true CFG (cfg-separate) is not supported")
    runner = _PipelineRunner(pipe, signature, call_kwargs)
    seeds = [seed + i for i in range(len(inputs))]
    chunks = [(inputs[i : i + batch_size], seeds[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    config = transformer.config
    learned_sigma = getattr(config, "out_channels", None) == 2 * getattr(config, "in_channels", -1)

    errors = {}
    gap = goal.record_gap(num_inference_steps)
    for target in ("residual", "modules"):
        parts = []
        for chunk_inputs, chunk_seeds in chunks:
            with ForecastErrorRecorder(
                transformer, num_steps=num_inference_steps, target=target, max_gap=gap,
                guidance_scale=signature.guidance_scale, cfg_batched=signature.guidance_mode == "cfg-batched",
                output_channels=config.in_channels if learned_sigma else None,
            ) as recorder:  # fmt: skip
                runner.run(chunk_inputs, chunk_seeds)
                parts.append(recorder.errors())
        errors[target] = pool_errors(parts)
        say(f"{target} candidate errors: {len(inputs)} runs")
    first, first_seeds = inputs[:PROPAGATION_RUNS], seeds[:PROPAGATION_RUNS]
    say(f"propagation gains on {len(first)} runs")
    gains = propagation_gains(
        transformer, lambda: runner.run(first, first_seeds), num_inference_steps,
        cfg_batched=signature.guidance_mode == "cfg-batched",
        output_channels=config.in_channels if learned_sigma else None,
    )  # fmt: skip

    def evaluate(plan: Plan, chunk_list=chunks):
        parts = []
        for chunk_inputs, chunk_seeds in chunk_list:
            reference = runner.run(chunk_inputs, chunk_seeds)
            apply_invardiff(transformer, plan)
            try:
                cached = runner.run(chunk_inputs, chunk_seeds)
            finally:
                remove_invardiff(transformer)
            parts.append(fit_parts(cached, reference))
        return parts

    record = {
        "runs": len(inputs),
        "inputs": [i if isinstance(i, (int, np.integer)) else str(i) for i in inputs],
        "seeds": seeds,
        "batch_size": batch_size,
        "via": "invardiff.calibrate",
        "weighting": "final",
    }
    record["inputs"] = [int(i) if isinstance(i, (int, np.integer)) else i for i in record["inputs"]]
    plan = choose_plan(signature, goal, errors, gains, evaluate, record=record, say=say)
    checks = list(held_out) if held_out is not None else list(inputs[:4])
    if checks:
        check_seeds = [held_out_seed + i for i in range(len(checks))]
        check_chunks = [(checks[i : i + batch_size], check_seeds[i : i + batch_size]) for i in range(0, len(checks), batch_size)]
        plan = with_held_out_check(plan, evaluate(plan, check_chunks), goal, check_seeds)
    return plan
