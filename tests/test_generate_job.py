"""The Ray Data generation job end to end on a tiny model, with the embedded local Ray."""

import subprocess
import sys

import pyarrow as pa
import pytest

from jobs.generate import run_generate
from jobs.manifest import ManifestError, ManifestSchema, class_manifest
from jobs.outputs import read_outputs
from pipelines.build import GeneratorConfig
from pipelines.png import decode_png

TINY = GeneratorConfig(model="tiny-dit", num_inference_steps=4, device="cpu")
SCHEMA = ManifestSchema("class_label", num_classes=10)


@pytest.fixture(scope="module")
def tiny_plan():
    from pipelines.build import build_generator
    from pipelines.calibration import TauBundle, calibrate, calibration_requests

    generator = build_generator(TINY)
    bundle = TauBundle(taus={"step": 0.6, "attn": 0.5, "ff": 0.5}, nonskip_rate=0.0, name="test")
    plan = calibrate(generator, bundle, calibration_requests(generator, runs=2), batch_size=2)
    assert plan.step_gate.any() or any(b.any() for b in plan.modules.values())
    return plan


def test_uncached_job_writes_one_row_per_manifest_row(ray_local, tmp_path):
    manifest = class_manifest([0, 1, 2], per_class=2, seed=5)
    manifest = manifest.append_column("tag", pa.array(list("abcdef")))
    summary = run_generate(manifest, str(tmp_path / "out"), TINY, schema=SCHEMA, batch_size=4)
    assert summary.complete and summary.reconciliation.written == 6 and summary.reconciliation.failed == 0

    out = read_outputs(str(tmp_path / "out"))
    rows = {r["id"]: r for r in out.to_pylist()}
    assert sorted(rows) == sorted(manifest.column("id").to_pylist())
    for source in manifest.to_pylist():
        row = rows[source["id"]]
        assert row["seed"] == source["seed"] and row["class_label"] == source["class_label"]
        assert row["tag"] == source["tag"]
        assert row["policy"] == "none" and row["plan_id"] is None and row["error"] is None
        assert row["steps_total"] == row["steps_computed"] == 4
        assert row["module_evals_computed"] == row["module_evals_total"] == 4 * 2 * 3
        assert row["device"] == "cpu" and row["node_id"] and row["worker_id"]
        assert row["latency_s"] > 0 and row["peak_memory_bytes"] > 0
        image = decode_png(row["png"]["bytes"])
        assert image.shape == (row["height"], row["width"]) == (16, 16)


def test_rerun_writes_only_missing_ids(ray_local, tmp_path):
    out = str(tmp_path / "out")
    first = class_manifest([3], per_class=3, seed=0)
    run_generate(first, out, TINY, schema=SCHEMA, batch_size=2)
    more = class_manifest([3], per_class=5, seed=0)
    summary = run_generate(more, out, TINY, schema=SCHEMA, batch_size=2)
    assert summary.rows_already_there == 3 and summary.rows_attempted == 2 and summary.reconciliation.written == 5
    ids = read_outputs(out, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(more.column("id").to_pylist())


def test_cached_job_records_plan_and_counts(ray_local, tmp_path, tiny_plan):
    manifest = class_manifest([0, 1], per_class=2, seed=0)
    run_generate(manifest, str(tmp_path / "none"), TINY, schema=SCHEMA, batch_size=4)
    run_generate(manifest, str(tmp_path / "cached"), TINY, schema=SCHEMA, batch_size=4, plan_json=tiny_plan.to_json())
    cached = read_outputs(str(tmp_path / "cached")).to_pylist()
    expected_steps = int((~tiny_plan.step_gate).sum())
    for row in cached:
        assert row["policy"] == "invardiff" and row["plan_id"] == tiny_plan.plan_id
        assert row["steps_computed"] == expected_steps < row["steps_total"] == 4
        assert row["module_evals_computed"] < row["module_evals_total"]

    # `invardiff report` on the job's real output, against the uncached run of the same manifest.
    from jobs.report import build_report

    report = build_report(str(tmp_path / "cached"), tmp_path / "report", baseline_uri=str(tmp_path / "none"))
    assert report.images == 4 and report.error_rows == 0 and report.duplicate_ids == 0
    assert report.steps_computed == 4 * expected_steps and report.steps_total == 16
    assert report.cost_per_image_usd > 0 and [g.name for g in report.by_device] == [cached[0]["device_name"]]
    assert report.baseline.matched_images == 4 and report.baseline.notes == ()
    assert report.baseline.fidelity["psnr"].count == 4 and report.baseline.fidelity["ssim"].count == 4
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Against the uncached baseline" in markdown and tiny_plan.plan_id in markdown


def test_bad_manifest_fails_before_anything_is_written(tmp_path):
    manifest = pa.table({"id": ["a", "b"], "seed": [1, 2], "class_label": [0, 12]})
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match="row 1 \\(id 'b'\\): class_label 12"):
        run_generate(manifest, str(out), TINY, schema=SCHEMA)
    assert not out.exists()


def test_plan_for_another_pipeline_is_refused(ray_local, tmp_path, tiny_plan):
    manifest = class_manifest([0], per_class=1, seed=0)
    other = GeneratorConfig(model="tiny-dit", num_inference_steps=5, device="cpu")
    out = tmp_path / "out"
    with pytest.raises(Exception, match="num_inference_steps: plan has 4, pipeline has 5"):
        run_generate(manifest, str(out), other, schema=SCHEMA, plan_json=tiny_plan.to_json())
    assert not out.exists() or not any(out.rglob("*.parquet"))


def test_cli_reports_bad_input_clearly(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "seed": -3, "class_label": 1}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "generate", "--manifest", str(manifest), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "row 0 (id 'a'): seed must be in [0, 2**63), got -3" in proc.stderr
    assert not (tmp_path / "o").exists()
