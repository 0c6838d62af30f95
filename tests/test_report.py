"""The cost-per-image report, on a small synthetic run whose numbers are worked out by hand below.

The run: 6 rows on 2 nodes with 2 GPU types, one error row, real PNGs (flat gray images, so that PSNR
and SSIM against the baseline have closed forms).

    id  node    device  latency_s  batch  finished  error  steps   module evals  gray (baseline gray)
    r1  node-a  H100    1.5        2      +10 s     -      20/50   200/1000      100 (100)
    r2  node-a  H100    1.5        2      +10 s     -      30/50   300/1000      110 (105)
    r3  node-a  H100    1.0        2      +20 s     -      25/50   250/1000      120 (130)
    r4  node-a  H100    1.0        2      +20 s     OOM    0/50    0/1000        -   (125)
    r5  node-b  L4      4.0        1      +12 s     -      50/50   1000/1000     130 (130)
    r6  node-b  L4      2.0        1      +30 s     -      25/50   250/1000      140 (144)

Prices: H100 3.60 $/h = 0.001 $/s, L4 0.72 $/h = 0.0002 $/s.
  device time 11 s (H100 5 s incl. the error row, L4 6 s); cost 0.005 + 0.0012 = $0.0062; 5 images
  -> $0.00124 per image; H100 $0.005 / 3 images = $0.00167, L4 $0.0012 / 2 = $0.0006.
  wall time: first start r1/r2 at 10 - 1.5 x 2 = +7 s, last finish +30 s -> 23 s; 5/23 images/s.
  steps 150 of 250 computed (40% reused); module evaluations 2000 of 5000 (60% reused).
Baseline (policy none, every latency doubled, r4 succeeded): ids r1 r2 r3 r5 r6 match;
  device time 20 s vs 10 s -> 2.00x; cost 0.0104 vs 0.0052 -> 0.50x.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from jobs.report import (
    REQUIRED_COLUMNS,
    ReportInputError,
    build_report,
    load_prices,
    parse_price_override,
    price_key_for,
    psnr,
    report_command,
    ssim,
)

PRICES = {"H100": 3.6, "L4": 0.72, "cpu": 0.5}
H100 = "NVIDIA H100 80GB HBM3"
L4 = "NVIDIA L4"
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
C1 = (0.01 * 255) ** 2
CHROMIUM = "/usr/bin/chromium"

# id, node, device_name, latency_s, batch_size, finished (s after T0), error, steps_computed,
# module_evals_computed, gray level, baseline gray level
RUN = [
    ("r1", "node-a", H100, 1.5, 2, 10, None, 20, 200, 100, 100),
    ("r2", "node-a", H100, 1.5, 2, 10, None, 30, 300, 110, 105),
    ("r3", "node-a", H100, 1.0, 2, 20, None, 25, 250, 120, 130),
    ("r4", "node-a", H100, 1.0, 2, 20, "CUDA out of memory", 0, 0, None, 125),
    ("r5", "node-b", L4, 4.0, 1, 12, None, 50, 1000, 130, 130),
    ("r6", "node-b", L4, 2.0, 1, 30, None, 25, 250, 140, 144),
]


def gray_png(level: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), level, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def output_row(spec, baseline: bool = False) -> dict:
    image_id, node, device_name, latency, batch, finished, error, steps, evals, gray, baseline_gray = spec
    if baseline:
        latency, error, steps, evals, gray = 2 * latency, None, 50, 1000, baseline_gray
    return {
        "id": image_id,
        "class_label": int(image_id[1:]) % 10,
        "prompt": None,
        "seed": 1000 + int(image_id[1:]),
        "png": gray_png(gray) if gray is not None else None,
        "width": 16,
        "height": 16,
        "model_id": "digits-dit",
        "policy": "none" if baseline else "invardiff",
        "plan_id": None if baseline else "plan-7",
        "latency_s": latency,
        "batch_size": batch,
        "steps_total": 50,
        "steps_computed": steps,
        "module_evals_total": 1000,
        "module_evals_computed": evals,
        "device": "cuda",
        "device_name": device_name,
        "node_id": node,
        "worker_id": f"{node}-worker",
        "peak_memory_bytes": 123_456_789,
        "finished_at": T0 + timedelta(seconds=finished),
        "error": error,
    }


def write_parquet_files(rows: list[dict], directory: Path, parts: int = 2) -> None:
    """Like Ray's write_parquet: several files, plus marker files a reader must skip."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(parts):
        chunk = rows[index::parts]
        pq.write_table(pa.Table.from_pylist(chunk), directory / f"part-{index:05d}.parquet")
    (directory / "_SUCCESS").write_text("")
    (directory / "_checkpoint").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows[:1]), directory / "_checkpoint" / "pending.parquet")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    write_parquet_files([output_row(spec) for spec in RUN], tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def baseline_dir(tmp_path) -> Path:
    write_parquet_files([output_row(spec, baseline=True) for spec in RUN], tmp_path / "baseline", parts=3)
    return tmp_path / "baseline"


def expected_flat_ssim(a: float, b: float) -> float:
    # Flat images: no variance, no covariance, so SSIM is the luminance term alone.
    return (2 * a * b + C1) / (a * a + b * b + C1)


def expected_psnr(difference: float) -> float:
    return 10 * math.log10(255**2 / difference**2)


# ----------------------------------------------------------------------------------------------------
# Numbers


def test_run_numbers_match_the_hand_computation(run_dir, tmp_path):
    report = build_report(str(run_dir), tmp_path / "report", prices=PRICES)

    assert (report.rows, report.images, report.error_rows) == (6, 5, 1)
    assert report.error_reasons == (("CUDA out of memory", 1),)
    assert report.device_seconds == pytest.approx(11.0, rel=1e-12)
    assert report.total_cost_usd == pytest.approx(0.0062, rel=1e-12)
    assert report.cost_per_image_usd == pytest.approx(0.00124, rel=1e-12)
    assert report.wall_seconds == pytest.approx(23.0, rel=1e-12)
    assert report.images_per_second == pytest.approx(5 / 23, rel=1e-12)
    assert report.images_per_device_hour == pytest.approx(5 / (11 / 3600), rel=1e-12)
    assert (report.steps_computed, report.steps_total) == (150, 250)
    assert (report.module_evals_computed, report.module_evals_total) == (2000, 5000)
    assert report.step_reuse == pytest.approx(0.4)
    assert report.module_reuse == pytest.approx(0.6)
    assert report.policies == ("invardiff",) and report.plan_ids == ("plan-7",)
    assert report.unpriced_devices == ()
    assert report.prices_used == {"H100": 3.6, "L4": 0.72}

    h100, l4 = report.by_device
    assert (h100.name, h100.images, h100.errors, h100.usd_per_hour) == (H100, 3, 1, 3.6)
    assert h100.device_seconds == pytest.approx(5.0)
    assert h100.cost_usd == pytest.approx(0.005, rel=1e-12)
    assert h100.cost_per_image_usd == pytest.approx(0.005 / 3, rel=1e-12)
    assert h100.mean_latency_s == pytest.approx(4.0 / 3, rel=1e-12)
    assert (l4.name, l4.images, l4.errors) == (L4, 2, 0)
    assert l4.cost_usd == pytest.approx(0.0012, rel=1e-12)
    assert l4.cost_per_image_usd == pytest.approx(0.0006, rel=1e-12)

    node_a, node_b = report.by_node
    assert (node_a.name, node_a.images, node_a.devices) == ("node-a", 3, (H100,))
    assert node_a.cost_per_image_usd == pytest.approx(0.005 / 3, rel=1e-12)
    assert (node_b.name, node_b.images) == ("node-b", 2)
    assert node_b.device_seconds == pytest.approx(6.0)

    assert set(report.files) == {
        "report.md",
        "report.html",
        "latency_hist.png",
        "cost_per_image.png",
        "images_per_node.png",
    }
    for name in ("latency_hist.png", "cost_per_image.png", "images_per_node.png"):
        with Image.open(report.files[name]) as image:
            assert image.format == "PNG" and image.width > 300


def test_markdown_shows_the_key_numbers(run_dir, tmp_path):
    report = build_report(str(run_dir), tmp_path / "report", prices=PRICES)
    markdown = report.files["report.md"].read_text()
    assert "| **Cost per image** | $0.00124 |" in markdown
    assert "| **Total cost** | $0.0062 |" in markdown
    assert "| **Images** | 5 |" in markdown
    assert "| **Wall time** | 23.0 s |" in markdown
    assert "| **Period (UTC)** | 2026-01-01 12:00:07 to 2026-01-01 12:00:30 |" in markdown
    assert "| **Denoising steps computed** | 150 of 250 (40.0% reused) |" in markdown
    assert f"| {H100} | $3.60/h | 3 | 1 | 5.0 s | 1.3 s | $0.005 | $0.00167 |" in markdown
    assert f"| node-b | {L4} | 2 | 0 | 6.0 s | 3.0 s | $0.0012 | $0.0006 |" in markdown
    assert "| CUDA out of memory | 1 |" in markdown
    assert "(latency_hist.png)" in markdown and "(images_per_node.png)" in markdown


def test_unpriced_device_makes_cost_unknown_not_wrong(run_dir, tmp_path):
    report = build_report(str(run_dir), tmp_path / "report", prices={"H100": 3.6})
    assert report.unpriced_devices == (L4,)
    assert report.total_cost_usd is None and report.cost_per_image_usd is None
    h100, l4 = report.by_device
    assert h100.cost_usd == pytest.approx(0.005) and l4.cost_usd is None
    markdown = report.files["report.md"].read_text()
    assert "| **Cost per image** | n/a |" in markdown
    assert f"No price for {L4}" in markdown


def test_baseline_speedup_cost_ratio_and_fidelity(run_dir, baseline_dir, tmp_path):
    report = build_report(str(run_dir), tmp_path / "report", prices=PRICES, baseline_uri=str(baseline_dir))
    baseline = report.baseline

    assert baseline.matched_images == 5  # r4 failed in this run
    assert baseline.latency_speedup == pytest.approx(2.0, rel=1e-12)
    assert baseline.median_image_speedup == pytest.approx(2.0, rel=1e-12)
    assert baseline.cost_ratio == pytest.approx(0.5, rel=1e-12)
    assert baseline.baseline_cost_per_image_usd == pytest.approx(0.0104 / 5, rel=1e-12)
    assert baseline.cached_cost_per_image_usd == pytest.approx(0.0052 / 5, rel=1e-12)
    assert baseline.notes == ()

    assert baseline.fidelity_images == 5
    psnr_summary, ssim_summary = baseline.fidelity["psnr"], baseline.fidelity["ssim"]
    assert (psnr_summary.count, psnr_summary.identical) == (5, 2)  # r1 and r5 are unchanged
    finite_psnrs = [expected_psnr(5), expected_psnr(10), expected_psnr(4)]
    # evaluation.fidelity computes in float32: agreement to ~1e-6, not to the last bit.
    assert psnr_summary.mean == pytest.approx(np.mean(finite_psnrs), rel=1e-5)
    assert psnr_summary.minimum == pytest.approx(expected_psnr(10), rel=1e-5)
    ssims = [1.0, expected_flat_ssim(110, 105), expected_flat_ssim(120, 130), 1.0, expected_flat_ssim(140, 144)]
    assert ssim_summary.mean == pytest.approx(np.mean(ssims), rel=1e-4)  # float32 variance: ~3e-5 on flat images
    assert ssim_summary.minimum == pytest.approx(expected_flat_ssim(120, 130), rel=1e-4)

    markdown = report.files["report.md"].read_text()
    assert "| **Device-time speedup** | 2.00× |" in markdown
    assert "| **Cost vs baseline** | 0.50× |" in markdown
    assert f"| psnr | 5 | {np.mean(finite_psnrs):.2f} |" in markdown


def test_samples_show_the_worst_median_and_best_pair(run_dir, baseline_dir, tmp_path):
    report = build_report(str(run_dir), tmp_path / "report", prices=PRICES, baseline_uri=str(baseline_dir))
    samples = report.baseline.samples
    # PSNRs: r3 differs by 10 grey levels (worst), r2 by 5, r6 by 4, r1 and r5 are identical (r5 > r1 by id).
    assert [(s.label, s.image_id) for s in samples] == [
        ("worst PSNR", "r3"), ("median PSNR", "r6"), ("best PSNR", "r5")
    ]
    assert samples[0].psnr == pytest.approx(expected_psnr(10), rel=1e-5) and math.isinf(samples[2].psnr)
    assert samples[0].baseline_png == gray_png(130) and samples[0].cached_png == gray_png(120)
    with Image.open(report.files["samples.png"]) as image:
        assert image.format == "PNG" and image.height > image.width / 2  # three rows of three panels
    assert "![Baseline and cached image" in report.files["report.md"].read_text()
    assert 'id="samples"' in report.files["report.html"].read_text()


def test_png_stored_as_an_image_struct_reads_the_same(run_dir, baseline_dir, tmp_path):
    from jobs.hf_features import png_array

    as_struct = []
    for spec in RUN:
        row = output_row(spec)
        row["png"] = png_array([row["png"]], [row["id"]])[0].as_py()
        as_struct.append(row)
    write_parquet_files(as_struct, tmp_path / "struct-run")
    binary = build_report(str(run_dir), tmp_path / "a", prices=PRICES, baseline_uri=str(baseline_dir))
    struct = build_report(str(tmp_path / "struct-run"), tmp_path / "b", prices=PRICES, baseline_uri=str(baseline_dir))
    assert struct.baseline.fidelity == binary.baseline.fidelity
    assert [s.cached_png for s in struct.baseline.samples] == [s.cached_png for s in binary.baseline.samples]


def test_throughput_is_worded_as_generate_prints_it(run_dir, tmp_path):
    from jobs.throughput import throughput

    report = build_report(str(run_dir), tmp_path / "report", prices=PRICES)
    ok = [spec for spec in RUN if spec[6] is None]
    expected = throughput([spec[5] for spec in ok], [spec[3] for spec in ok], [spec[4] for spec in ok])
    assert report.throughput == expected
    # first start +7 s, last finish +30 s; after the first finish (+10 s): r3, r5, r6 in 20 s.
    assert expected.describe() == "0.217 images/s end-to-end, 0.15 images/s steady-state"
    assert f"| **Throughput** | {expected.describe()} |" in report.files["report.md"].read_text()


def test_baseline_rows_made_from_another_request_are_refused(run_dir, tmp_path):
    reseeded = [output_row(spec, baseline=True) for spec in RUN]
    reseeded[2]["seed"] += 1  # r3
    reseeded[4]["class_label"] = 7  # r5
    write_parquet_files(reseeded, tmp_path / "reseeded")
    with pytest.raises(ReportInputError) as raised:
        build_report(str(run_dir), tmp_path / "report", prices=PRICES, baseline_uri=str(tmp_path / "reseeded"))
    message = str(raised.value)
    assert "2 of 5 shared id(s) were made from another request" in message and "\n" not in message
    assert "r3: seed 1003 here, 1004 in the baseline" in message
    assert "r5: class_label 5 here, 7 in the baseline" in message
    assert not (tmp_path / "report").exists()

    app = typer.Typer()
    app.command()(report_command)
    result = CliRunner().invoke(app, [str(run_dir), "--out", str(tmp_path / "r"), "--baseline", str(tmp_path / "reseeded")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_baseline_without_request_columns_is_flagged_loudly(run_dir, tmp_path):
    unseeded = [{k: v for k, v in output_row(spec, baseline=True).items() if k != "seed"} for spec in RUN]
    write_parquet_files(unseeded, tmp_path / "unseeded")
    report = build_report(str(run_dir), tmp_path / "report", prices=PRICES, baseline_uri=str(tmp_path / "unseeded"))
    assert any(note.startswith("UNCHECKED PAIRING") and "no seed column" in note for note in report.baseline.notes)
    assert "UNCHECKED PAIRING" in report.files["report.md"].read_text()


def test_fidelity_sample_limits_the_images_compared(run_dir, baseline_dir, tmp_path):
    report = build_report(
        str(run_dir), tmp_path / "report", prices=PRICES, baseline_uri=str(baseline_dir), max_fidelity_images=2
    )
    assert report.baseline.fidelity_images == 2
    assert report.baseline.matched_images == 5


def test_baseline_from_another_manifest_is_refused(run_dir, tmp_path):
    other = [output_row(spec, baseline=True) | {"id": "x" + spec[0]} for spec in RUN]
    write_parquet_files(other, tmp_path / "other")
    with pytest.raises(ReportInputError, match="shares no successful image id"):
        build_report(str(run_dir), tmp_path / "report", prices=PRICES, baseline_uri=str(tmp_path / "other"))
    assert not (tmp_path / "report").exists()


def test_baseline_that_is_not_uncached_is_flagged(run_dir, tmp_path):
    cached_baseline = [output_row(spec, baseline=True) | {"policy": "invardiff"} for spec in RUN]
    write_parquet_files(cached_baseline, tmp_path / "cached-baseline")
    report = build_report(
        str(run_dir), tmp_path / "report", prices=PRICES, baseline_uri=str(tmp_path / "cached-baseline")
    )
    assert "baseline rows use cache policy invardiff, not 'none'" in report.baseline.notes


def test_quality_columns_are_summarized(tmp_path):
    rows = [
        output_row(spec) | {"psnr": value, "ssim": 0.9}
        for spec, value in zip(RUN, [30, 40, math.inf, None, 50, 20], strict=True)
    ]
    write_parquet_files(rows, tmp_path / "run")
    report = build_report(str(tmp_path / "run"), tmp_path / "report", prices=PRICES)
    # r4 is an error row and is left out; r3 is identical to its reference (infinite PSNR).
    assert report.quality["psnr"].count == 5
    assert report.quality["psnr"].identical == 1
    assert report.quality["psnr"].mean == pytest.approx(35.0)
    assert report.quality["psnr"].median == pytest.approx(35.0)
    assert report.quality["ssim"].mean == pytest.approx(0.9)


# ----------------------------------------------------------------------------------------------------
# Image metrics


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """An independent SSIM (the scikit-image recipe): Gaussian filtering over the whole image with
    scipy, then the mean over the interior where the 11-px window fits."""
    from scipy.ndimage import gaussian_filter

    x, y = x.astype(np.float64), y.astype(np.float64)
    values = []
    for channel in range(x.shape[2]):
        a, b = x[:, :, channel], y[:, :, channel]
        blur = lambda image: gaussian_filter(image, sigma=1.5, truncate=3.5)  # noqa: E731 - 11 taps
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        c2 = (0.03 * 255) ** 2
        index = ((2 * mu_a * mu_b + C1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + c2))
        values.append(index[5:-5, 5:-5].mean())
    return float(np.mean(values))


def test_ssim_matches_an_independent_implementation_and_psnr_its_definition():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, size=(32, 24, 3), dtype=np.uint8)
    noisy = np.clip(reference.astype(int) + rng.integers(-20, 21, size=reference.shape), 0, 255).astype(np.uint8)
    assert ssim(reference, noisy) == pytest.approx(reference_ssim(reference, noisy), rel=1e-5)
    assert ssim(reference, reference) == pytest.approx(1.0, rel=1e-6)
    mse = np.mean((reference.astype(float) - noisy.astype(float)) ** 2)
    assert psnr(reference, noisy) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-5)
    assert psnr(reference, reference) == math.inf


def test_ssim_of_flat_images_is_the_luminance_term():
    a = np.full((16, 16, 1), 120, dtype=np.uint8)
    b = np.full((16, 16, 1), 130, dtype=np.uint8)
    assert ssim(a, b) == pytest.approx(expected_flat_ssim(120, 130), rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# Prices


def test_price_lookup_by_device_name():
    prices = {"H100": 4.0, "A100": 2.5, "A10G": 1.0, "L4": 0.8, "NVIDIA A100-SXM4-80GB": 3.0, "cpu": 0.68}
    assert price_key_for("cuda", "NVIDIA H100 80GB HBM3", prices) == "H100"
    assert price_key_for("cuda", "NVIDIA A100-SXM4-80GB", prices) == "NVIDIA A100-SXM4-80GB"  # exact wins
    assert price_key_for("cuda", "NVIDIA A100-PCIE-40GB", prices) == "A100"
    assert price_key_for("cuda", "NVIDIA A10G", prices) == "A10G"
    assert price_key_for("cuda", "NVIDIA L40S", prices) is None  # "L4" is not a token of "L40S"
    assert price_key_for("cpu", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", prices) == "cpu"
    assert price_key_for("cuda", "NVIDIA GeForce RTX 4090", prices) is None


def test_default_price_table_and_overrides(tmp_path):
    prices = load_prices(overrides=["H100=2.10", "NVIDIA L40S=1.5"])
    assert {"H200", "H100", "A100", "L4", "A10G", "T4", "cpu"} <= set(prices)
    assert prices["H100"] == 2.10 and prices["NVIDIA L40S"] == 1.5
    custom = tmp_path / "prices.yaml"
    custom.write_text("usd_per_hour:\n  H100: 1.25\n")
    assert load_prices(custom) == {"H100": 1.25}
    custom.write_text("usd_per_hour:\n  H100: cheap\n")
    with pytest.raises(ReportInputError, match="not a number"):
        load_prices(custom)
    with pytest.raises(ReportInputError, match="DEVICE=USD_PER_HOUR"):
        parse_price_override("H100")


# ----------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written


def test_missing_output_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(ReportInputError, match="does not exist"):
        build_report(str(tmp_path / "no-such-run"), tmp_path / "report", prices=PRICES)
    assert not (tmp_path / "report").exists()


def test_directory_without_parquet_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "_temporary").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ReportInputError, match=r"holds no \.parquet files"):
        build_report(str(tmp_path / "empty"), tmp_path / "report", prices=PRICES)
    assert not (tmp_path / "report").exists()


def test_missing_required_columns_are_named_and_nothing_is_written(tmp_path):
    rows = [{k: v for k, v in output_row(spec).items() if k not in ("latency_s", "node_id")} for spec in RUN]
    write_parquet_files(rows, tmp_path / "run")
    with pytest.raises(ReportInputError) as raised:
        build_report(str(tmp_path / "run"), tmp_path / "report", prices=PRICES)
    message = str(raised.value)
    assert "lacks required column(s) latency_s, node_id" in message
    assert "2 of 2 file(s)" in message
    assert not (tmp_path / "report").exists()


def test_report_command_exit_codes(run_dir, tmp_path):
    app = typer.Typer()
    app.command()(report_command)
    runner = CliRunner()
    good = runner.invoke(
        app, [str(run_dir), "--out", str(tmp_path / "report"), "--price", "H100=3.6", "--price", "L4=0.72"]
    )
    assert good.exit_code == 0, good.output
    assert "5 images, 1 error rows, $0.00124 per image" in good.output
    bad = runner.invoke(app, [str(tmp_path / "nope"), "--out", str(tmp_path / "report2")])
    assert bad.exit_code == 2
    assert "does not exist" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "report2").exists()


