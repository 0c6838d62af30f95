"""Human-facing views of a plan: the text of ``invardiff plan show`` and heatmaps like the paper's Fig. 4."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from invardiff.calibration import STEP, bits, effective_modules, quantile_threshold, reuse_share
from invardiff.plan import Plan

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Plan cells: 0 = compute, 1 = reused because the whole step is gated, 2 = reused layer-wise in a computed step.
_PLAN_COLORS = ["#f4f4f4", "#9cb9e0", "#1f4e9c"]
# Rates outside the colour scale (2nd-98th percentile) are drawn in colours viridis does not use, not as its ends.
_BELOW_SCALE, _ABOVE_SCALE = "#000000", "#ff4fa3"


def format_plan(plan: Plan, *, show_modules: bool = False) -> str:
    """The text of ``invardiff plan show``; ``show_modules`` adds every family's (step x layer) bit grid."""
    sig, summary = plan.signature, plan.summary()
    taus = "  ".join(f"{name} {tau:g}" for name, tau in summary["taus"].items())
    lines = [
        f"plan        {plan.plan_id}  ({plan.format}, {plan.mode} mode, created {plan.created_at})",
        f"pipeline    {sig.architecture}  {sig.model_id!r}  {sig.model_fingerprint}",
        f"            {sig.scheduler}, {sig.num_inference_steps} steps, {sig.height}x{sig.width}, "
        f"guidance {sig.guidance_mode} {sig.guidance_scale:g}, {sig.dtype}",
        f"taus        {taus}",
        f"nonskip     {plan.nonskip_rate:g} -> the first {summary['warmup_steps']} step(s) always compute",
        f"step gate   {summary['gated_steps']}/{summary['steps']} steps gated, "
        f"longest gated run {summary['longest_gated_run']}",
        f"            {summary['step_gate']}",
    ]
    if plan.forecast is not None:
        forecast = plan.forecast
        lines.append(f"forecast    {forecast['target']}: gated steps filled from the last two computed steps; "
                     "orders ('-' computed, 0 copy, 1 linear)")  # fmt: skip
        lines.append(f"            {forecast['orders']}")
        held_out = plan.calibration.get("held_out")
        if held_out:
            lines.append(f"held-out    rel err {held_out['rel_err']:.4f} on {held_out['runs']} unseen seeds "
                         f"(worst run {held_out['rel_err_max_run']:.4f})")  # fmt: skip
    if plan.modules:
        width = max(len(family) for family in [*plan.modules, "attn&context_attn"])
        lines.append(f"reuse       {'family':<{width}}  layers   grid  non-gated rows")
        rows = dict(summary["reuse_share"])
        effective = effective_modules(plan.modules)
        if effective.keys() >= {"attn", "context_attn"}:
            # What the runtime really skips: the joint attention call needs both books to agree (§4.4).
            rows["attn&context_attn"] = reuse_share(plan.step_gate, {"joint": effective["attn"]})["joint"]
        for family, share in rows.items():
            layers = plan.modules[family].shape[1] if family in plan.modules else sig.layers["attn"]
            grid, partial = share["grid"], share["non_gated_rows"]
            lines.append(f"            {family:<{width}}  {layers:>6}  {grid:>5.1%}  {partial:>14.1%}")
    speedup = summary["ideal_speedup"]
    lines.append(f"speedup     {speedup:.2f}x ideal (counts module evaluations only: embeddings, norms, head are free)")
    if plan.calibration:
        lines.append(f"calibration {_describe_mapping(plan.calibration)}")
    recorded = [phase for phase in ("rho_phase1", "rho_phase2") if getattr(plan, phase) is not None]
    lines.append(f"rates       {', '.join(recorded) if recorded else 'not recorded'}")
    if show_modules:
        for family, book in plan.modules.items():
            lines.append(f"\nmodules.{family}  (rows = steps, columns = layers, 1 = reuse)")
            lines.extend(f"  {k:>4}  {bits(row)}" for k, row in enumerate(book))
    return "\n".join(lines)


