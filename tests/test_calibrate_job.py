"""The distributed calibration job on embedded Ray: equal to single-process calibration for any worker count,
robust to a dying worker, and end to end through a real (moto) S3 plan store into generation.

Kept fast by starting three tiny-dit workers once for the module and lending them to every job.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipelines.build import GeneratorConfig

STEPS = 4
RUNS = 6
BATCH = 2  # 3 chunks: more chunks than a 1-worker job has workers, as many as the 3-worker job
CONFIG = GeneratorConfig(model="tiny-dit", num_inference_steps=STEPS, device="cpu")
# Distinctive fake credentials (moto accepts any): a leak into a file or a log line would be found by grep.
ACCESS_KEY = "AKIAINVARDIFFLEAKTEST"
SECRET_KEY = "s3cr3t-invardiff-must-not-leak-9f2c"


def content(plan) -> dict:
    """A plan document without its creation time and the hashes that cover it."""
    doc = plan.to_dict()
    for name in ("created_at", "plan_id", "checksum"):
        doc.pop(name)
    return doc


@pytest.fixture(scope="module")
def ray_env(request):
    # Ray workers inherit the driver's environment at ray.init; the generation test's Parquet writers need S3
    # credentials, so set them before the session's Ray starts if this module is the first to use it.
    import ray

    fake = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in fake}
    if not ray.is_initialized():
        os.environ.update({name: value for name, value in fake.items() if saved[name] is None})
    try:
        yield request.getfixturevalue("ray_local")
    finally:  # the raylet keeps its copy for its workers; the rest of the session sees the old environment
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def bundle():
    from pipelines.calibration import TauBundle

    return TauBundle.from_preset("dit", "copy-balanced")


@pytest.fixture(scope="module")
def reference(bundle):
    """Single-process calibration on the same inputs, the same batches."""
    from pipelines.build import build_generator
    from pipelines.calibration import calibrate, calibration_requests

    generator = build_generator(CONFIG)
    return calibrate(generator, bundle, calibration_requests(generator, runs=RUNS), batch_size=BATCH)


@pytest.fixture(scope="module")
def workers(ray_env):
    import ray

    from jobs.calibrate import start_workers

    actors = start_workers(CONFIG, 3)
    yield actors
    for actor in actors:
        ray.kill(actor)


def run_job(bundle, actors, **kwargs):
    from jobs.calibrate import CalibrationJob

    messages = []
    with CalibrationJob(CONFIG, workers=len(actors), runs=RUNS, batch_size=BATCH, actors=actors,
                        progress=messages.append, **kwargs) as job:
        plan = job.calibrate(bundle)
    return plan, job.stats, messages


def test_three_workers_equal_one_worker_and_single_process(bundle, reference, workers):
    one, one_stats, _ = run_job(bundle, workers[:1])
    three, three_stats, _ = run_job(bundle, workers)
    assert content(one) == content(reference)
    assert content(three) == content(reference)
    assert one_stats.runs == three_stats.runs == {1: RUNS, 2: RUNS}
    assert three_stats.workers == 3 and three_stats.retries == 0
    assert three.calibration["runs"] == RUNS and len(three.calibration["seeds"]) == RUNS


def test_forecast_plan_is_identical_for_one_and_three_workers_and_single_process(workers):
    from jobs.calibrate import CalibrationJob
    from pipelines.build import build_generator
    from pipelines.calibration import calibration_requests
    from pipelines.forecast_calibration import ForecastTarget, calibrate_forecast

    goal = ForecastTarget(speedup=2.0)
    generator = build_generator(CONFIG)
    single = calibrate_forecast(generator, goal, calibration_requests(generator, runs=RUNS), batch_size=BATCH)
    plans = []
    for actors in (workers[:1], workers):
        with CalibrationJob(CONFIG, workers=len(actors), runs=RUNS, batch_size=BATCH, actors=actors) as job:
            plans.append(job.calibrate_forecast(goal))
    assert content(plans[0]) == content(single)
    assert content(plans[1]) == content(single)
    assert single.mode == "forecast" and single.forecast_schedule.num_computed == STEPS // 2


def test_dead_worker_is_replaced_and_its_runs_counted_once(bundle, reference, workers, tmp_path):
    marker = tmp_path / "crashed-once"
    plan, stats, messages = run_job(bundle, workers[1:], crash_once_marker=str(marker))
    assert marker.exists(), "the fault drill did not fire"
    assert stats.retries == 1 and stats.replaced_workers == 1
    assert stats.runs == {1: RUNS, 2: RUNS}
    assert content(plan) == content(reference)
    assert any("died" in m for m in messages)


def test_worker_count_below_one_is_refused():
    from jobs.calibrate import CalibrationJob

    with pytest.raises(ValueError, match="at least 1"):
        CalibrationJob(CONFIG, workers=0)


def test_s3_store_calibrate_then_generate_latest(bundle, reference, workers, s3_endpoint, monkeypatch, tmp_path, capfd):
    import fsspec
    import ray

    from jobs.calibrate import run_calibrate_job
    from jobs.generate import run_generate
    from jobs.manifest import ManifestSchema, class_manifest, read_manifest
    from jobs.plan_store import PlanStore, resolve_latest
    from pipelines.tiny import NUM_CLASSES

    env = ray.get(ray.remote(num_cpus=0.1)(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY")).remote())
    if env is None:
        pytest.skip("this session's Ray was started by another module without S3 credentials in its environment")
    worker_key = ray.get(ray.remote(num_cpus=0.1)(lambda: os.environ.get("AWS_ACCESS_KEY_ID")).remote())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", worker_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("invardiff-e2e")
    store_uri = "s3://invardiff-e2e/plans"

    # calibrate: one worker, straight into the S3 store
    store = PlanStore(store_uri)
    plan, outcome, stats = run_calibrate_job(
        CONFIG, lambda arch: bundle, workers=1, runs=RUNS, batch_size=BATCH, store=store, actors=workers[:1]
    )
    assert outcome.status == "first" and stats.runs == {1: RUNS, 2: RUNS}
    assert content(plan) == content(reference)
    # without --refresh an existing latest is kept and nothing is calibrated
    again, skipped, _ = run_calibrate_job(CONFIG, lambda arch: bundle, workers=1, runs=RUNS, batch_size=BATCH,
                                          store=store, actors=workers[:1])
    assert again is None and skipped.status == "skipped" and skipped.plan_id == plan.plan_id
    # --refresh on other seeds: a new version, a drift report next to it, promoted within the default bounds
    from jobs.drift import DriftGate

    refreshed, promoted, _ = run_calibrate_job(
        CONFIG, lambda arch: bundle, workers=1, runs=RUNS, seed=20_000, batch_size=BATCH, store=store, refresh=True,
        gate=DriftGate(min_jaccard=0.0, max_speedup_change=10.0), actors=workers[:1],
    )
    assert promoted.status == "promoted" and promoted.drift is not None
    assert [p.rsplit(".", 1)[-1] for p in promoted.reports] == ["png", "md"]
    assert all(fs.exists(p) for p in promoted.reports)
    assert store.latest(promoted.key) == refreshed and len(store.versions(promoted.key)) == 2
    from jobs.plan_store import format_listing

    listing = format_listing(PlanStore(store_uri))
    assert promoted.key in listing and f"{promoted.version}  <- latest, drift report" in listing
    plan = refreshed

    # manifest on S3 too
    manifest_uri = "s3://invardiff-e2e/manifests/rows.parquet"
    with fs.open(manifest_uri, "wb") as f:
        pq.write_table(class_manifest([1, 2], 2, 0), f)
    table = read_manifest(manifest_uri, storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})

    for actor in workers:  # give their CPUs back: the generation actor pool needs a whole one
        ray.kill(actor)
    resolved = resolve_latest(store_uri, CONFIG)
    assert resolved == plan
    out = "s3://invardiff-e2e/runs/cached"
    summary = run_generate(table, out, CONFIG, schema=ManifestSchema("class_label", num_classes=NUM_CLASSES),
                           plan_json=resolved.to_json(), batch_size=4, workers=1)
    assert summary.reconciliation.written == 4 and summary.reconciliation.failed == 0
    written = pq.read_table(out.removeprefix("s3://"), filesystem=fs)
    assert set(written.column("plan_id").to_pylist()) == {plan.plan_id}

    # credentials never land in the store, the outputs or the logs
    blobs = [fs.cat_file(path) for path in fs.find("invardiff-e2e")]
    assert len(blobs) >= 5
    out_text = capfd.readouterr()
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    logs = [p for p in __import__("pathlib").Path(session_dir, "logs").rglob("*") if p.is_file()]
    assert logs
    log_bytes = b"".join(p.read_bytes() for p in logs)
    for secret in (env, worker_key, SECRET_KEY, ACCESS_KEY):
        assert all(secret.encode() not in blob for blob in blobs)
        assert secret not in out_text.out and secret not in out_text.err
        assert secret.encode() not in log_bytes
