"""Calibrate a forecast plan on a generator: candidate errors in, the schedule that minimises them out.

The math is pure (`invardiff.forecast`), the measuring is hooks (`invardiff.forecast_recorder`), the choices that
need whole runs are `invardiff.tuning`; this module runs the project's generators for them: candidate errors and
fit checks (relative error of the final sample against the same-seed uncached run) on the calibration inputs,
then the check on held-out seeds.

Everything that touches the model goes through two callables (`record`, `evaluate`), so the distributed job
(`jobs.calibrate`) runs the same choice with the work spread over Ray workers; both return per-chunk results
that are combined in chunk order, which keeps the plan identical for any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from invardiff.tuning import (  # noqa: F401 - re-exported: the job and the benchmarks import them from here
    PROPAGATION_RUNS,
    RECORD_MAX_GAP_FOR_BOUND,
    TARGETS,
    Errors,
    FitParts,
    ForecastTarget,
    choose_plan,
    fit_parts,
    relative_error,
    with_held_out_check,
)
from pipelines.base import Generator, Request

HELD_OUT_SEED = 30_000  # held-out seeds start here; calibration seeds start at 10_000
HELD_OUT_RUNS = 8


def sampler_gains(generator: Generator) -> np.ndarray:
    """The generator's sampler sensitivities (`invardiff.tuning.sampler_gains`): our DiT loop's DDIM scheduler,
    or a diffusers pipeline's scheduler (FLUX)."""
    from invardiff.tuning import sampler_gains as gains

    scheduler = getattr(generator, "scheduler", None) or getattr(getattr(generator, "pipeline", None), "scheduler", None)
    return gains(scheduler, generator.num_inference_steps)


# ----------------------------------------------------------------------------------------------------------------
# Measuring (runs the model)


