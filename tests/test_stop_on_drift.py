"""`generate --shadow F --min-psnr 200` on the embedded digits model: the live drift alarm must trip once 8 rows
are shadowed (a shadow of an uncached run measures the 100 dB cap). With --stop-on-drift the job stops early with
exit code 4, one error line, a run record that says why, and only whole rows on disk; without it the same alarm is
logged and every row is written.

The CLI runs in its own process: stopping the run shuts Ray down, which must not hit the session's shared Ray.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.manifest import class_manifest
from test_faults import INVARDIFF, REPO, cli_env

BOUND = "200"  # dB, above the 100 dB that identical images are capped at: every shadow is below it
ALARM = "shadow fidelity "  # the alarm's line; a shadow may differ from its row by rounding (batch of its own)


class Run:
    """The CLI's run of classes 0..classes-1 started in the background; `result()` waits for it."""

    def __init__(self, out: Path, classes: int, per_class: int, shadow: float, *extra: str) -> None:
        args = ["generate", "--steps", "2", "--classes", f"0-{classes - 1}", "--per-class", str(per_class), "--seed",
                "0", "--batch-size", "4", "--rows-per-file", "4", "--workers", "1", "--shadow", str(shadow),
                "--min-psnr", BOUND, "--out", str(out), *extra]
        self.out = out
        self.asked = set(class_manifest(list(range(classes)), per_class, seed=0).column("id").to_pylist())
        # Files, not pipes: the run not waited on yet must never block on a full pipe
        self.stdout, self.stderr = out.with_suffix(".stdout"), out.with_suffix(".stderr")
        with self.stdout.open("w") as stdout, self.stderr.open("w") as stderr:
            self.process = subprocess.Popen([INVARDIFF, *args], cwd=REPO, env=cli_env(), stdout=stdout, stderr=stderr)

    def result(self) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout=240)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, self.stdout.read_text(),
                                           self.stderr.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs at once: each is mostly Ray starting up, which overlaps well even on 2 cores."""
    root = tmp_path_factory.mktemp("drift")
    # 1000 rows in blocks of 32; the 8th shadow of a tenth is row 120, so the alarm trips in the 4th block, after
    # files were committed, and far from the end
    stopped = Run(root / "stopped", 10, 100, 0.1, "--stop-on-drift")
    logged = Run(root / "logged", 4, 6, 1.0)  # 24 rows: the alarm trips at the second of six batches
    yield {"stopped": stopped, "logged": logged}
    for run in (stopped, logged):  # a test not run (-k) leaves its process: it must not outlive the session
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def last_run(out: Path) -> dict:
    return json.loads((out / "_run.json").read_text())["runs"][-1]


def written_ids(out: Path) -> Counter:
    """Every id in the job's Parquet files; reading each file whole fails on a half-written one."""
    return Counter(i for f in sorted(out.glob("*.parquet")) for i in pq.read_table(f).column("id").to_pylist())


def assert_no_leftovers(out: Path) -> None:
    assert not (out / "_lease.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix not in (".parquet", ".json")]


def test_stop_on_drift_stops_the_run_with_exit_4_and_leaves_only_whole_rows(runs):
    out, asked = runs["stopped"].out, runs["stopped"].asked
    done = runs["stopped"].result()
    log = done.stdout + done.stderr
    assert done.returncode == 4, log
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: stopped on drift ({ALARM}"), log
    assert f"below --min-psnr {BOUND}" in errors[0] and "Traceback" not in log

    record = last_run(out)
    assert record["status"] == "incomplete" and record["message"].startswith("stopped on drift")
    assert record["shadow"]["stopped"] is True and record["shadow"]["drift"].startswith(ALARM)
    assert record["shadow"]["drift"].endswith(f"below --min-psnr {BOUND}")
    assert record["shadow"]["rows"] >= 8 and record["shadow"]["mean_psnr"] <= 100.0
    ids = written_ids(out)
    assert all(n == 1 for n in ids.values()) and set(ids) <= asked
    assert 0 < record["written"] == len(ids) < len(asked)
    assert record["missing"] == len(asked) - len(ids) and record["failed"] == 0
    assert f"{len(asked)} rows asked: {len(ids)} written, 0 failed, {len(asked) - len(ids)} missing" in errors[0]
    assert_no_leftovers(out)


def test_without_stop_on_drift_the_alarm_is_logged_and_every_row_written(runs):
    out, asked = runs["logged"].out, runs["logged"].asked
    done = runs["logged"].result()
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert f"drift alarm: {ALARM}" in done.stderr and f"DRIFT: {ALARM}" in done.stdout, log
    assert not [line for line in done.stderr.splitlines() if line.startswith("error:")], log
    assert "RAY_BACKEND_LOG_LEVEL" not in log, log  # Ray's start-up notice of its log level is held back

    record = last_run(out)
    assert record["status"] == "complete" and record["written"] == 24 and record["missing"] == 0
    assert record["shadow"]["stopped"] is False and record["shadow"]["drift"].startswith(ALARM)
    assert record["shadow"]["drift"].endswith(f"below --min-psnr {BOUND}")
    assert record["shadow"]["rows"] == 24
    assert written_ids(out) == Counter(asked)
    assert_no_leftovers(out)
