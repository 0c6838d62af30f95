"""Shadow samples: which rows, what they measure, the report's flag, the drift alarm, and the refresh's quality gate.

One generation job (tiny-dit, 4 steps, half the rows shadowed) is shared by the job, report and record tests.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines.build import GeneratorConfig
from pipelines.shadow import DriftAlarm, compare_fidelity, fidelity, is_shadow, mean_interval, shadow_value

TINY = GeneratorConfig(model="tiny-dit", num_inference_steps=4, device="cpu")
FRACTION = 0.5
BOUND = 30.0  # dB: tiny-dit under an aggressive plan is far below it (about 15 dB)


# ----------------------------------------------------------------------------------------------------
# Pure parts


def test_selection_is_a_hash_of_id_and_seed_nested_and_near_the_fraction():
    ids = [(f"c{i % 10}-s0-{i}", i) for i in range(20_000)]
    picked = {f: {row for row in ids if is_shadow(*row, f)} for f in (0.01, 0.05)}
    assert picked[0.01] <= picked[0.05]  # a larger fraction keeps the smaller one's rows
    assert abs(len(picked[0.01]) - 200) < 60 and abs(len(picked[0.05]) - 1000) < 120
    assert shadow_value("a", 1) == shadow_value("a", 1) != shadow_value("a", 2)  # the seed is part of the key
    assert not any(is_shadow(*row, 0.0) for row in ids[:100]) and all(is_shadow(*row, 1.0) for row in ids[:100])


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, size=(2, 16, 16, 1), dtype=np.uint8)
    cached = reference.copy()
    cached[1] = np.clip(cached[1].astype(int) + 4, 0, 255).astype(np.uint8)
    final = rng.normal(size=(2, 1, 16, 16)).astype(np.float32)
    final_cached = final.copy()
    final_cached[1] *= 1.1
    same, shifted = fidelity(cached, reference, final_cached, final)
    assert same.psnr == 100.0 and same.ssim == pytest.approx(1.0) and same.rel_err == 0.0
    mse = np.mean(((cached[1].astype(float) - reference[1]) / 255.0) ** 2)
    assert shifted.psnr == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    assert shifted.ssim < 1.0 and shifted.rel_err == pytest.approx(0.1, rel=1e-5)


def test_mean_interval_is_student_t_and_covers_as_it_says():
    interval = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert interval.mean == 2.5 and interval.half_width == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5)
    assert mean_interval([]) is None and math.isinf(mean_interval([5.0]).high)
    rng = np.random.default_rng(1)
    covered = sum(i.low <= 40.0 <= i.high for i in (mean_interval(rng.normal(40.0, 3.0, 20)) for _ in range(400)))
    assert 0.91 <= covered / 400 <= 0.99


def test_drift_alarm_trips_once_and_not_on_few_or_noisy_shadows():
    alarm = DriftAlarm(min_psnr=40.0, min_rows=8)
    assert not alarm.add([20.0] * 7)  # too few shadows yet
    assert alarm.add([21.0])
    assert not alarm.add([10.0]) and "below --min-psnr 40" in alarm.describe()
    noisy = DriftAlarm(min_psnr=40.0, min_rows=8)
    assert not noisy.add([45.0, 36.0, 44.0, 37.0, 43.0, 38.0, 42.0, 39.0])  # mean 40.5: not confidently below


def test_compare_fidelity_is_paired():
    quality = compare_fidelity([40.0, 42.0, 44.0], [38.0, 40.5, 41.0])
    assert quality.drop == pytest.approx(2.1666667) and quality.change.mean == pytest.approx(-2.1666667)
    with pytest.raises(ValueError):
        compare_fidelity([40.0], [39.0, 38.0])


# ----------------------------------------------------------------------------------------------------
# On a generator, no Ray: the same rows whatever the batch split


@pytest.fixture(scope="module")
def tiny_plan():
    from pipelines.build import build_generator
    from pipelines.calibration import TauBundle, calibrate, calibration_requests

    generator = build_generator(TINY)
    bundle = TauBundle(taus={"step": 0.6, "attn": 0.5, "ff": 0.5}, nonskip_rate=0.0, name="test")
    return calibrate(generator, bundle, calibration_requests(generator, runs=2), batch_size=2)


def test_shadow_rows_are_the_same_at_any_batch_split(tiny_plan):
    from invardiff.policy import InvarDiffPolicy
    from pipelines.base import Request
    from pipelines.build import build_generator
    from pipelines.runner import run_batch
    from pipelines.shadow import shadow_rows

    generator = build_generator(TINY)
    policy = InvarDiffPolicy(tiny_plan)
    policy.attach(generator.transformer)
    requests = [Request(f"r{i}", i, class_label=i % 10) for i in range(10)]

    def shadows(split: int) -> dict:
        found = {}
        for start in range(0, len(requests), split):
            batch = requests[start:start + split]
            for request, columns in zip(batch, shadow_rows(generator, batch, run_batch(generator, batch, policy),
                                                           policy, FRACTION)):
                if columns:
                    found[request.id] = columns
        return found

    by_three, whole = shadows(3), shadows(10)
    expected = {r.id for r in requests if is_shadow(r.id, r.seed, FRACTION)}
    assert set(by_three) == set(whole) == expected and expected
    for row_id in expected:
        # float rounding differs with the batch composition; a pixel level or two may round the other way
        assert by_three[row_id]["shadow_psnr"] == pytest.approx(whole[row_id]["shadow_psnr"], abs=0.05)
    # the plan is attached again after each shadow batch: the next cached batch still reuses
    assert run_batch(generator, requests[:2], policy).rows[0]["steps_computed"] < 4


# ----------------------------------------------------------------------------------------------------
# The job, its report and its run record (one job shared)


@pytest.fixture(scope="module")
def shadow_run(ray_local, tiny_plan, tmp_path_factory):
    from jobs.generate import run_generate
    from jobs.manifest import ManifestSchema, class_manifest
    from jobs.shadow_watch import ShadowOptions

    out = str(tmp_path_factory.mktemp("shadow") / "out")
    manifest = class_manifest(list(range(10)), per_class=2, seed=3)
    options = ShadowOptions(FRACTION, keep_images=True, min_psnr=BOUND)
    summary = run_generate(manifest, out, TINY, schema=ManifestSchema("class_label", num_classes=10),
                           plan_json=tiny_plan.to_json(), batch_size=4, workers=1, shadow=options)
    return out, manifest, summary


def test_job_writes_shadow_columns_on_the_chosen_rows_and_records_the_alarm(shadow_run):
    from jobs.outputs import read_outputs

    out, manifest, summary = shadow_run
    assert summary.complete
    rows = {r["id"]: r for r in read_outputs(out).to_pylist()}
    expected = {r["id"] for r in manifest.to_pylist() if is_shadow(r["id"], r["seed"], FRACTION)}
    assert {i for i, r in rows.items() if r["shadow_psnr"] is not None} == expected and len(expected) >= 8
    for row_id, row in rows.items():
        if row_id in expected:
            assert 0 < row["shadow_psnr"] < BOUND and 0 < row["shadow_rel_err"] and row["shadow_latency_s"] > 0
            assert row["shadow_png"][:4] == b"\x89PNG"
        else:
            assert row["shadow_ssim"] is None and row["shadow_png"] is None
    record = json.loads(open(f"{out}/_run.json").read())["runs"][-1]
    assert record["shadow"]["rows"] == len(expected) and record["shadow"]["fraction"] == FRACTION
    assert "below --min-psnr 30" in record["shadow"]["drift"] and record["shadow"]["stopped"] is False
    assert summary.shadow["drift"] == record["shadow"]["drift"]


def test_report_shows_shadow_fidelity_and_flags_a_run_below_min_psnr(shadow_run, tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import app

    out, _, _ = shadow_run
    runner = CliRunner()
    flagged = runner.invoke(app, ["report", out, "--out", str(tmp_path / "flagged"), "--min-psnr", str(BOUND)])
    assert flagged.exit_code == 4, flagged.output
    assert "FIDELITY BELOW BOUND" in flagged.output
    html = (tmp_path / "flagged" / "report.html").read_text()
    assert "Fidelity from shadow rows" in html and "shadow_worst" in html and "95% interval" in html
    assert (tmp_path / "flagged" / "shadow_worst.png").exists()
    passing = runner.invoke(app, ["report", out, "--out", str(tmp_path / "ok"), "--min-psnr", "5"])
    assert passing.exit_code == 0, passing.output


def test_report_min_psnr_without_shadow_rows_is_bad_input(shadow_run, tmp_path):
    from jobs.report import ReportInputError, build_report
    from jobs.report_shadow import summarize_shadows  # noqa: F401 - the module loads without Ray

    import pyarrow.parquet as pq

    out, _, _ = shadow_run
    plain = tmp_path / "plain"
    plain.mkdir()
    table = pq.read_table(next(p for p in __import__("pathlib").Path(out).glob("*.parquet")))
    pq.write_table(table.drop(["shadow_psnr", "shadow_ssim", "shadow_rel_err", "shadow_latency_s", "shadow_png"]),
                   plain / "part.parquet")
    with pytest.raises(ReportInputError, match="no shadow rows"):
        build_report(str(plain), tmp_path / "r", min_psnr=30.0)
    assert not (tmp_path / "r").exists()


def test_drift_monitor_stops_the_run_once(ray_local):
    import ray

    from jobs.shadow_watch import DriftMonitor, ShadowOptions, start_watch

    options = ShadowOptions(0.1, min_psnr=BOUND, stop_on_drift=True)
    watch = start_watch(options)
    stops = []
    monitor = DriftMonitor(watch, options, on_stop=lambda: stops.append(1))  # polled by hand: no thread
    ray.get(watch.add.remote([35.0] * 4))
    monitor.check()
    assert stops == [] and options.rows == 4 and options.drift is None
    ray.get(watch.add.remote([12.0] * 6))
    monitor.check()
    monitor.check()
    assert stops == [1] and options.stopped and options.rows == 10 and "below --min-psnr" in options.drift


def test_drift_read_only_after_the_last_batch_still_ends_the_run_stopped_and_interrupts_nothing(ray_local,
                                                                                                  monkeypatch):
    import ray

    from jobs import shadow_watch
    from jobs.shadow_watch import DriftMonitor, ShadowOptions, start_watch

    monkeypatch.setattr(shadow_watch, "POLL_S", 3600.0)  # no poll before the close: only the final read sees it

    def run(fail: bool) -> tuple[ShadowOptions, list]:
        options = ShadowOptions(0.1, min_psnr=BOUND, stop_on_drift=True)
        watch, stops = start_watch(options), []
        try:
            with DriftMonitor(watch, options, on_stop=lambda: stops.append(1)):
                ray.get(watch.add.remote([12.0] * 8))  # the last batch's shadows trip the alarm
                if fail:
                    raise RuntimeError("the writing failed")
        except RuntimeError:
            pass
        finally:
            ray.kill(watch)
        return options, stops

    finished, stops = run(fail=False)
    assert finished.stopped and stops == [] and "below --min-psnr" in finished.drift and finished.rows == 8
    failed, stops = run(fail=True)  # the failure is what that run reports; the alarm is recorded beside it
    assert not failed.stopped and stops == [] and "below --min-psnr" in failed.drift


def test_shadow_options_refuse_what_cannot_work():
    from jobs.shadow_watch import ShadowOptions

    for bad in (dict(fraction=1.5), dict(fraction=0.1, stop_on_drift=True), dict(min_psnr=30.0),
                dict(keep_images=True)):
        with pytest.raises(ValueError):
            ShadowOptions(**bad)


# ----------------------------------------------------------------------------------------------------
# The refresh's quality gate


def test_refresh_is_refused_when_held_out_fidelity_falls(ray_local, tmp_path):
    import ray

    from jobs.calibrate import run_calibrate_job, start_workers
    from jobs.drift import DriftGate
    from jobs.plan_store import PlanStore
    from pipelines.calibration import TauBundle

    mild = TauBundle(taus={"step": 0.0, "attn": 0.1, "ff": 0.1}, nonskip_rate=0.0, name="mild")
    aggressive = TauBundle(taus={"step": 0.6, "attn": 0.5, "ff": 0.5}, nonskip_rate=0.0, name="aggressive")
    store = PlanStore(str(tmp_path / "store"))
    actors = start_workers(TINY, 1)
    try:
        first, outcome, _ = run_calibrate_job(TINY, lambda arch: mild, workers=1, runs=2, batch_size=2, store=store,
                                              actors=actors)
        assert outcome.status == "first"
        # Jaccard and speedup gates wide open: only the measured fidelity can refuse the candidate
        gate = DriftGate(min_jaccard=0.0, max_speedup_change=100.0, max_psnr_drop=1.0, quality_runs=4)
        _, refused, _ = run_calibrate_job(TINY, lambda arch: aggressive, workers=1, runs=2, batch_size=2,
                                          store=store, refresh=True, gate=gate, actors=actors)
    finally:
        for actor in actors:
            ray.kill(actor)
    assert refused.status == "rejected" and len(refused.reasons) == 1
    assert "exceeds --max-psnr-drop 1" in refused.reasons[0]
    quality = refused.drift.fidelity
    assert quality.runs == 4 and quality.drop > 1.0
    assert store.latest(refused.key).plan_id == first.plan_id
    report = next(p for p in refused.reports if p.endswith(".md"))
    assert "measured fidelity (shadow set: 4 held-out runs" in open(report).read()