def record_errors(
    generator: Generator,
    requests: Sequence[Request],
    target: str,
    max_gap: int,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Errors]:
    """Candidate errors of ``target``, one (copy, linear) pair per chunk of ``batch_size`` runs, unscaled.
    ``on_step(done, total)`` counts denoising steps over all chunks, for a progress line."""
    from invardiff.forecast_recorder import ForecastErrorRecorder

    signature = generator.signature()
    if signature.guidance_mode == "cfg-separate":
        raise ValueError("forecast calibration needs one transformer call per step; cfg-separate is not supported")
    config = generator.transformer.config
    learned_sigma = getattr(config, "out_channels", None) == 2 * getattr(config, "in_channels", -1)
    parts = []
    steps = generator.num_inference_steps
    total = steps * -(-len(requests) // batch_size)
    for start in range(0, len(requests), batch_size):
        batch = list(requests[start : start + batch_size])
        offset = steps * (start // batch_size)
        with ForecastErrorRecorder(
            generator.transformer,
            num_steps=generator.num_inference_steps,
            target=target,
            max_gap=max_gap,
            guidance_scale=signature.guidance_scale,
            cfg_batched=signature.guidance_mode == "cfg-batched",
            output_channels=config.in_channels if learned_sigma else None,
            on_step=None if on_step is None else (lambda k, offset=offset: on_step(offset + k, total)),
        ) as recorder:
            generator.generate(batch)
            parts.append(recorder.errors())
        if on_batch:
            on_batch(start + len(batch), len(requests))
    return parts


def measure_fit(generator: Generator, requests: Sequence[Request], plan, batch_size: int = 16) -> list[FitParts]:
    """Per chunk: how far ``plan``'s final samples are from the uncached ones, same seeds, same batches."""
    from invardiff.policy import InvarDiffPolicy

    parts = []
    for start in range(0, len(requests), batch_size):
        batch = list(requests[start : start + batch_size])
        reference = generator.generate(batch).final
        policy = InvarDiffPolicy(plan)
        policy.attach(generator.transformer)
        try:
            policy.reset(generator.transformer)
            cached = generator.generate(batch).final
        finally:
            policy.detach(generator.transformer)
        parts.append(fit_parts(cached, reference))
    return parts


# ----------------------------------------------------------------------------------------------------------------
# Choosing (pure apart from the callables)


def held_out_requests(generator: Generator, runs: int = HELD_OUT_RUNS) -> list[Request]:
    from pipelines.calibration import calibration_requests

    return [Request(f"held-out-{i}", r.seed, r.class_label, r.prompt) for i, r in
            enumerate(calibration_requests(generator, runs=runs, seed=HELD_OUT_SEED))]  # fmt: skip


def candidate_errors(
    generator: Generator,
    requests: Sequence[Request],
    max_gap: int,
    *,
    targets: Sequence[str] = TARGETS,
    batch_size: int = 16,
    say: Callable[[str], None] = lambda _m: None,
    on_steps: Callable[[str, int, int], None] | None = None,
) -> dict[str, Errors]:
    """{target: pooled candidate errors} over ``requests``; reusable across goals that need at most ``max_gap``."""
    from invardiff.forecast import pool_errors

    errors = {}
    for target in targets:
        parts = record_errors(
            generator, requests, target, max_gap, batch_size,
            on_batch=None if on_steps else (lambda done, total, t=target: say(f"{t} candidate errors: {done}/{total} runs")),
            on_step=None if on_steps is None else (lambda done, total, t=target: on_steps(f"{t} candidate errors", done, total)),
        )  # fmt: skip
        errors[target] = pool_errors(parts)
    return errors


def calibrate_forecast(
    generator: Generator,
    goal: ForecastTarget,
    requests: Sequence[Request] | None = None,
    *,
    targets: Sequence[str] = TARGETS,
    orders: Sequence[int] = (0, 1),
    batch_size: int = 16,
    held_out: int = HELD_OUT_RUNS,
    errors: dict[str, Errors] | None = None,
    progress: Callable[[str], None] | None = None,
    on_steps: Callable[[str, int, int], None] | None = None,
    weighting: str = "final",
    gains: np.ndarray | None = None,
):
    """Forecast calibration in this process: record candidate errors per target, choose, check on held-out seeds.
    ``errors``: candidate errors from :func:`candidate_errors` on the same requests, to share across goals.
    ``weighting``: "final" weighs each candidate's error by how much it grows by the end of sampling
    (:func:`propagation_gains`, the default); "step" by the sampler step alone (the method doc's first version)."""
    if weighting not in ("final", "step"):
        raise ValueError(f"weighting must be 'final' or 'step', got {weighting!r}")
    from pipelines.calibration import calibration_requests

    say = progress or (lambda _m: None)
    requests = list(requests or calibration_requests(generator, runs=8))
    signature = generator.signature()
    if errors is None:
        errors = candidate_errors(
            generator, requests, goal.record_gap(signature.num_inference_steps), targets=targets,
            batch_size=batch_size, say=say, on_steps=on_steps,
        )  # fmt: skip
    errors = {t: errors[t] for t in targets}
    if gains is not None:
        pass  # measured by the caller on these requests, shared across goals
    elif weighting == "final":
        label = f"propagation gains ({min(PROPAGATION_RUNS, len(requests))} runs, one generation per step)"
        if on_steps is None:
            say(label)
        gains = propagation_gains(
            generator, requests[:PROPAGATION_RUNS],
            on_step=None if on_steps is None else (lambda done, total: on_steps(label, done, total)),
        )  # fmt: skip
    else:
        gains = sampler_gains(generator)
    record = {
        "runs": len(requests),
        "inputs": [r.class_label if r.class_label is not None else r.prompt for r in requests],
        "seeds": [int(r.seed) for r in requests],
        "batch_size": batch_size,
        "weighting": weighting,
    }
    plan = choose_plan(
        signature, goal, errors, gains, lambda p: measure_fit(generator, requests, p, batch_size),
        orders=orders, record=record, say=say,
    )  # fmt: skip
    if held_out:
        checks = held_out_requests(generator, held_out)
        plan = with_held_out_check(plan, measure_fit(generator, checks, plan, batch_size), goal, [r.seed for r in checks])
    return plan



def propagation_gains(
    generator: Generator, requests: Sequence[Request], on_step: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """`invardiff.tuning.propagation_gains` for one of our generators, over ``requests`` as one batch."""
    from invardiff.tuning import propagation_gains as measure

    signature = generator.signature()
    config = generator.transformer.config
    learned_sigma = getattr(config, "out_channels", None) == 2 * getattr(config, "in_channels", -1)
    return measure(
        generator.transformer, lambda: generator.generate(list(requests)).final, generator.num_inference_steps,
        cfg_batched=signature.guidance_mode == "cfg-batched",
        output_channels=config.in_channels if learned_sigma else None, on_step=on_step,
    )  # fmt: skip
