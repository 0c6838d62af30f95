"""What the plan heatmaps, the drift plot and the sample grid show beyond colour."""

from __future__ import annotations

import numpy as np
from test_plan import CREATED_AT, make_rates, make_signature

from invardiff.calibration import quantile_threshold
from invardiff.plan import Plan
from invardiff.plan_report import _rates_figure

TAUS = {"step": 0.4, "attn": 0.3, "ff": 0.3}


def plan_from(seed: int) -> Plan:
    return Plan.from_rates(make_signature(), make_rates(seed), taus=TAUS, nonskip_rate=0.0, created_at=CREATED_AT)


def marked_cells(ax) -> set[tuple[int, int]]:
    return {(int(x), int(y)) for collection in ax.collections for x, y in collection.get_offsets()}


def test_rho_heatmap_marks_cells_below_the_tau_threshold_and_values_beyond_its_scale():
    rho = make_rates(2)
    figure = _rates_figure(rho, "test", TAUS)
    axes = {ax.get_ylabel().split("\n")[0]: ax for ax in figure.axes if ax.get_ylabel()}
    for name, values in rho.items():
        threshold = quantile_threshold(values, TAUS[name])
        steps, layers = np.nonzero((values if values.ndim == 2 else values[:, None])[1:-1] < threshold)
        assert marked_cells(axes[name]) == {(int(s) + 1, int(l)) for s, l in zip(steps, layers)}
        assert f"tau {TAUS[name]:g}" in axes[name].get_ylabel() and f"rho < {threshold:.3g}" in axes[name].get_ylabel()
    # The rates hold outliers (and +-inf) beyond both ends of the 2nd-98th percentile scale: drawn in colours
    # of their own, and the colour bar says so with arrows at both ends.
    image = axes["ff"].images[0]
    assert tuple(image.cmap.get_under()) != tuple(image.cmap(0.0)) and tuple(image.cmap.get_over()) != tuple(image.cmap(1.0))
    assert image.colorbar.extend == "both"


def test_drift_plot_marks_new_and_old_only_cells_with_shapes(monkeypatch):
    import jobs.drift as drift
    from invardiff import plan_report

    figures = []
    original = plan_report._panels_figure
    monkeypatch.setattr(plan_report, "_panels_figure", lambda *a, **k: figures.append(original(*a, **k)) or figures[-1])
    old, new = plan_from(2), plan_from(3)
    assert drift.drift_png(old, new)[:4] == b"\x89PNG"
    panels = dict(zip(["step", *new.modules], figures[0].axes))
    cells = drift.difference_cells(old.step_gate, new.step_gate)
    marks = {c.get_paths()[0].vertices.tobytes(): {int(x) for x, _ in c.get_offsets()} for c in panels["step"].collections}
    assert len(marks) == 2  # two different shapes
    assert sorted(map(sorted, marks.values())) == sorted(
        [np.flatnonzero(cells == 2).tolist(), np.flatnonzero(cells == 3).tolist()]
    )
    assert "blue + = new only, orange x = old only" in figures[0].get_suptitle()
    assert "green" not in drift.drift_markdown(drift.compare_plans(old, new), key="k", promoted=True, reasons=[],
                                               png_name="d.png")  # fmt: skip


def test_sample_grid_labels_each_row():
    from benchmarks.sample_grid import grid, label_rows

    images = np.full((20, 16, 16, 1), 255, np.uint8)  # white images: any dark pixel in the margin is a label
    canvas = grid(images, rows=10)
    labelled = label_rows(canvas, [f"class {c}" for c in range(10)], "uncached")
    margin = labelled.shape[1] - canvas.shape[1]
    assert margin > 0 and labelled.shape[0] > canvas.shape[0]
    header = labelled.shape[0] - canvas.shape[0]
    row_height = (canvas.shape[0] - 2) // 10
    for row in range(10):
        band = labelled[header + 2 + row * row_height : header + (row + 1) * row_height, :margin]
        assert (band < 128).any(), f"row {row} has no label"
    assert (labelled[:header] < 128).any()  # the title
