"""Calibrate a forecast plan on a generator: candidate errors in, the schedule that minimises them out.

The math is pure (`invardiff.forecast`), the measuring is hooks (`invardiff.forecast_recorder`); this module runs
the sampler on the calibration inputs and makes the one choice that needs whole runs: which forecast target
(residual or modules) and, for an error bound, how many computed steps. Both are decided by relative error of
the final sample against the same-seed uncached run, on the calibration set, then checked on held-out seeds.

Everything that touches the model goes through two callables (`record`, `evaluate`), so the distributed job
(`jobs.calibrate`) runs the same choice with the work spread over Ray workers; both return per-chunk results
that are combined in chunk order, which keeps the plan identical for any number of workers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from pipelines.base import Generator, Request

TARGETS = ("residual", "modules")
HELD_OUT_SEED = 30_000  # held-out seeds start here; calibration seeds start at 10_000
HELD_OUT_RUNS = 8
RECORD_MAX_GAP_FOR_BOUND = 4  # an error bound may settle anywhere up to 5x, which needs runs of 4 gated steps

Errors = tuple[np.ndarray, np.ndarray]  # (copy_error (T, G), linear_error (T, G, G))
FitParts = tuple[np.ndarray, np.ndarray]  # per run: (sum of squared error, sum of squared reference)


@dataclass(frozen=True)
class ForecastTarget:
    """What to tune for: a counted speedup, or the largest speedup within a relative-error bound."""

    speedup: float | None = None
    max_rel_error: float | None = None
    name: str | None = None  # the preset it came from, for the record

    def __post_init__(self):
        if (self.speedup is None) == (self.max_rel_error is None):
            raise ValueError("give exactly one of a target speedup or a maximum relative error")
        if self.speedup is not None and not self.speedup >= 1.0:
            raise ValueError(f"target speedup must be >= 1, got {self.speedup}")
        if self.max_rel_error is not None and not self.max_rel_error > 0.0:
            raise ValueError(f"maximum relative error must be > 0, got {self.max_rel_error}")

    def record_gap(self, num_steps: int) -> int:
        """The longest gated run calibration measures candidates for."""
        from invardiff.forecast import DEFAULT_MAX_GAP, computed_steps_for, min_max_gap

        if self.speedup is None:
            return RECORD_MAX_GAP_FOR_BOUND
        return max(DEFAULT_MAX_GAP, min_max_gap(num_steps, computed_steps_for(num_steps, self.speedup)))


# ----------------------------------------------------------------------------------------------------------------
# Measuring (runs the model)


def sampler_gains(generator: Generator) -> np.ndarray:
    """Per step, ``d x_{k+1} / d output`` of the generator's sampler step (a scalar for DDIM with eta 0 and for
    flow-matching Euler), so candidate errors in model-output space become errors of the next sampler state."""
    scheduler = getattr(generator, "scheduler", None)
    steps = generator.num_inference_steps
    if scheduler is not None and type(scheduler).__name__ == "DDIMScheduler":
        import torch

        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(steps, device="cpu")
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        return np.array([float(probe.step(one, t, zero, eta=0.0).prev_sample) for t in probe.timesteps])
    pipeline_scheduler = getattr(getattr(generator, "pipeline", None), "scheduler", None)
    sigmas = getattr(pipeline_scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == steps + 1:  # set by the last generation (FLUX's shifted sigmas)
        return np.abs(np.diff(np.asarray(sigmas, dtype=np.float64)))
    return np.ones(steps)


def record_errors(
    generator: Generator,
    requests: Sequence[Request],
    target: str,
    max_gap: int,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Errors]:
    """Candidate errors of ``target``, one (copy, linear) pair per chunk of ``batch_size`` runs, unscaled."""
    from invardiff.forecast_recorder import ForecastErrorRecorder

    signature = generator.signature()
    if signature.guidance_mode == "cfg-separate":
        raise ValueError("forecast calibration needs one transformer call per step; cfg-separate is not supported")
    config = generator.transformer.config
    learned_sigma = getattr(config, "out_channels", None) == 2 * getattr(config, "in_channels", -1)
    parts = []
    for start in range(0, len(requests), batch_size):
        batch = list(requests[start : start + batch_size])
        with ForecastErrorRecorder(
            generator.transformer,
            num_steps=generator.num_inference_steps,
            target=target,
            max_gap=max_gap,
            guidance_scale=signature.guidance_scale,
            cfg_batched=signature.guidance_mode == "cfg-batched",
            output_channels=config.in_channels if learned_sigma else None,
        ) as recorder:
            generator.generate(batch)
            parts.append(recorder.errors())
        if on_batch:
            on_batch(start + len(batch), len(requests))
    return parts


def fit_parts(finals, references) -> FitParts:
    """Per run: squared error against the reference and the reference's squared norm."""
    import torch

    x = torch.as_tensor(finals).double().flatten(1)
    r = torch.as_tensor(references).double().flatten(1)
    return ((x - r) ** 2).sum(1).numpy(), (r**2).sum(1).numpy()


