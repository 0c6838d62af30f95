"""Shadow samples: a seed-chosen fraction of a cached run generated again uncached, to measure its fidelity.

Pure functions and one small state machine, no Ray and no I/O, so the generation actors, the driver's drift
alarm, the report and the calibration refresh all agree on which rows are shadows and what a dB means:

    is_shadow(id, seed, fraction)        which rows: a hash of (id, seed), the same at any worker count or
                                         batch split, and nested (the 1 % rows are among the 5 % rows)
    fidelity(cached, reference, ...)     per-row PSNR / SSIM of the final images, rel err of the final sample
    mean_interval(values)                the mean and its Student-t confidence interval, for a sample size
    DriftAlarm                           trips once when the shadows' mean PSNR is confidently below a bound

PSNR and SSIM are `evaluation.fidelity`'s, as in the report and the benchmarks (one implementation).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The uniform value of a row is the first 8 bytes of this hash; 2**64 of them span [0, 1).
_HASH_SPACE = float(2**64)
# Identical images have an infinite PSNR; evaluation.fidelity caps them at this (the paper's protocol), and a
# capped value keeps means and intervals finite.
IDENTICAL_PSNR_DB = 100.0


def shadow_value(row_id: str, seed: int) -> float:
    """A row's uniform value in [0, 1): a row is a shadow when its value is below the fraction."""
    digest = hashlib.sha256(f"invardiff-shadow\0{row_id}\0{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_SPACE


def is_shadow(row_id: str, seed: int, fraction: float) -> bool:
    """Whether the row (id, seed) is generated again uncached under a shadow fraction in [0, 1]."""
    return fraction > 0 and shadow_value(row_id, seed) < fraction


def check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"--shadow must be a fraction in [0, 1], got {fraction!r}")
    return float(fraction)


@dataclass(frozen=True)
class RowFidelity:
    psnr: float  # dB, IDENTICAL_PSNR_DB for identical images
    ssim: float
    rel_err: float  # ||x - x_ref|| / ||x_ref|| of this row's final sampler output


