"""Resume: a generation job killed halfway (SIGKILL, no chance to clean up), then rerun with the same
output path, writes only the missing ids: every manifest id exactly once, nothing committed before the
kill rewritten, and a partially written file never leaves a duplicated or lost row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.location import Location
from jobs.outputs import Inventory, read_outputs
from jobs.run_record import RunRecord

REPO = Path(__file__).resolve().parent.parent
INVARDIFF = str(Path(sys.executable).parent / "invardiff")
# 48 rows at batch 2 on one actor: three blocks of 16, each committed as its own Parquet file.
ARGS = ["generate", "--classes", "0-5", "--per-class", "8", "--steps", "10", "--batch-size", "2", "--workers", "1"]
EXPECTED_IDS = sorted(f"c{c}-s0-{i}" for c in range(6) for i in range(8))


def env() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    environ.setdefault("HF_HUB_OFFLINE", "1")
    return environ


def committed_files(out: Path) -> dict[Path, int]:
    """Readable output files and their row counts (a file still being written has no footer yet)."""
    files = {}
    for path in sorted(out.glob("*.parquet")) if out.exists() else []:
        try:
            files[path] = pq.read_metadata(path).num_rows
        except Exception:  # noqa: BLE001 - partial file
            continue
    return files


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the CLI and every process it started (its embedded Ray: raylet, GCS, the actor)."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    for member in tree:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    process.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def test_job_killed_halfway_then_rerun_writes_each_id_exactly_once(tmp_path):
    out = tmp_path / "out"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [INVARDIFF, *ARGS, "--out", str(out)], cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 150
        while not committed_files(out) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, f"the job ended before it could be killed:\n{(tmp_path / 'first.log').read_text()}"
        assert committed_files(out), "no output file was committed in time"
    finally:
        kill_tree(first)
    before = committed_files(out)
    rows_before = sum(before.values())
    assert 0 < rows_before < len(EXPECTED_IDS), f"kill did not land halfway: {rows_before} rows written"
    kept = {path: path.read_bytes() for path in before}

    # A write cut off mid-file: the rows of a block not yet committed, with the footer missing, in a file
    # named as the killed run names its files.
    killed_run = RunRecord.load(Location(str(out))).runs[-1]
    assert killed_run["status"] == "running"
    missing = sorted(set(EXPECTED_IDS) - set(read_outputs(str(out), columns=["id"]).column("id").to_pylist()))[:5]
    template = pq.read_table(next(iter(before))).slice(0, 1)
    partial_rows = pa.concat_tables([template] * len(missing)).set_column(
        0, "id", pa.array(missing, pa.string())
    )
    partial = out / f"{killed_run['run_id']}_killed-mid-write_000009-0.parquet"
    pq.write_table(partial_rows, partial)
    partial.write_bytes(partial.read_bytes()[: partial.stat().st_size // 2])

    rerun = subprocess.run(
        [INVARDIFF, *ARGS, "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=150
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    written = len(EXPECTED_IDS) - rows_before
    assert f"wrote {written} rows to {out} (0 errors, {rows_before} already there)" in rerun.stdout
    assert f"removing {partial}, a write cut off before it finished" in rerun.stderr
    assert not partial.exists()

    table = read_outputs(str(out), columns=["id", "error", "png"])
    ids = table.column("id").to_pylist()
    assert sorted(ids) == EXPECTED_IDS  # each manifest id exactly once: none lost, none duplicated
    assert table.column("error").null_count == table.num_rows
    for path, content in kept.items():  # what was committed before the kill is kept as it was
        assert path.read_bytes() == content

    again = subprocess.run(
        [INVARDIFF, *ARGS, "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"wrote 0 rows to {out} (0 errors, {len(EXPECTED_IDS)} already there)" in again.stdout


RUN = "r20260101T000000Z0123abcd"


def owned_location(tmp_path) -> Location:
    """A location whose run record lists run RUN, as a job leaves it."""
    location = Location(str(tmp_path))
    RunRecord(request={}, runs=[{"run_id": RUN}]).save(location)
    return location


def test_own_unreadable_files_are_removed_and_foreign_ones_kept(tmp_path):
    location = owned_location(tmp_path)
    good = pa.table({"id": ["a", "b"], "seed": pa.array([1, 2], pa.int64())})
    pq.write_table(good, tmp_path / f"{RUN}_w_000000.parquet")
    pq.write_table(pa.table({"id": ["c"], "seed": pa.array([3], pa.int64())}), tmp_path / f"{RUN}_w_000001.parquet")
    truncated = (tmp_path / f"{RUN}_w_000001.parquet").read_bytes()[:-12]
    (tmp_path / f"{RUN}_w_000001.parquet").write_bytes(truncated)
    (tmp_path / "_checkpoint").mkdir()
    pq.write_table(pa.table({"id": ["z"]}), tmp_path / "_checkpoint" / "pending.parquet")

    inventory = Inventory.take(location, RunRecord.load(location))
    assert inventory.data == [f"{RUN}_w_000000.parquet"]
    assert inventory.partial == [f"{RUN}_w_000001.parquet"]
    assert inventory.foreign == ["_checkpoint/pending.parquet"]
    inventory.remove_leftovers(location)
    assert not (tmp_path / f"{RUN}_w_000001.parquet").exists()
    assert (tmp_path / "_checkpoint" / "pending.parquet").exists()
    assert read_outputs(str(tmp_path)).column("id").to_pylist() == ["a", "b"]


@pytest.mark.parametrize("content", [b"", b"PAR1"])
def test_empty_or_header_only_file_counts_as_partial(tmp_path, content):
    location = owned_location(tmp_path)
    (tmp_path / f"{RUN}_x_000000.parquet").write_bytes(content)
    inventory = Inventory.take(location, RunRecord.load(location))
    assert inventory.partial == [f"{RUN}_x_000000.parquet"] and inventory.data == []