def relative_error(parts: Sequence[FitParts]) -> float:
    """||x - x_ref|| / ||x_ref|| over every run of the parts (the benchmarks' rel err)."""
    num = sum(float(p[0].sum()) for p in parts)
    den = sum(float(p[1].sum()) for p in parts)
    return math.sqrt(num / den) if den > 0 else math.inf


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


def choose_plan(
    signature,
    goal: ForecastTarget,
    errors: dict[str, Errors],
    gains: np.ndarray,
    evaluate: Callable[[object], list[FitParts]],
    *,
    orders: Sequence[int] = (0, 1),
    record: dict | None = None,
    say: Callable[[str], None] = lambda _m: None,
):
    """The forecast plan for ``goal``. At a budget of computed steps the candidates are, per target, the DP schedule
    (placed by summed candidate error) and the uniform one; the candidate whose plan has the lowest relative error
    on the calibration runs wins. The DP minimises one-step errors on the true trajectory and cannot see how an
    error propagates, so it is checked against the uniform baseline on whole runs rather than trusted alone.
    For an error bound, the fewest computed steps that meet it (binary search; relative error falls as computed
    steps are added, and the search checks each point it visits)."""
    from invardiff.forecast import (
        DEFAULT_MAX_GAP,
        choose_schedule,
        computed_steps_for,
        min_max_gap,
        schedule_error,
        uniform_schedule,
    )
    from invardiff.plan import Plan

    num_steps = signature.num_inference_steps
    weight = (np.asarray(gains, dtype=np.float64) ** 2)[:, None]
    scaled = {t: (c * weight, l * weight[:, :, None]) for t, (c, l) in errors.items()}
    recorded_gap = min(c.shape[1] for c, _ in scaled.values()) - 1
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    tried: dict[int, dict] = {}

    def best_at(num_computed: int):
        if num_computed in tried:
            return tried[num_computed]
        gap = max(DEFAULT_MAX_GAP, min_max_gap(num_steps, num_computed))
        rows = {}
        for target, (copy_error, linear_error) in scaled.items():
            schedules = {
                "dp": choose_schedule(copy_error, linear_error, num_computed, max_gap=gap, orders=orders),
                "uniform": uniform_schedule(num_steps, num_computed, order=max(orders)),
            }
            for placement, schedule in schedules.items():
                plan = Plan.from_forecast(signature, schedule, target=target, created_at=stamp)
                rel = relative_error(evaluate(plan))
                say(f"{target:8s} {placement:7s} {num_computed:3d} computed steps: calibration rel err {rel:.4f}")
                rows[f"{target}/{placement}"] = {
                    "plan": plan,
                    "dp_error": schedule_error(copy_error, linear_error, schedule),
                    "rel_err": rel,
                    "max_gap": gap,
                }
        tried[num_computed] = rows
        return rows

    def winner(rows):
        return min(rows, key=lambda key: (rows[key]["rel_err"], list(rows).index(key)))

    if goal.speedup is not None:
        num_computed = computed_steps_for(num_steps, goal.speedup)
    else:
        low = max(1, math.ceil(num_steps / (recorded_gap + 1)))
        high = num_steps
        while low < high:  # smallest num_computed whose best plan meets the bound
            middle = (low + high) // 2
            rows = best_at(middle)
            if rows[winner(rows)]["rel_err"] <= goal.max_rel_error:
                high = middle
            else:
                low = middle + 1
        num_computed = low
    rows = best_at(num_computed)
    chosen = winner(rows)
    calibration = {
        "method": "forecast-dp",
        "goal": {"target_speedup": goal.speedup, "max_rel_error": goal.max_rel_error, "preset": goal.name},
        "computed_steps": num_computed,
        "max_gap": rows[chosen]["max_gap"],
        "orders_allowed": list(orders),
        "error": "squared error of x_{k+1}, summed over calibration runs",
        "candidates": {
            t: {"dp_error": r["dp_error"], "calibration_rel_err": r["rel_err"]} for t, r in rows.items()
        },
        "search": {str(m): {t: r["rel_err"] for t, r in rs.items()} for m, rs in sorted(tried.items())},
        "chosen": chosen,
        "target": chosen.split("/")[0],
        "placement": chosen.split("/")[1],
        **(record or {}),
    }
    plan = rows[chosen]["plan"]
    return Plan.from_forecast(
        signature, plan.forecast_schedule, target=plan.forecast["target"], calibration=calibration, created_at=stamp
    )