def fidelity(cached: np.ndarray, reference: np.ndarray, cached_final, reference_final) -> list[RowFidelity]:
    """Per-row fidelity of cached uint8 images (B, H, W, C) to the uncached ones of the same requests, and of
    the sampler's final outputs (B, ...) before decoding."""
    from evaluation import fidelity as metrics

    cached, reference = np.asarray(cached), np.asarray(reference)
    if cached.shape != reference.shape:
        raise ValueError(f"cached and reference images differ in shape: {cached.shape} vs {reference.shape}")
    psnrs = metrics.psnr(reference, cached)
    ssims = metrics.ssim(reference, cached)
    rel = [metrics.relative_error(x[None], r[None]) for x, r in zip(cached_final, reference_final)]
    return [RowFidelity(float(p), float(s), float(e)) for p, s, e in zip(psnrs, ssims, rel)]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    count: int
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval | None:
    """The mean of `values` and its two-sided Student-t confidence interval (None for no value; an unbounded
    interval for one). Shadow rows are a hash-chosen random sample of the run, so the interval says how far
    the run's true mean fidelity may lie from the shadows' for this many shadows."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return None
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, -math.inf, math.inf, 1, confidence)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x), confidence)


@dataclass
class DriftAlarm:
    """Trips once when the shadows seen so far put the run's mean PSNR below `min_psnr` with one-sided
    `confidence` (the upper end of the interval is under the bound), after at least `min_rows` shadows.
    A noisy early shadow cannot trip it; a plan whose fidelity really fell will, as shadows accumulate."""

    min_psnr: float
    min_rows: int = 8
    confidence: float = 0.95
    values: list[float] | None = None
    tripped: Interval | None = None

    def add(self, psnrs: Sequence[float]) -> bool:
        """Count more shadow PSNRs; True exactly once, when this call trips the alarm."""
        self.values = (self.values or []) + [min(float(p), IDENTICAL_PSNR_DB) for p in psnrs]
        if self.tripped is not None or len(self.values) < self.min_rows:
            return False
        # A one-sided bound at `confidence` is the upper end of the two-sided interval at 2 * confidence - 1.
        interval = mean_interval(self.values, 2 * self.confidence - 1)
        if interval is not None and interval.high < self.min_psnr:
            self.tripped = interval
            return True
        return False

    def describe(self) -> str:
        interval = self.tripped
        if interval is None:
            return "no drift"
        return (f"shadow fidelity {interval.mean:.2f} dB mean PSNR over {interval.count} shadow rows (at most "
                f"{interval.high:.2f} dB at {self.confidence:.0%} confidence) is below --min-psnr {self.min_psnr:g}")


# ----------------------------------------------------------------------------------------------------
# Generating the shadows of a batch (on the actor that generated it)


def shadow_rows(generator, requests, cached, policy, fraction: float, keep_images: bool = False) -> list[dict]:
    """The shadow columns of each row of a batch generated under `policy` (`cached`, a pipelines.runner.BatchRun):
    the batch's shadow rows are generated again, uncached, as one batch of their own on the same generator, and
    compared with their cached images; other rows get no columns (nulls in the output).

    The policy is detached for the shadow batch and attached again after it, even on error. Each row is seeded
    on its own, so a shadow image does not depend on its batch mates (up to float rounding)."""
    from invardiff.policy import NoCache
    from pipelines.runner import run_batch

    picked = [i for i, r in enumerate(requests) if is_shadow(r.id, r.seed, fraction)]
    columns: list[dict] = [{} for _ in requests]
    if not picked:
        return columns
    uncached = NoCache()
    policy.detach(generator.transformer)
    try:
        uncached.attach(generator.transformer)
        try:
            shadow = run_batch(generator, [requests[i] for i in picked], uncached)
        finally:
            uncached.detach(generator.transformer)
    finally:
        policy.attach(generator.transformer)
    measured = fidelity(cached.result.images[picked], shadow.result.images,
                        cached.result.final[picked], shadow.result.final)
    for index, row, metrics in zip(picked, shadow.rows, measured):
        columns[index] = dict(shadow_psnr=metrics.psnr, shadow_ssim=metrics.ssim, shadow_rel_err=metrics.rel_err,
                              shadow_latency_s=row["latency_s"])
        if keep_images:
            columns[index]["shadow_png"] = row["png"]
    return columns


# ----------------------------------------------------------------------------------------------------
# Comparing plans on a held-out shadow set (the calibration refresh's quality gate)


def plan_psnrs(generator, requests, plans) -> list[list[float]]:
    """Per plan, the PSNR of each request's image under it to the same request generated uncached (one uncached
    batch, shared by the plans)."""
    from invardiff.policies import policy_from_json
    from invardiff.policy import NoCache

    def generate(policy):
        policy.attach(generator.transformer)
        policy.reset(generator.transformer)
        try:
            return generator.generate(requests)
        finally:
            policy.reset(generator.transformer)
            policy.detach(generator.transformer)

    reference = generate(NoCache())
    out = []
    for plan in plans:
        cached = generate(policy_from_json(plan.to_json(), num_steps=generator.num_inference_steps))
        out.append([r.psnr for r in fidelity(cached.images, reference.images, cached.final, reference.final)])
    return out


@dataclass(frozen=True)
class PlanFidelity:
    """Two plans' PSNR to uncached on the same held-out requests: the means, and the paired change."""

    runs: int
    current_psnr: float
    candidate_psnr: float
    change: Interval  # candidate - current, per request, with its 95 % interval

    @property
    def drop(self) -> float:
        return self.current_psnr - self.candidate_psnr


def compare_fidelity(current: Sequence[float], candidate: Sequence[float]) -> PlanFidelity:
    a = np.minimum(np.asarray(current, float), IDENTICAL_PSNR_DB)
    b = np.minimum(np.asarray(candidate, float), IDENTICAL_PSNR_DB)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"need the same held-out requests under both plans, got {a.shape} and {b.shape}")
    return PlanFidelity(len(a), float(a.mean()), float(b.mean()), mean_interval(b - a))
