"""The fault suite: the generation job under injected batch errors, a killed actor, an S3 server restarted
mid-write, Ctrl-C and a second job on the same output. Every test checks the same promise: rows asked = rows
written once + rows reported failed or missing, no foreign file changed, the exit code as documented.
(The driver SIGKILL and rerun is tests/test_resume.py; foreign files and bad input, tests/test_output_contract.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.generate import GenerateBatch, run_generate
from jobs.manifest import ManifestSchema, class_manifest
from jobs.outputs import read_outputs
from pipelines.build import GeneratorConfig

TINY = GeneratorConfig(model="tiny-dit", num_inference_steps=2, device="cpu")
SCHEMA = ManifestSchema("class_label", num_classes=10)
REPO = Path(__file__).resolve().parent.parent
INVARDIFF = str(Path(sys.executable).parent / "invardiff")


@pytest.fixture(autouse=True, scope="module")
def _ship_this_module_to_workers():
    # The fault-injecting actor classes below live in a test module the workers cannot import by name.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class FailOnFirstAttempt(GenerateBatch):
    """A batch holding a class-1 row fails on its first attempt (a flaky GPU, a preempted node)."""

    def __call__(self, batch):
        self.first_attempt = min(batch.column("attempt").to_pylist()) == 1
        return super().__call__(batch)

    def generate(self, requests):
        if self.first_attempt and any(r.class_label == 1 for r in requests):
            raise RuntimeError("injected fault\nwith a second line that the summary must not show")
        return super().generate(requests)


class AlwaysFailClassTwo(GenerateBatch):
    def generate(self, requests):
        if any(r.class_label == 2 for r in requests):
            raise ValueError("class 2 never works")
        return super().generate(requests)


def ids_in(out: str) -> Counter:
    return Counter(read_outputs(out, columns=["id"]).column("id").to_pylist())


def test_injected_batch_errors_are_reported_then_retried_on_rerun(ray_local, tmp_path):
    out = str(tmp_path / "out")
    manifest = class_manifest([0, 1], per_class=2, seed=0)
    asked = manifest.column("id").to_pylist()

    first = run_generate(manifest, out, TINY, schema=SCHEMA, batch_size=2, batch_class=FailOnFirstAttempt)
    result = first.reconciliation
    assert not first.complete and result.asked == 4 and result.missing == 0
    assert result.written + result.failed == 4 and result.failed >= 2  # both class-1 rows, and their batch mates
    assert result.reasons == (("RuntimeError: injected fault", result.failed),)
    assert ids_in(out) == Counter(asked)  # an error row is a row: once per id

    second = run_generate(manifest, out, TINY, schema=SCHEMA, batch_size=2, batch_class=FailOnFirstAttempt)
    assert second.complete and second.rows_retried == result.failed and second.rows_attempted == result.failed
    rows = read_outputs(out, columns=["id", "error", "attempt"]).to_pylist()
    assert Counter(r["id"] for r in rows) == Counter(asked)  # the superseded error rows are gone
    assert all(r["error"] is None for r in rows)
    assert sorted(r["attempt"] for r in rows) == sorted([1] * (4 - result.failed) + [2] * result.failed)


def test_rows_failing_past_max_attempts_stay_failed_until_overwrite_replaces_them(ray_local, tmp_path):
    out = str(tmp_path / "out")
    manifest = class_manifest([2], per_class=2, seed=0)
    for attempt in (1, 2):
        summary = run_generate(manifest, out, TINY, schema=SCHEMA, batch_size=2, max_attempts=2,
                               batch_class=AlwaysFailClassTwo)
        assert summary.rows_attempted == 2 and summary.reconciliation.failed == 2 and not summary.complete
    third = run_generate(manifest, out, TINY, schema=SCHEMA, batch_size=2, max_attempts=2,
                         batch_class=AlwaysFailClassTwo)
    assert third.rows_attempted == 0 and third.rows_exhausted == 2 and third.reconciliation.failed == 2
    rows = read_outputs(out, columns=["id", "attempt", "error"]).to_pylist()
    assert sorted((r["attempt"], r["error"]) for r in rows) == [(2, "ValueError: class 2 never works")] * 2

    # --overwrite (here with other settings, which a plain rerun refuses) replaces the job's own rows.
    from jobs.location import Location
    from jobs.run_record import RunRecord

    failed_files = sorted(Path(out).glob("*.parquet"))
    other = GeneratorConfig(model="tiny-dit", num_inference_steps=3, device="cpu")
    fresh = run_generate(manifest, out, other, schema=SCHEMA, batch_size=2, overwrite=True)
    assert fresh.complete and fresh.rows_already_there == 0 and not any(f.exists() for f in failed_files)
    record = RunRecord.load(Location(out))
    assert record.request["num_inference_steps"] == 3 and [r["status"] for r in record.runs] == ["complete"]
    rows = read_outputs(out, columns=["id", "steps_total", "attempt", "error"]).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(manifest.column("id").to_pylist())
    assert all(r["steps_total"] == 3 and r["attempt"] == 1 and r["error"] is None for r in rows)


def test_an_actor_killed_mid_run_is_replaced_and_no_row_is_lost_or_doubled(ray_local, tmp_path):
    import psutil

    out = tmp_path / "out"
    manifest = class_manifest([0, 1, 2], per_class=4, seed=0)
    result = {}
    job = threading.Thread(target=lambda: result.update(summary=run_generate(
        manifest, str(out), TINY, schema=SCHEMA, batch_size=2)))
    job.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        for process in psutil.Process().children(recursive=True):
            try:
                if "MapWorker" in process.name() or "GenerateBatch" in " ".join(process.cmdline()):
                    if any(out.glob("*.parquet")):  # the actor has done work: kill it between batches
                        process.send_signal(signal.SIGKILL)
                        killed = process.pid
                        break
            except psutil.Error:
                continue
        time.sleep(0.05)
    job.join(timeout=240)
    assert killed is not None, "the actor was not found while the job ran"
    summary = result["summary"]
    assert summary.complete, summary
    assert ids_in(str(out)) == Counter(manifest.column("id").to_pylist())


class BrokenActor(GenerateBatch):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)\nand a second line")


def test_an_actor_that_cannot_start_fails_the_run_in_one_line(ray_local, tmp_path):
    from jobs.location import Location
    from jobs.run_record import RunRecord

    out = str(tmp_path / "out")
    summary = run_generate(class_manifest([1], 2, 0), out, TINY, schema=SCHEMA, batch_size=2, batch_class=BrokenActor)
    assert not summary.complete and summary.reconciliation.missing == 2
    assert summary.failure == "ActorDiedError: RuntimeError: CUDA out of memory (simulated)"
    run = RunRecord.load(Location(out)).runs[-1]
    assert run["status"] == "incomplete" and run["missing"] == 2 and run["message"] == summary.failure


# ---- S3: the server restarted mid-write loses what it held; the job must say so, and the rerun heal it


def start_moto(port: int) -> subprocess.Popen:
    moto_server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.05)


class MotoServer:
    """A moto S3 server of one test's own (the session's is shared, so it must not be restarted or paused)."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = start_moto(self.port)

    def restart(self) -> None:
        """Stop the server and start an empty one on the same port: every bucket and object is gone."""
        self.stop()
        self.process = start_moto(self.port)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGCONT)  # a paused server would not act on SIGTERM until resumed
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def own_s3(ray_local, s3_credentials, monkeypatch):
    """(server, fs): a `MotoServer` that AWS_ENDPOINT_URL points at, and an fsspec S3 filesystem on it."""
    import fsspec
    import ray

    worker_env = ray.get(ray.remote(num_cpus=0.1)(lambda: os.environ.get("AWS_ACCESS_KEY_ID")).remote())
    if worker_env is None:
        pytest.skip("this session's Ray was started without S3 test credentials in its workers' environment")
    server = MotoServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    try:
        yield server, fsspec.filesystem("s3", client_kwargs={"endpoint_url": server.endpoint}, skip_instance_cache=True)
    finally:
        server.stop()