# ----------------------------------------------------------------------------------------------------
# S3 through a real (loopback) S3 server


def test_s3_round_trip_gives_the_same_report(run_dir, baseline_dir, tmp_path, s3_endpoint, s3_credentials):
    import s3fs

    options = {"endpoint_url": s3_endpoint}
    s3 = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    s3.mkdir("reports-bucket")
    s3.put(str(run_dir), "reports-bucket/runs/run-1", recursive=True)
    s3.put(str(baseline_dir), "reports-bucket/runs/baseline", recursive=True)

    from_s3 = build_report(
        "s3://reports-bucket/runs/run-1",
        tmp_path / "report-s3",
        prices=PRICES,
        baseline_uri="s3://reports-bucket/runs/baseline",
        storage_options=options,
    )
    local = build_report(str(run_dir), tmp_path / "report-local", prices=PRICES, baseline_uri=str(baseline_dir))

    assert from_s3.images == local.images == 5
    assert from_s3.cost_per_image_usd == pytest.approx(local.cost_per_image_usd, rel=1e-12)
    assert from_s3.wall_seconds == pytest.approx(23.0)
    assert from_s3.baseline.latency_speedup == pytest.approx(2.0)
    assert from_s3.baseline.fidelity["ssim"].mean == pytest.approx(local.baseline.fidelity["ssim"].mean, rel=1e-12)
    assert "s3://reports-bucket/runs/run-1" in from_s3.files["report.md"].read_text()

    with pytest.raises(ReportInputError, match="does not exist"):
        build_report("s3://reports-bucket/runs/missing", tmp_path / "nothing", prices=PRICES, storage_options=options)
    assert not (tmp_path / "nothing").exists()


