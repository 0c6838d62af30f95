"""Calibrate an InvarDiff plan on a generator: uncached runs in, a validated plan out.

The math lives in `invardiff.calibration` (pure) and the measuring in `invardiff.recorder` (hooks); this module
only runs the sampler on the calibration inputs and hands the per-run rates over. The distributed job splits
the same `record_rates` calls across Ray workers and pools their per-run arrays exactly as `calibrate` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np

from pipelines.base import Generator, Request

# Diverse prompts for text-to-image calibration: the paper's five plus three of other kinds.
CALIBRATION_PROMPTS = (
    "a raccoon wearing a priest robe",
    "a futuristic city at night, neon lights, rain",
    "an astronaut riding a horse on the moon",
    "watercolor painting of wildflowers in a meadow",
    "a lion at sunset in the savanna",
    "a bowl of ramen on a wooden table, studio photo",
    "an isometric pixel-art castle",
    "portrait of an old fisherman, dramatic lighting",
)

Rates = dict[str, np.ndarray]  # {"step": float64[R, T], family: float64[R, T, L]}


@dataclass(frozen=True)
class TauBundle:
    taus: dict[str, float]
    nonskip_rate: float
    name: str | None = None

    @classmethod
    def from_preset(cls, architecture: str, name: str) -> "TauBundle":
        from invardiff.presets import get_preset

        preset = get_preset(architecture, name)
        if "taus" not in preset:
            raise ValueError(f"preset {name!r} is a forecast target ({preset['target_speedup']}x), not a tau bundle")
        return cls(taus=preset["taus"], nonskip_rate=preset["nonskip_rate"], name=name)


def calibration_requests(generator: Generator, runs: int = 16, seed: int = 10_000) -> list[Request]:
    """`runs` calibration inputs: classes (or prompts) cycled, each with its own seed."""
    if runs < 1:
        raise ValueError(f"calibration needs at least one run, got {runs}")
    if generator.architecture == "flux":
        return [Request(f"cal-{i}", seed + i, prompt=CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)]) for i in range(runs)]
    # Spread the classes: a stride coprime with the class count visits every class before repeating.
    n = generator.num_classes
    stride = next(s for s in (7, 11, 13, 17, 1) if np.gcd(s, n) == 1)
    return [Request(f"cal-{i}", seed + i, class_label=(i * stride) % n) for i in range(runs)]


def record_rates(
    generator: Generator,
    requests: Sequence[Request],
    provisional=None,
    batch_size: int = 16,
    on_batch: Callable[[int, int], None] | None = None,
) -> Rates:
    """Per-run change rates of every stream over uncached runs of `requests` (phase 1, or phase 2 given the
    provisional books). Runs are batched; with batched CFG both halves of a run count toward it."""
    from invardiff.recorder import RateRecorder

    cfg_batched = generator.signature().guidance_mode == "cfg-batched"
    chunks: list[Rates] = []
    for start in range(0, len(requests), batch_size):
        batch = list(requests[start : start + batch_size])
        with RateRecorder(
            generator.transformer,
            num_steps=generator.num_inference_steps,
            provisional=provisional,
            cfg_batched=cfg_batched,
        ) as recorder:
            generator.generate(batch)
            chunks.append(recorder.rates())
        if on_batch:
            on_batch(start + len(batch), len(requests))
    return {name: np.concatenate([c[name] for c in chunks], axis=0) for name in chunks[0]}


def pool(per_run: Sequence[Rates]) -> Rates:
    """Per-run rates from several workers -> one set of per-run arrays (order does not matter for the mean)."""
    return {name: np.concatenate([r[name] for r in per_run], axis=0) for name in per_run[0]}


def mean_of(rates: Rates) -> dict[str, np.ndarray]:
    from invardiff.calibration import mean_rates

    return {name: mean_rates(values) for name, values in rates.items()}


def provisional_plan(rho_phase1: dict[str, np.ndarray], bundle: TauBundle, provisional_mode: str = "full"):
    from invardiff.calibration import provisional_books

    return provisional_books(rho_phase1, bundle.taus, bundle.nonskip_rate, provisional_mode=provisional_mode)


def build_plan(
    signature,
    rho_phase1: dict[str, np.ndarray],
    rho_phase2: dict[str, np.ndarray],
    bundle: TauBundle,
    requests: Sequence[Request],
    provisional_mode: str = "full",
    extra: dict | None = None,
):
    from invardiff.plan import Plan

    calibration = {
        "runs": len(requests),
        "phases": 2,
        "provisional_mode": provisional_mode,
        "rate": "paper",
        "preset": bundle.name,
        "inputs": [r.class_label if r.class_label is not None else r.prompt for r in requests],
        "seeds": [int(r.seed) for r in requests],
        **(extra or {}),
    }
    return Plan.from_rates(
        signature,
        rho_phase2,
        taus=bundle.taus,
        nonskip_rate=bundle.nonskip_rate,
        rho_phase1=rho_phase1,
        calibration=calibration,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    )


def calibrate(
    generator: Generator,
    bundle: TauBundle,
    requests: Sequence[Request] | None = None,
    *,
    batch_size: int = 16,
    provisional_mode: str = "full",
    phase1: Rates | None = None,
    progress: Callable[[str], None] | None = None,
    on_runs: Callable[[str, int, int], None] | None = None,
):
    """Two-phase calibration in this process. Pass `phase1` (per-run rates) to reuse phase 1 across tau
    bundles: it does not depend on the taus, phase 2 does. `on_runs(phase label, runs done, runs in phase)`
    is called after each batch (for a progress line; without it, `progress` gets a message per batch)."""
    requests = list(requests or calibration_requests(generator))
    say = progress or (lambda _msg: None)

    def batch_progress(phase):
        if on_runs is not None:
            return lambda done, total: on_runs(f"phase {phase}", done, total)
        return lambda done, total: say(f"phase {phase}: {done}/{total} runs")

    if phase1 is None:
        phase1 = record_rates(generator, requests, batch_size=batch_size, on_batch=batch_progress(1))
    rho1 = mean_of(phase1)
    p1 = provisional_plan(rho1, bundle, provisional_mode)
    phase2 = record_rates(generator, requests, provisional=p1, batch_size=batch_size, on_batch=batch_progress(2))
    return build_plan(generator.signature(), rho1, mean_of(phase2), bundle, requests, provisional_mode)
