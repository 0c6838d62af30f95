"""How far a freshly calibrated plan moved from the one in service: pure numbers, then a Markdown + PNG report.

The math functions take arrays and return numbers, so they are tested without Ray, I/O or a model. The nightly
refresh (`jobs/calibrate.py`) gates promotion on :class:`DriftGate` and stores the report next to the new plan:
how far the plans moved (Jaccard, ideal speedup) and, measured on the workers, how far their fidelity moved
(both plans against uncached on held-out shadow requests, pipelines/shadow.py).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from invardiff.calibration import STEP, bits, effective_modules, ideal_speedup
from pipelines.shadow import PlanFidelity

# --------------------------------------------------------------------------------------------------
# Pure math


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a AND b| / |a OR b| of two boolean masks of one shape. Two empty masks are identical: 1.0."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def family_jaccard(
    old_gate: np.ndarray, old_modules: Mapping[str, np.ndarray], new_gate: np.ndarray, new_modules: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Jaccard of the step gate and of every family's reuse book, on what the runtime executes
    (FLUX's joint attention is the AND of two books)."""
    if set(old_modules) != set(new_modules):
        raise ValueError(f"plans have different families: {sorted(old_modules)} vs {sorted(new_modules)}")
    old_eff, new_eff = effective_modules(old_modules), effective_modules(new_modules)
    return {STEP: jaccard(old_gate, new_gate), **{f: jaccard(old_eff[f], new_eff[f]) for f in old_modules}}


def gate_changes(old_gate: np.ndarray, new_gate: np.ndarray) -> tuple[list[int], list[int]]:
    """(steps gated only in the new plan, steps gated only in the old one)."""
    old_gate, new_gate = np.asarray(old_gate, dtype=bool), np.asarray(new_gate, dtype=bool)
    if old_gate.shape != new_gate.shape:
        raise ValueError(f"step gates differ in length: {old_gate.shape} vs {new_gate.shape}")
    return np.flatnonzero(new_gate & ~old_gate).tolist(), np.flatnonzero(old_gate & ~new_gate).tolist()