# ----------------------------------------------------------------------------------------------------
# The HTML in a real browser


def run_chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def element_text(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', dom)
    assert match, f"no element #{element_id} in the rendered DOM"
    return match.group(1)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium_with_the_key_numbers(run_dir, baseline_dir, tmp_path):
    report = build_report(str(run_dir), tmp_path / "report", prices=PRICES, baseline_uri=str(baseline_dir))
    page = report.files["report.html"]
    source = page.read_text()
    assert "http://" not in source and "https://" not in source and "<link" not in source, "must be self-contained"

    dumped = run_chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    assert element_text(dom, "images") == "5"
    assert element_text(dom, "error-rows") == "1"
    assert element_text(dom, "cost-per-image") == "$0.00124"
    assert element_text(dom, "total-cost") == "$0.0062"
    assert element_text(dom, "wall-time") == "23.0 s"
    assert element_text(dom, "speedup") == "2.00×"
    assert element_text(dom, "cost-ratio") == "0.50×"
    assert element_text(dom, "steps") == "150 of 250 (40.0% reused)"
    assert '<table id="by-node">' in dom and "node-b" in dom
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) == 4  # three plots and the cached-vs-baseline samples
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG"

    screenshot = tmp_path / "page.png"
    shot = run_chromium(
        f"--screenshot={screenshot}",
        "--window-size=1280,1600",
        "--hide-scrollbars",
        page.as_uri(),
        profile=tmp_path / "profile-shot",
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (1600, 1280)
    assert pixels.std() > 10, "the page rendered blank"


def test_required_columns_are_the_contract_columns_the_report_uses():
    # A guard against the list drifting from docs/contracts.md.
    contract = (Path(__file__).resolve().parents[1] / "docs" / "contracts.md").read_text()
    for column in REQUIRED_COLUMNS:
        assert f"`{column}`" in contract, column
