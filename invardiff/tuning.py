"""Tuning a forecast plan to a goal: the choices calibration makes from measured errors and whole runs.

Model-agnostic: what touches a model arrives as callables or arrays, so the project's generators
(`pipelines.forecast_calibration`, the Ray job in `jobs.calibrate`) and `invardiff.calibrate` on a user's own
diffusers pipeline share one implementation.

* :class:`ForecastTarget`: a counted speedup, or the largest speedup within a relative-error bound.
* :func:`propagation_gains`: how much an output error at each step grows by the end of sampling (the DP's weights).
* :func:`choose_plan`: at a budget, the DP and the uniform schedule per forecast target, judged by the relative
  error of whole cached runs on the calibration inputs; for a bound, a binary search over the budget.
* :func:`with_held_out_check`: the plan with its relative error on held-out seeds recorded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

TARGETS = ("residual", "modules")
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
        from .forecast import DEFAULT_MAX_GAP, computed_steps_for, min_max_gap

        if self.speedup is None:
            return RECORD_MAX_GAP_FOR_BOUND
        return max(DEFAULT_MAX_GAP, min_max_gap(num_steps, computed_steps_for(num_steps, self.speedup)))


def sampler_gains(scheduler, num_steps: int) -> np.ndarray:
    """Per step, ``d x_{k+1} / d output`` of the sampler step (a scalar for DDIM with eta 0 and for flow-matching
    Euler), so candidate errors in model-output space become errors of the next sampler state. DDIM is probed on a
    copy; a flow-matching scheduler is read from the sigmas its last generation set. Other samplers (multistep
    solvers mix earlier outputs in) get 1: the error is then taken on the model output itself."""
    if scheduler is not None and type(scheduler).__name__ == "DDIMScheduler":
        import torch

        probe = copy.deepcopy(scheduler)
        probe.set_timesteps(num_steps, device="cpu")
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        return np.array([float(probe.step(one, t, zero, eta=0.0).prev_sample) for t in probe.timesteps])
    sigmas = getattr(scheduler, "sigmas", None)
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and sigmas is not None and len(sigmas) == num_steps + 1:
        return np.abs(np.diff(np.asarray(sigmas, dtype=np.float64)))
    return np.ones(num_steps)


# Modules-mode forecasts are chosen over residual-mode ones only when their calibration error is this much lower.
MODULES_MARGIN = 0.9
PROPAGATION_RUNS = 4  # calibration runs the propagation gains are measured on (one generation per step each)


def propagation_gains(
    transformer,
    run: Callable[[], object],
    num_steps: int,
    *,
    cfg_batched: bool = False,
    output_channels: int | None = None,
    relative: float = 1e-3,
    on_step: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Per step k, how much an error in the guided model output at step k grows by the end of sampling:
    ``sqrt(||x_final' - x_final||^2 / ||delta||^2)`` for a small random ``delta`` added to step k's output.
    ``run()`` generates the same batch once, uncached, and returns its final sample; it is called ``num_steps + 1``
    times. Used as the DP's error weights, they charge a candidate for the error it leaves in the final sample:
    an error early in sampling is damped or amplified by the steps after it, which the next-state error misses
    (BENCHMARKS.md section 7: +1 to +2.5 dB at 2-3x over next-state weights on the digits model)."""
    import torch

    reference = torch.as_tensor(run()).double()
    gains = np.zeros(num_steps)
    for k in range(num_steps):
        state = {"call": 0, "energy": 0.0}

        def perturb(_module, _args, output, k=k, state=state):
            if state["call"] == k:
                out = output.sample if hasattr(output, "sample") else output[0]
                target = out[:, :output_channels] if output_channels is not None else out
                half = target[: target.shape[0] // 2] if cfg_batched else target
                noise = torch.randn(half.shape, generator=torch.Generator().manual_seed(k)).to(half)
                noise = noise * (relative * float(half.double().std()))
                # The same noise on both CFG halves is exactly that noise on the guided output.
                target.add_(torch.cat([noise, noise]) if cfg_batched else noise)
                state["energy"] = float((noise.double() ** 2).sum())
            state["call"] += 1

        handle = transformer.register_forward_hook(perturb)
        try:
            final = torch.as_tensor(run()).double()
        finally:
            handle.remove()
        gains[k] = math.sqrt(float(((final - reference) ** 2).sum()) / state["energy"]) if state["energy"] else 0.0
        if on_step is not None:
            on_step(k + 1, num_steps)
    return gains


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
    (placed by summed candidate error) and the uniform one; per target the placement with the lower relative error
    on the calibration runs wins, and the modules target beats the cheaper residual one only by a clear margin. The DP minimises one-step errors on the true trajectory and cannot see how an
    error propagates, so it is checked against the uniform baseline on whole runs rather than trusted alone.
    For an error bound, the fewest computed steps that meet it (binary search; relative error falls as computed
    steps are added, and the search checks each point it visits)."""
    from .forecast import (
        DEFAULT_MAX_GAP,
        choose_schedule,
        computed_steps_for,
        min_max_gap,
        schedule_error,
        uniform_schedule,
    )
    from .plan import Plan

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
        best = {}
        for key, row in rows.items():  # per target, the better placement
            target = key.split("/")[0]
            if target not in best or row["rel_err"] < rows[best[target]]["rel_err"]:
                best[target] = key
        if "residual" in best and "modules" in best:
            # Equal counted work, unequal real work: a residual-forecast step runs only the embedding and the head,
            # a modules-forecast step still runs every block's norms, modulation and gates. Take modules only for a
            # clearly lower error.
            residual, modules = rows[best["residual"]]["rel_err"], rows[best["modules"]]["rel_err"]
            return best["modules"] if modules < MODULES_MARGIN * residual else best["residual"]
        return next(iter(best.values()))

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
        "error": "squared error of the guided model output at the gated step, summed over calibration runs, times "
        "the squared per-step gain (weighting: final = growth to the final sample, step = the next sampler state)",
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


def with_held_out_check(plan, parts: Sequence[FitParts], goal: ForecastTarget, seeds: Sequence[int]):
    """The plan with its held-out relative error recorded (and whether it meets the bound, if one was asked)."""
    from .plan import Plan

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