def write_heatmaps(plan: Plan, out_dir: str | os.PathLike, *, dpi: int = 120) -> list[Path]:
    """Write ``rho_phase1.png``, ``rho_phase2.png`` (when recorded) and ``plan.png`` to ``out_dir``.

    Every figure has a step strip on top and one (layer x step) panel per family below, so the
    rates and the reuse decisions they led to can be laid side by side. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for phase in ("rho_phase1", "rho_phase2"):
        rho = getattr(plan, phase)
        if rho is not None:
            title = (
                f"{plan.plan_id}: {phase}, mean relative change rate\ngrey = placeholder or missing, "
                "black / pink = beyond the colour scale,\ndot = below the tau threshold (reused)"
            )
            written.append(_save(_rates_figure(rho, title, plan.taus), out_dir / f"{phase}.png", dpi))
    gated = plan.step_gate[:, None]
    panels = {STEP: plan.step_gate.astype(float)}
    panels.update({family: np.where(book, np.where(gated, 1.0, 2.0), 0.0) for family, book in plan.modules.items()})
    title = (
        f"{plan.plan_id}: plan, {int(plan.step_gate.sum())}/{plan.num_steps} steps gated "
        "(light = gated step, dark = layer-wise reuse, white = compute)"
    )
    figure = _panels_figure(panels, title, cmap=_PLAN_COLORS, vmin=0.0, vmax=2.0)
    written.append(_save(figure, out_dir / "plan.png", dpi))
    return written


def _rates_figure(rho: Mapping[str, np.ndarray], title: str, taus: Mapping[str, float] | None = None) -> Figure:
    """One panel per stream; a dot on every interior cell whose rate is below its family's tau threshold (the
    tau-quantile of its interior rates, what calibration thresholds), and the threshold in the panel's label."""
    panels, marks, labels = {}, {}, {}
    for name, values in rho.items():
        values = np.array(values, dtype=np.float64)
        tau = (taus or {}).get(name)
        if tau is not None:
            threshold = quantile_threshold(values, tau)
            below = np.zeros(values.shape, dtype=bool)
            below[1:-1] = values[1:-1] < threshold
            marks[name] = [(below, "o")]
            labels[name] = f"{name}\ntau {tau:g}\nrho < {threshold:.3g}"
        values[[0, -1]] = np.nan  # rows 0 and T-1 are placeholders (1.0), not measurements
        panels[name] = values
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in panels.values()])
    # A robust shared scale: rho is scale-free across families, and a few outliers would wash out the rest.
    low, high = np.percentile(finite, [2, 98]) if finite.size else (0.0, 2.0)
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    return _panels_figure(panels, title, cmap="viridis", vmin=float(low), vmax=float(high), colorbar="rho",
                          marks=marks, labels=labels)  # fmt: skip


def _panels_figure(
    panels: Mapping[str, np.ndarray],
    title: str,
    *,
    cmap: str | Sequence[str],  # a colormap name, or one color per integer value
    vmin: float,
    vmax: float,
    colorbar: str | None = None,
    marks: Mapping[str, Sequence[tuple[np.ndarray, str]]] | None = None,  # per panel: (cells, marker) overlays
    labels: Mapping[str, str] | None = None,  # per panel: its y label (default: the panel's name)
) -> Figure:
    # Imported here so `invardiff plan show` does not pay for matplotlib; Agg needs no display.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    num_steps = len(next(iter(panels.values())))
    heights = [1.0 if values.ndim == 1 else max(2.0, values.shape[1] / 6) for values in panels.values()]
    figure = Figure(figsize=(max(6.0, 0.16 * num_steps + 2.5), 0.9 + 0.45 * sum(heights)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    colormap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else ListedColormap(cmap)
    colormap = colormap.with_extremes(bad="#c8c8c8", under=_BELOW_SCALE, over=_ABOVE_SCALE)
    image = None
    for ax, (name, values) in zip(axes, panels.items(), strict=True):
        grid = values.T if values.ndim == 2 else values[None, :]  # layers up, steps across
        # Only missing is grey; +-inf (a rate that blew up or vanished) is beyond the scale like any outlier.
        grid = np.where(np.isposinf(grid), vmax + 1.0, np.where(np.isneginf(grid), vmin - 1.0, grid))
        grid = np.ma.masked_where(np.isnan(grid), grid)
        image = ax.imshow(
            grid, aspect="auto", interpolation="nearest", origin="lower", cmap=colormap, vmin=vmin, vmax=vmax
        )
        for cells, marker in (marks or {}).get(name, ()):
            cells = np.asarray(cells, dtype=bool)
            steps, layers = np.nonzero(cells if cells.ndim == 2 else cells[:, None])
            if marker == "o":  # a dot: white with a thin outline, visible on any colour
                ax.scatter(steps, layers, marker=marker, s=6, c="white", edgecolors="black", linewidths=0.3)
            else:  # a line marker (+, x) carries its meaning by shape
                ax.scatter(steps, layers, marker=marker, s=22, c="white", linewidths=1.2)
        default = name if values.ndim == 1 else f"{name}\nlayer"
        ax.set_ylabel((labels or {}).get(name, default), rotation=0, ha="right", va="center")
        if values.ndim == 1:
            ax.set_yticks([])
    axes[-1].set_xlabel("inference step (0 = noisiest)")
    figure.suptitle(title, fontsize="medium")
    if colorbar and image is not None:
        values = np.concatenate([v[np.isfinite(v)].ravel() for v in panels.values()])
        below, above = bool((values < vmin).any()), bool((values > vmax).any())
        extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
        figure.colorbar(image, ax=list(axes), label=colorbar, shrink=0.9, extend=extend[below, above])
    return figure


def _save(figure: Figure, path: Path, dpi: int) -> Path:
    figure.savefig(path, dpi=dpi)
    return path


def _describe_mapping(values: Mapping[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            value = f"[{len(value)} items]"
        elif isinstance(value, Mapping):
            value = f"{{{len(value)} keys}}"
        parts.append(f"{key}={value}")
    return " ".join(parts)