def start_generate_in_background(manifest, out: str) -> tuple[threading.Thread, dict]:
    """`run_generate` of the tiny DiT on a thread; the dict gets the summary under "summary" when it returns."""
    result = {}
    job = threading.Thread(target=lambda: result.update(summary=run_generate(
        manifest, out, TINY, schema=SCHEMA, batch_size=2)))
    job.start()
    return job, result


def wait_for_a_data_file(fs, path: str, job: threading.Thread, timeout: float = 120) -> None:
    """Until a parquet file stands under `path`, the job ended, or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.is_alive():
        fs.invalidate_cache()
        if [p for p in fs.find(path) if p.endswith(".parquet")]:
            return
        time.sleep(0.05)


def test_s3_server_restarted_mid_write_is_reported_and_healed_by_a_rerun(own_s3):
    server, fs = own_s3
    fs.mkdir("faults")
    out = "s3://faults/run"
    manifest = class_manifest([0, 1, 2, 3], per_class=4, seed=0)  # 16 rows, 2 blocks of 8: two files
    job, result = start_generate_in_background(manifest, out)
    wait_for_a_data_file(fs, "faults/run", job)
    server.restart()  # empty: the first file, the run record and the lease are gone
    fs.invalidate_cache()
    fs.mkdir("faults")
    job.join(timeout=240)
    summary = result["summary"]
    counts = summary.reconciliation
    assert not summary.complete and counts.missing > 0, counts
    assert counts.written + counts.failed + counts.missing == counts.asked == 16

    rerun = run_generate(manifest, out, TINY, schema=SCHEMA, batch_size=2)
    assert rerun.complete and rerun.rows_attempted == counts.missing + counts.failed
    assert ids_in(out) == Counter(manifest.column("id").to_pylist())


# ---- Ctrl-C, and a second job while the first runs


def generation_actor(pid: int):
    """The Ray Data actor process under `pid` (Ray names it `ray::MapWorker(...)`), or None."""
    import psutil

    for process in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "MapWorker" in process.name():
                return process
    return None


def cli_env() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    environ.setdefault("HF_HUB_OFFLINE", "1")
    return environ


def generate_args(out: Path, steps: int, classes: str, per_class: int) -> list[str]:
    """`invardiff generate` of the tiny DiT in batches of 2 on one worker."""
    return ["generate", "--model", "tiny-dit", "--steps", str(steps), "--classes", classes,
            "--per-class", str(per_class), "--batch-size", "2", "--workers", "1", "--out", str(out)]


def run_cli(args: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
    """The `invardiff` CLI in its own process, as a user runs it (its own Ray, not this session's); output
    captured as text."""
    return subprocess.run([INVARDIFF, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout, **options)


def test_second_job_is_refused_and_ctrl_c_stops_the_first_cleanly(tmp_path):
    import psutil

    out = tmp_path / "out"
    out.mkdir()
    args = generate_args(out, steps=8, classes="0-3", per_class=12)  # 48 rows, 3 blocks: 3 files
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([INVARDIFF, *args], cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    actor = None
    try:
        # Hold the first job (its actor stopped; its driver and lease alive) however fast or slow the machine.
        deadline = time.monotonic() + 150
        while actor is None and first.poll() is None and time.monotonic() < deadline:
            actor = generation_actor(first.pid)
            time.sleep(0.05)
        assert actor is not None, (tmp_path / "first.log").read_text()
        actor.suspend()
        second = run_cli(args, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "is being written by another job" in second.stderr and "Traceback" not in second.stderr

        with contextlib.suppress(psutil.Error):  # a stopped actor can miss Ray's health checks and be replaced
            actor.resume()
        # Until the first file is committed, then Ctrl-C while the (current) actor is held with work to do.
        while not any(out.glob("*.parquet")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        actor = generation_actor(first.pid)
        assert first.poll() is None and actor is not None, (tmp_path / "first.log").read_text()
        actor.suspend()
        first.send_signal(signal.SIGINT)
        time.sleep(1)
        with contextlib.suppress(psutil.Error):  # the driver's Ray shutdown may already have ended it
            actor.resume()  # so that the driver's Ray shutdown can end it
        assert first.wait(timeout=90) == 130, (tmp_path / "first.log").read_text()
    finally:
        if actor is not None:
            with contextlib.suppress(psutil.Error):
                actor.resume()
        if first.poll() is None:
            first.kill()
        log.close()
    text = (tmp_path / "first.log").read_text()
    assert "interrupted: 48 rows asked:" in text and "rerun to resume" in text
    assert not (out / "_lease.json").exists()
    files = sorted(out.glob("*.parquet"))
    ids = Counter(i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())
    assert all(n == 1 for n in ids.values())  # every file readable (nothing half-written), no id twice
    written = int(text.split("interrupted: 48 rows asked: ")[1].split(" written")[0])
    assert written == len(ids) < 48
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---- S3 paused: the server stops answering for a few seconds mid-write (SIGSTOP), then resumes (SIGCONT)


def test_s3_server_paused_mid_write_delays_the_run_and_loses_nothing(own_s3):
    server, fs = own_s3
    fs.mkdir("paused")
    fs.pipe_file("paused/run-notes.txt", b"a neighbour's object")  # beside the output, not in it
    out = "s3://paused/run"
    manifest = class_manifest([0, 1, 2, 3], per_class=4, seed=0)  # 16 rows, 2 blocks of 8: two files
    job, result = start_generate_in_background(manifest, out)
    wait_for_a_data_file(fs, "paused/run", job)
    assert job.is_alive(), "the run ended before the first file could be seen"
    server.process.send_signal(signal.SIGSTOP)  # connections stay open, nothing answers: a stalled endpoint
    time.sleep(PAUSE_S)
    server.process.send_signal(signal.SIGCONT)
    job.join(timeout=180)
    summary = result["summary"]
    counts = summary.reconciliation
    assert counts.written + counts.failed + counts.missing == counts.asked == 16
    if not summary.complete:  # allowed only if it says so with the counts; a rerun must then heal it
        rerun = run_generate(manifest, out, TINY, schema=SCHEMA, batch_size=2)
        assert rerun.complete and rerun.rows_attempted == counts.missing + counts.failed
    assert ids_in(out) == Counter(manifest.column("id").to_pylist())
    assert fs.cat_file("paused/run-notes.txt") == b"a neighbour's object"


PAUSE_S = 6  # well under the lease expiry (60 s) and s3fs's timeouts: the run must ride it out


# ---- the output's filesystem refuses writes: read-only, then full. Both real, at the OS level: the suite runs
# as root, which bypasses permission bits, so the job runs without the capabilities that do that; a full disk
# is a small tmpfs.


def without_permission_override():
    """preexec_fn: drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the bounding set, so the
    process (root here) gets permission bits enforced after exec like any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_read_only_output_is_refused_in_one_line_then_a_rerun_writes_every_row_once(ray_local, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "notes.txt").write_text("a neighbour's file")
    out.chmod(0o555)
    try:
        refused = run_cli(generate_args(out, steps=2, classes="0-1", per_class=2), timeout=180,
                          preexec_fn=without_permission_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot run the job without root's permission override here ({e})")
    finally:
        out.chmod(0o755)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --out {out} is not writable (Permission denied)"], refused.stderr
    assert "Traceback" not in refused.stderr and list(out.iterdir()) == []
    assert (tmp_path / "notes.txt").read_text() == "a neighbour's file"

    manifest = class_manifest([0, 1], per_class=2, seed=0)
    rerun = run_generate(manifest, str(out), TINY, schema=SCHEMA, batch_size=2)
    assert rerun.complete and rerun.rows_attempted == 4
    assert ids_in(str(out)) == Counter(manifest.column("id").to_pylist())


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs, or a skip naming why it cannot be mounted (not root, no CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk test: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_is_reported_with_counts_in_one_line_then_a_rerun_writes_every_row_once(ray_local, small_filesystem):
    out = small_filesystem / "out"
    ballast = small_filesystem / "ballast"  # a neighbour's file that fills the disk
    free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
    ballast.write_bytes(b"\0" * (free - 12 * 1024))  # room for the lease and the run record, not a data file
    # The failing run is the CLI in its own process: what the user sees, and its Ray goes with it.
    full = run_cli(generate_args(out, steps=2, classes="0-3", per_class=2), timeout=240)
    assert full.returncode == 1, full.stdout + full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "\\n" not in errors[0], full.stderr
    assert errors[0].startswith("error: run incomplete (OSError: [Errno 28] ") and "No space left on device" in errors[0]
    assert "8 rows asked: 0 written, 0 failed, 8 missing" in errors[0]
    assert [p.name for p in out.iterdir()] == ["_run.json"]  # the half-written file removed; no lease left
    assert ballast.stat().st_size == free - 12 * 1024

    ballast.unlink()  # space freed
    manifest = class_manifest([0, 1, 2, 3], per_class=2, seed=0)
    rerun = run_generate(manifest, str(out), TINY, schema=SCHEMA, batch_size=2)
    assert rerun.complete and rerun.rows_attempted == 8
    assert ids_in(str(out)) == Counter(manifest.column("id").to_pylist())
