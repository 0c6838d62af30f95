"""Forecast presets calibrated the way the benchmarks do it: what the calibration measures on the model (candidate
errors, propagation gains) is recorded once on a set of calibration runs and shared by every preset, since a
preset only picks a speedup budget from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class ForecastEvidence:
    """The calibration runs and what was measured on them, independent of any speedup goal."""

    requests: list
    errors: dict[str, Any]  # {target: pooled candidate errors}
    gains: np.ndarray  # propagation gains, per step


def measure_forecast_evidence(generator, runs: int, say: Callable[[str], None] = lambda _m: None) -> ForecastEvidence:
    """Candidate errors on `runs` calibration runs (calibration seeds, disjoint from the evaluated ones), recorded
    up to runs of `RECORD_MAX_GAP_FOR_BOUND` gated steps so every budget can use them, and the propagation gains on
    the first `PROPAGATION_RUNS` of them."""
    from pipelines.calibration import calibration_requests
    from pipelines.forecast_calibration import (
        PROPAGATION_RUNS,
        RECORD_MAX_GAP_FOR_BOUND,
        candidate_errors,
        propagation_gains,
    )

    requests = calibration_requests(generator, runs=runs)
    say(f"forecast candidate errors on {len(requests)} runs")
    errors = candidate_errors(generator, requests, RECORD_MAX_GAP_FOR_BOUND, say=say)
    say("propagation gains")
    gains = propagation_gains(generator, requests[:PROPAGATION_RUNS])
    return ForecastEvidence(requests, errors, gains)


def calibrate_forecast_preset(generator, name: str, evidence: ForecastEvidence, **options):
    """The plan of forecast preset `name` (its speedup from `invardiff.presets.FORECAST_PRESETS`) on `evidence`;
    `options` go to `pipelines.forecast_calibration.calibrate_forecast` (e.g. `held_out`)."""
    from invardiff.presets import FORECAST_PRESETS
    from pipelines.forecast_calibration import ForecastTarget, calibrate_forecast

    goal = ForecastTarget(speedup=FORECAST_PRESETS[name], name=name)
    return calibrate_forecast(
        generator, goal, evidence.requests, errors=evidence.errors, gains=evidence.gains, **options
    )
