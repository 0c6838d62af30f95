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

from jobs.manifest import class_manifest
from test_faults import INVARDIFF, REPO, cli_env

BOUND = "200"  # dB, above the 100 dB that identical images are capped at: every shadow is below it
ALARM = "shadow fidelity "  # the alarm's line; a shadow may differ from its row by rounding (batch of its own)


def generate(out: Path, classes: int, per_class: int, shadow: float, *extra: str
             ) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The CLI's run of classes 0..classes-1, and the ids it is asked for."""
    args = ["generate", "--steps", "2", "--classes", f"0-{classes - 1}", "--per-class", str(per_class), "--seed", "0",
            "--batch-size", "4", "--rows-per-file", "4", "--workers", "1", "--shadow", str(shadow), "--min-psnr", BOUND,
            "--out", str(out), *extra]
    done = subprocess.run([INVARDIFF, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240)
    return done, set(class_manifest(list(range(classes)), per_class, seed=0).column("id").to_pylist())


def last_run(out: Path) -> dict:
    return json.loads((out / "_run.json").read_text())["runs"][-1]


def written_ids(out: Path) -> Counter:
    """Every id in the job's Parquet files; reading each file whole fails on a half-written one."""
    return Counter(i for f in sorted(out.glob("*.parquet")) for i in pq.read_table(f).column("id").to_pylist())


def assert_no_leftovers(out: Path) -> None:
    assert not (out / "_lease.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix not in (".parquet", ".json")]


def test_stop_on_drift_stops_the_run_with_exit_4_and_leaves_only_whole_rows(tmp_path):
    out = tmp_path / "out"
    # 1000 rows in blocks of 32; the 8th shadow of a tenth is row 120, so the alarm trips in the 4th block, after
    # files were committed, and far from the end
    done, asked = generate(out, 10, 100, 0.1, "--stop-on-drift")
    log = done.stdout + done.stderr
    assert done.returncode == 4, log
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: stopped on drift ({ALARM}"), log
    assert f"below --min-psnr {BOUND}" in errors[0] and "Traceback" not in log

    run = last_run(out)
    assert run["status"] == "incomplete" and run["message"].startswith("stopped on drift")
    assert run["shadow"]["stopped"] is True and run["shadow"]["drift"].startswith(ALARM)
    assert run["shadow"]["drift"].endswith(f"below --min-psnr {BOUND}")
    assert run["shadow"]["rows"] >= 8 and run["shadow"]["mean_psnr"] <= 100.0
    ids = written_ids(out)
    assert all(n == 1 for n in ids.values()) and set(ids) <= asked
    assert 0 < run["written"] == len(ids) < len(asked)
    assert run["missing"] == len(asked) - len(ids) and run["failed"] == 0
    assert f"{len(asked)} rows asked: {len(ids)} written, 0 failed, {len(asked) - len(ids)} missing" in errors[0]
    assert_no_leftovers(out)


def test_without_stop_on_drift_the_alarm_is_logged_and_every_row_written(tmp_path):
    out = tmp_path / "out"
    done, asked = generate(out, 4, 6, 1.0)  # 24 rows: the alarm trips at the second of six batches
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert f"drift alarm: {ALARM}" in done.stderr and f"DRIFT: {ALARM}" in done.stdout, log
    assert not [line for line in done.stderr.splitlines() if line.startswith("error:")], log

    run = last_run(out)
    assert run["status"] == "complete" and run["written"] == 24 and run["missing"] == 0
    assert run["shadow"]["stopped"] is False and run["shadow"]["drift"].startswith(ALARM)
    assert run["shadow"]["drift"].endswith(f"below --min-psnr {BOUND}")
    assert run["shadow"]["rows"] == 24
    assert written_ids(out) == Counter(asked)
    assert_no_leftovers(out)