def rho_drift(old_rho: Mapping[str, np.ndarray], new_rho: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per stream, mean and max |new - old| of the rates over interior rows 1..T-2 (rows 0 and T-1 are
    placeholders); NaN (absent modules) is ignored. Streams with no finite entry get NaN."""
    drift = {}
    for name in old_rho:
        if name not in new_rho:
            continue
        old, new = np.asarray(old_rho[name], np.float64)[1:-1], np.asarray(new_rho[name], np.float64)[1:-1]
        if old.shape != new.shape:
            raise ValueError(f"rho[{name}]: shapes differ, {old.shape} vs {new.shape}")
        with np.errstate(invalid="ignore"):  # inf - inf, like NaN, is a rate with no value: dropped next
            diff = np.abs(new - old)
        diff = diff[np.isfinite(diff)]
        drift[name] = {
            "mean_abs": float(diff.mean()) if diff.size else math.nan,
            "max_abs": float(diff.max()) if diff.size else math.nan,
        }
    return drift


def speedup_change(old_speedup: float, new_speedup: float) -> float:
    """Relative change of the ideal speedup, (new - old) / old."""
    if not old_speedup or not math.isfinite(old_speedup):
        return math.inf if new_speedup != old_speedup else 0.0
    return (new_speedup - old_speedup) / old_speedup


# --------------------------------------------------------------------------------------------------
# Comparing two plans


@dataclass(frozen=True)
class Drift:
    old_plan_id: str
    new_plan_id: str
    jaccard: dict[str, float]  # {"step": J, family: J}
    gates_added: list[int]
    gates_removed: list[int]
    rho: dict[str, dict[str, float]]  # phase-2 (final) rates: {stream: {"mean_abs", "max_abs"}}
    speedup_old: float
    speedup_new: float
    taus_changed: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Measured, not derived from the plans: both plans against uncached on held-out requests (refresh only).
    fidelity: PlanFidelity | None = None

    @property
    def min_jaccard(self) -> float:
        return min(self.jaccard.values())

    @property
    def speedup_change(self) -> float:
        return speedup_change(self.speedup_old, self.speedup_new)


def compare_plans(old, new) -> Drift:
    """Drift from plan ``old`` to plan ``new`` (invardiff.plan.Plan objects for one signature)."""
    old.check_compatible(new.signature)
    taus = {k: (old.taus[k], new.taus[k]) for k in new.taus if old.taus.get(k) != new.taus[k]}
    added, removed = gate_changes(old.step_gate, new.step_gate)
    old_rho = old.rho_phase2 or {}
    new_rho = new.rho_phase2 or {}
    return Drift(
        old_plan_id=old.plan_id,
        new_plan_id=new.plan_id,
        jaccard=family_jaccard(old.step_gate, old.modules, new.step_gate, new.modules),
        gates_added=added,
        gates_removed=removed,
        rho=rho_drift(old_rho, new_rho),
        speedup_old=ideal_speedup(old.step_gate, old.modules),
        speedup_new=ideal_speedup(new.step_gate, new.modules),
        taus_changed=taus,
    )


@dataclass(frozen=True)
class DriftGate:
    """When a refreshed plan may replace the one in service. Defaults tolerate the seed-to-seed variation of a
    16-run calibration (BENCHMARKS.md §4) and catch a plan that moved wholesale."""

    min_jaccard: float = 0.6  # every family and the step gate
    max_speedup_change: float = 0.25  # relative, either direction
    # Largest fall of the held-out mean PSNR to uncached, candidate vs current plan, in dB; None: not measured.
    # (`calibrate --refresh` measures it by default: --max-psnr-drop.)
    max_psnr_drop: float | None = None
    quality_runs: int = 8  # held-out requests the fidelity is measured on

    def reasons(self, drift: Drift) -> list[str]:
        """Why ``drift`` is out of bounds; empty when it may be promoted."""
        why = []
        for name, value in drift.jaccard.items():
            if value < self.min_jaccard:
                why.append(f"Jaccard of {name} reuse {value:.3f} < --min-jaccard {self.min_jaccard:g}")
        change = drift.speedup_change
        if abs(change) > self.max_speedup_change:
            why.append(
                f"ideal speedup {drift.speedup_old:.2f}x -> {drift.speedup_new:.2f}x ({change:+.1%}) exceeds "
                f"--max-speedup-change {self.max_speedup_change:g}"
            )
        quality = drift.fidelity
        if self.max_psnr_drop is not None and quality is not None and quality.drop > self.max_psnr_drop:
            why.append(
                f"held-out mean PSNR to uncached {quality.current_psnr:.2f} dB -> {quality.candidate_psnr:.2f} dB "
                f"(-{quality.drop:.2f} dB on {quality.runs} runs) exceeds --max-psnr-drop {self.max_psnr_drop:g}"
            )
        return why


# --------------------------------------------------------------------------------------------------
# Report


def drift_markdown(drift: Drift, *, key: str, promoted: bool, reasons: list[str], png_name: str | None) -> str:
    verdict = "promoted to latest" if promoted else "NOT promoted; the previous plan stays latest"
    lines = [
        f"# Plan drift: {drift.old_plan_id} -> {drift.new_plan_id}",
        "",
        f"- store key: `{key}`",
        f"- decision: **{verdict}**",
    ]
    lines += [f"  - {reason}" for reason in reasons]
    lines += [
        f"- ideal speedup: {drift.speedup_old:.3f}x -> {drift.speedup_new:.3f}x ({drift.speedup_change:+.1%})",
        f"- gated steps added: {drift.gates_added or 'none'}; removed: {drift.gates_removed or 'none'}",
    ]
    if drift.fidelity is not None:
        quality = drift.fidelity
        lines.append(
            f"- measured fidelity (shadow set: {quality.runs} held-out runs, mean PSNR to uncached): "
            f"{quality.current_psnr:.2f} dB -> {quality.candidate_psnr:.2f} dB, change {quality.change.mean:+.2f} dB "
            f"(95% interval {quality.change.low:+.2f} to {quality.change.high:+.2f})"
        )
    if drift.taus_changed:
        changed = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in drift.taus_changed.items())
        lines.append(f"- taus changed: {changed} (drift then reflects the new taus, not only new statistics)")
    lines += ["", "| stream | Jaccard of reuse | mean abs rho drift | max abs rho drift |", "|---|---|---|---|"]
    for name, value in drift.jaccard.items():
        rho = drift.rho.get(name, {})
        lines.append(
            f"| {name} | {value:.3f} | {rho.get('mean_abs', math.nan):.4g} | {rho.get('max_abs', math.nan):.4g} |"
        )
    lines += ["", "Rates are the final (phase-2, corrected) means over the calibration runs, interior steps only."]
    if png_name:
        lines += ["", f"![reuse difference]({png_name})", "",
                  ("Cells: white = compute in both, grey = reuse in both, blue with + = reuse only in the new "
                   "plan, orange with x = reuse only in the old plan.")]
    return "\n".join(lines) + "\n"


# 0 = compute in both, 1 = reuse in both, 2 = new only, 3 = old only. Blue and orange stay apart under the
# common colour-vision deficiencies; the + / x marks say the same without colour.
_DIFF_COLORS = ["#f4f4f4", "#a0a0a0", "#2b6cb0", "#dd8452"]
_DIFF_MARKS = ((2.0, "+"), (3.0, "x"))


def difference_cells(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    old, new = np.asarray(old, dtype=bool), np.asarray(new, dtype=bool)
    return np.where(old & new, 1.0, np.where(new, 2.0, np.where(old, 3.0, 0.0)))


def drift_png(old, new, *, dpi: int = 110) -> bytes:
    """PNG of the reuse difference between two plans: step strip on top, one (layer x step) panel per family."""
    from invardiff.plan_report import (
        _panels_figure,  # the same layout as `plan show` heatmaps
    )

    old_eff, new_eff = effective_modules(old.modules), effective_modules(new.modules)
    panels = {STEP: difference_cells(old.step_gate, new.step_gate)}
    panels.update({f: difference_cells(old_eff[f], new_eff[f]) for f in new.modules})
    marks = {name: [(cells == value, marker) for value, marker in _DIFF_MARKS] for name, cells in panels.items()}
    title = (
        f"reuse {old.plan_id} (old) -> {new.plan_id} (new)\n"
        f"old gate {bits(old.step_gate)}\nnew gate {bits(new.step_gate)}\n"
        "grey = both reuse, blue + = new only, orange x = old only, white = both compute"
    )
    figure = _panels_figure(panels, title, cmap=_DIFF_COLORS, vmin=0.0, vmax=3.0, marks=marks)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
