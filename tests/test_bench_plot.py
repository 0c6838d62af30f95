"""The benchmark's Pareto plot: labels that do not overlap, and measurements that are noise shown as such."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from benchmarks.bench import noise_reasons, plot
from benchmarks.bench import _place_labels as place_labels


def row(method, kind, wall, ideal, psnr, spread=0.1, cpu=None):
    return dict(method=method, kind=kind, status="ok", psnr=psnr, wall_speedup=wall, cpu_speedup=cpu or wall,
                ideal_speedup=ideal, wall_speedup_min=wall * (1 - spread / 2), wall_speedup_max=wall * (1 + spread / 2))


ROWS = [
    row("uncached", "baseline", 1.0, 1.0, 60.0),
    row("invardiff-balanced", "invardiff", 2.0, 2.4, 31.0),
    row("invardiff-fast", "invardiff", 2.05, 2.6, 30.5),
    row("invardiff-tau-0.3", "invardiff-sweep", 2.02, 2.5, 30.8),
    row("FirstBlockCache-0.1", "diffusers", 2.01, 2.3, 30.9),
    row("TaylorSeer", "diffusers", 3.4, 3.0, 29.0),  # faster than its counted ideal: noise
    row("MagCache", "diffusers", 2.5, 2.8, 28.0, spread=0.9),  # rounds all over the place: noise
]


def test_noise_is_a_speedup_above_the_ideal_or_a_wide_spread():
    by_name = {r["method"]: r for r in ROWS}
    assert noise_reasons(by_name["TaylorSeer"], "wall_speedup") == ["above the ideal"]
    assert noise_reasons(by_name["MagCache"], "wall_speedup") == ["rounds spread 90%"]
    assert noise_reasons(by_name["MagCache"], "cpu_speedup") == []  # no per-round spread for CPU time
    assert noise_reasons(by_name["invardiff-fast"], "wall_speedup") == []
    assert noise_reasons(by_name["TaylorSeer"], "ideal_speedup") == []  # counted, not measured


def test_labels_of_clustered_points_do_not_overlap():
    figure = Figure(figsize=(7, 5))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    points = [(r["wall_speedup"], r["psnr"]) for r in ROWS[1:5]]  # four points within 0.05x and 0.5 dB
    ax.scatter(*zip(*points))
    boxes = place_labels(ax, points, [r["method"] for r in ROWS[1:5]], ["k"] * 4)
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_plot_writes_a_png(tmp_path):
    plot(ROWS, tmp_path / "pareto.png", title="test")
    with Image.open(tmp_path / "pareto.png") as image:
        assert image.format == "PNG" and image.width > 1000


def test_frechet_distance_is_hidden_below_a_meaningful_sample_size():
    from benchmarks.bench import FD_MIN_IMAGES, markdown

    env = dict(model="digits", steps=50, guidance_scale=1.5, dtype="float32", machine="m", torch="t", torch_threads=1,
               diffusers="d", cache_dit="c", date="today", seconds=1.0, command="bench", device="cpu")  # fmt: skip
    rows = [dict(r, module_evals=1, module_evals_uncached=2, ssim=0.9, ms_ssim=0.9, accuracy=0.95, fd=12.345,
                 peak_memory_mib=1.0, lpips="skipped", fid="skipped") for r in ROWS]  # fmt: skip

    def table(images):
        return markdown({"environment": env, "config": {"images": images, "batch_size": 8, "warmup_batch": 4},
                         "rows": rows})  # fmt: skip

    assert "12.35" not in table(40) and "| 0.950 | – |" in table(40)
    assert "| 0.950 | 12.35 |" in table(FD_MIN_IMAGES)