def held_out_requests(generator: Generator, runs: int = HELD_OUT_RUNS) -> list[Request]:
    from pipelines.calibration import calibration_requests

    return [Request(f"held-out-{i}", r.seed, r.class_label, r.prompt) for i, r in
            enumerate(calibration_requests(generator, runs=runs, seed=HELD_OUT_SEED))]  # fmt: skip


def with_held_out_check(plan, parts: Sequence[FitParts], goal: ForecastTarget, seeds: Sequence[int]):
    """The plan with its held-out relative error recorded (and whether it meets the bound, if one was asked)."""
    from invardiff.plan import Plan

    rel = relative_error(parts)
    per_run = np.sqrt(np.concatenate([p[0] for p in parts]) / np.concatenate([p[1] for p in parts]))
    held_out = {
        "runs": len(seeds),
        "seeds": [int(s) for s in seeds],
        "rel_err": rel,
        "rel_err_max_run": float(per_run.max()),
        "within_bound": None if goal.max_rel_error is None else bool(rel <= goal.max_rel_error),
    }
    return Plan.from_forecast(
        plan.signature,
        plan.forecast_schedule,
        target=plan.forecast["target"],
        modules=plan.modules,
        calibration={**plan.calibration, "held_out": held_out},
        created_at=plan.created_at,
    )


def candidate_errors(
    generator: Generator,
    requests: Sequence[Request],
    max_gap: int,
    *,
    targets: Sequence[str] = TARGETS,
    batch_size: int = 16,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Errors]:
    """{target: pooled candidate errors} over ``requests``; reusable across goals that need at most ``max_gap``."""
    from invardiff.forecast import pool_errors

    errors = {}
    for target in targets:
        parts = record_errors(
            generator, requests, target, max_gap, batch_size,
            on_batch=lambda done, total, t=target: say(f"{t} candidate errors: {done}/{total} runs"),
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
):
    """Forecast calibration in this process: record candidate errors per target, choose, check on held-out seeds.
    ``errors``: candidate errors from :func:`candidate_errors` on the same requests, to share across goals."""
    from pipelines.calibration import calibration_requests

    say = progress or (lambda _m: None)
    requests = list(requests or calibration_requests(generator, runs=8))
    signature = generator.signature()
    if errors is None:
        errors = candidate_errors(
            generator, requests, goal.record_gap(signature.num_inference_steps), targets=targets,
            batch_size=batch_size, say=say,
        )  # fmt: skip
    errors = {t: errors[t] for t in targets}
    gains = sampler_gains(generator)
    record = {
        "runs": len(requests),
        "inputs": [r.class_label if r.class_label is not None else r.prompt for r in requests],
        "seeds": [int(r.seed) for r in requests],
        "batch_size": batch_size,
    }
    plan = choose_plan(
        signature, goal, errors, gains, lambda p: measure_fit(generator, requests, p, batch_size),
        orders=orders, record=record, say=say,
    )  # fmt: skip
    if held_out:
        checks = held_out_requests(generator, held_out)
        plan = with_held_out_check(plan, measure_fit(generator, checks, plan, batch_size), goal, [r.seed for r in checks])
    return plan
