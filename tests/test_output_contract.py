"""The output contract without a Ray job: who owns an output location, one writer at a time, what a rerun may
do, and bad input refused on the driver in one line before any work (docs/contracts.md, RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.lease import LEASE_NAME, Lease, LeaseHeldError
from jobs.location import Location, LocationError
from jobs.manifest import ManifestError, ManifestSchema, class_manifest, parse_class_range, validate_manifest
from jobs.outputs import ForeignFilesError, Inventory, Rows, reconcile
from jobs.run_record import RunRecord

REPO = Path(__file__).resolve().parent.parent
INVARDIFF = str(Path(sys.executable).parent / "invardiff")
DIGITS = ManifestSchema("class_label", num_classes=10)
RUN_A, RUN_B = "r20260101T000000Z0000aaaa", "r20260102T000000Z0000bbbb"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def invardiff(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run([INVARDIFF, *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout)


# ---- ownership: foreign files are refused, never deleted or read


@pytest.mark.parametrize("foreign", ["user-table.parquet", "manifest.parquet", "notes/readme.txt"])
def test_location_with_files_the_job_did_not_write_is_refused_and_left_as_it_was(tmp_path, foreign, monkeypatch):
    import jobs.ray_runtime
    from jobs.generate import run_generate
    from pipelines.build import GeneratorConfig

    monkeypatch.setattr(jobs.ray_runtime, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))

    out = tmp_path / "out"
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    if foreign == "manifest.parquet":  # a manifest next to the data used to be taken for output rows
        pq.write_table(class_manifest([1], 2, 0), out / foreign)
    elif foreign.endswith(".parquet"):  # a valid Parquet without an id column used to be deleted as "unreadable"
        pq.write_table(pa.table({"x": [1, 2, 3]}), out / foreign)
    else:
        (out / foreign).write_text("mine")
    before = snapshot(out)

    with pytest.raises(ForeignFilesError, match=f"holds 1 file\\(s\\) this job did not write \\({foreign}\\)"):
        run_generate(class_manifest([1], 2, 0), str(out), GeneratorConfig(model="tiny-dit", num_inference_steps=2),
                     schema=DIGITS)
    assert snapshot(out) == before  # the lease it took to look was released, nothing else changed


def test_a_foreign_object_named_like_the_record_is_not_reinterpreted(tmp_path):
    (tmp_path / "_run.json").write_text('{"someone": "else"}')
    with pytest.raises(LocationError, match="not an invardiff run record"):
        RunRecord.load(Location(str(tmp_path)))


def test_inventory_sorts_entries_by_owner(tmp_path):
    location = Location(str(tmp_path))
    RunRecord(request={}, runs=[{"run_id": RUN_A}]).save(location)
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / f"{RUN_A}_w_000000.parquet")
    pq.write_table(pa.table({"id": ["b"]}), tmp_path / f"{RUN_B}_w_000000.parquet")  # a run the record never had
    (tmp_path / f".{RUN_A}_w_000001.parquet.{'0' * 32}.tmp").write_bytes(b"half")
    (tmp_path / ".DS_Store").write_bytes(b"")
    inventory = Inventory.take(location, RunRecord.load(location))
    assert inventory.data == [f"{RUN_A}_w_000000.parquet"]
    assert inventory.temporaries == [f".{RUN_A}_w_000001.parquet.{'0' * 32}.tmp"]
    assert inventory.foreign == [".DS_Store", f"{RUN_B}_w_000000.parquet"]
    with pytest.raises(ForeignFilesError, match="holds 2 file"):
        inventory.refuse_foreign(location)


# ---- one row per id: superseded error rows go, reconciliation counts what the location holds


def write_rows(folder: Path, name: str, rows: list[dict]) -> None:
    schema = pa.schema([("id", pa.string()), ("seed", pa.int64()), ("class_label", pa.int64()),
                        ("error", pa.string()), ("attempt", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)


def test_compaction_keeps_the_first_good_row_else_the_latest_error_and_reconcile_counts(tmp_path):
    location = Location(str(tmp_path))
    first, second = f"{RUN_A}_w_000000.parquet", f"{RUN_B}_w_000000.parquet"
    write_rows(tmp_path, first, [
        {"id": "ok", "seed": 1, "class_label": 0, "error": None, "attempt": 1},
        {"id": "retried", "seed": 2, "class_label": 0, "error": "boom", "attempt": 1},
        {"id": "twice", "seed": 3, "class_label": 0, "error": "boom", "attempt": 1},
        {"id": "dup", "seed": 4, "class_label": 0, "error": None, "attempt": 1},
    ])
    write_rows(tmp_path, second, [
        {"id": "retried", "seed": 2, "class_label": 0, "error": None, "attempt": 2},
        {"id": "twice", "seed": 3, "class_label": 0, "error": "boom again", "attempt": 2},
        {"id": "dup", "seed": 4, "class_label": 0, "error": None, "attempt": 1},  # an orphaned writer's copy
    ])
    rows = Rows.read(location, [first, second])
    assert rows.compact(location) == 3
    after = Rows.read(location, [first, second]).table
    assert sorted(zip(after.column("id").to_pylist(), after.column("attempt").to_pylist())) == [
        ("dup", 1), ("ok", 1), ("retried", 2), ("twice", 2)
    ]
    result = reconcile(Rows.read(location, [first, second]), pa.array(["ok", "retried", "twice", "dup", "lost"]))
    assert (result.asked, result.written, result.failed, result.missing) == (5, 3, 1, 1)
    assert result.reasons == (("boom again", 1),) and not result.complete


# ---- one writer at a time, recoverable after a crash


def lease_document(**fields) -> bytes:
    now = time.time()
    doc = {"format": "invardiff-lease/1", "token": "t", "host": socket.gethostname(), "pid": os.getpid(),
           "command": "x", "acquired_at": now, "heartbeat_at": now, "expiry_s": 60.0, **fields}
    return json.dumps(doc).encode()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def check_lease_contract(location: Location, put) -> None:
    held = Lease.acquire(location, command="first")
    with pytest.raises(LeaseHeldError, match="being written by another job .*--break-lease"):
        Lease.acquire(location, command="second")
    held.release()
    assert location.read(LEASE_NAME) is None

    put(lease_document(pid=dead_pid()))  # a driver SIGKILLed on this host
    Lease.acquire(location, command="after crash").release()
    put(lease_document(host="elsewhere", heartbeat_at=time.time() - 3600))  # a holder on a dead machine
    Lease.acquire(location, command="after expiry").release()
    put(lease_document(host="elsewhere"))  # alive, as far as anyone can tell
    with pytest.raises(LeaseHeldError):
        Lease.acquire(location, command="third")
    Lease.acquire(location, command="forced", break_lease=True).release()

    stale = lease_document(pid=dead_pid())  # two jobs take over the same stale lease: one wins
    put(stale)
    assert location.swap(LEASE_NAME, stale, lease_document(token="one"))
    assert not location.swap(LEASE_NAME, stale, lease_document(token="two"))
    assert json.loads(location.read(LEASE_NAME))["token"] == "one"


def test_lease_on_a_local_disk(tmp_path):
    location = Location(str(tmp_path / "out"))
    check_lease_contract(location, lambda data: (tmp_path / "out" / LEASE_NAME).write_bytes(data))


def test_lease_on_s3(s3_endpoint, s3_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    location = Location("s3://lease-bucket/run1")
    location.fs.mkdir("lease-bucket")
    check_lease_contract(location, lambda data: location.fs.pipe_file(location.path(LEASE_NAME), data))


def test_lost_lease_is_noticed_at_the_next_heartbeat(tmp_path):
    location = Location(str(tmp_path))
    lease = Lease.acquire(location, command="slow")
    (tmp_path / LEASE_NAME).write_bytes(lease_document(token="usurper"))
    assert not lease.renew()
    lease.release()
    assert json.loads(location.read(LEASE_NAME))["token"] == "usurper"  # not ours to remove any more


# ---- a rerun must ask for the same thing


def test_record_names_every_setting_that_differs():
    record = RunRecord(request={"model_fingerprint": "sha256:" + "a" * 64, "num_inference_steps": 50,
                                "guidance_scale": 1.5, "plan_id": None, "model_id": "digits"})
    asked = dict(record.request, num_inference_steps=10, plan_id="abc", model_id="/other/path")
    assert record.differences(asked) == ["num_inference_steps: 50 there, 10 asked", "plan_id: null there, abc asked"]


def test_rerun_with_other_settings_or_other_seeds_is_refused_before_any_work(tmp_path):
    from jobs.generate import RequestMismatchError, run_generate
    from jobs.plan_store import signature_for
    from jobs.run_record import request_of
    from pipelines.build import GeneratorConfig

    config = GeneratorConfig(model="tiny-dit", num_inference_steps=2, device="cpu")
    location = Location(str(tmp_path))
    RunRecord(request=request_of(signature_for(config), policy="none", plan_id=None),
              runs=[{"run_id": RUN_A}]).save(location)
    write_rows(tmp_path, f"{RUN_A}_w_000000.parquet",
               [{"id": "a", "seed": 1, "class_label": 0, "error": None, "attempt": 1}])
    before = snapshot(tmp_path)
    manifest = pa.table({"id": ["a"], "seed": [2], "class_label": [0]})
    with pytest.raises(RequestMismatchError, match="id 'a': seed 1 and class_label 0 there, seed 2 and class_label 0"):
        run_generate(manifest, str(tmp_path), config, schema=DIGITS)
    other = GeneratorConfig(model="tiny-dit", num_inference_steps=3, device="cpu")
    with pytest.raises(RequestMismatchError, match="num_inference_steps: 2 there, 3 asked.*--overwrite"):
        run_generate(manifest.set_column(1, "seed", pa.array([1])), str(tmp_path), other, schema=DIGITS)
    assert snapshot(tmp_path) == before


def test_cuda_without_a_cuda_device_is_refused_before_any_work(tmp_path, monkeypatch):
    import torch

    from jobs.errors import JobInputError
    from jobs.generate import run_generate
    from pipelines.build import GeneratorConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(JobInputError, match="--device cuda: this machine has no CUDA device"):
        run_generate(class_manifest([1], 1, 0), str(tmp_path / "out"),
                     GeneratorConfig(model="tiny-dit", num_inference_steps=2, device="cuda"), schema=DIGITS)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_found_by_the_lease_probe(s3_endpoint, s3_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    with pytest.raises(LocationError, match="s3://no-such-bucket/run is not writable"):
        Lease.acquire(Location("s3://no-such-bucket/run"), command="x")


# ---- bad input: one clear error before any work


def test_seeds_and_labels_beyond_int64_are_named_not_overflowed():
    table = {"id": ["a", "b", "c"], "seed": [2**63, 2**70, 1], "class_label": [1, 2, 2**70]}
    with pytest.raises(ManifestError) as err:
        validate_manifest(_raw(table), DIGITS)
    message = str(err.value)
    assert "row 0 (id 'a'): seed must be in [0, 2**63)" in message
    assert "row 1 (id 'b'): seed must be in [0, 2**63)" in message
    assert f"row 2 (id 'c'): class_label {2**70} is not a class of this model" in message
    with pytest.raises(ManifestError, match="--seed must be in"):
        class_manifest([1], 4, 2**63 - 2)
    with pytest.raises(ManifestError, match="spans"):
        parse_class_range("0-99999999999")


def _raw(columns: dict):
    from jobs.manifest import RawManifest

    return RawManifest(columns)


def test_binary_ids_are_decoded_as_text():
    table = pa.table({"id": pa.array([b"a", b"b"], pa.binary()), "seed": [1, 2], "class_label": [0, 1]})
    assert validate_manifest(table, DIGITS).column("id").to_pylist() == ["a", "b"]
    with pytest.raises(ManifestError, match="row 0: id is binary and not UTF-8"):
        validate_manifest(pa.table({"id": pa.array([b"\xff"]), "seed": [1], "class_label": [0]}), DIGITS)


def test_plan_store_pointer_cannot_name_a_file_outside_the_store(tmp_path):
    from jobs.plan_store import PlanStore, StoreError

    key = "dit-000000000000-0000000000"
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / key).mkdir(parents=True)
    pointer = {"format": "invardiff-plan-pointer/1", "key": key, "version": "../../../outside/evil",
               "plan_id": "0" * 12, "checksum": "sha256:0", "promoted_at": "2026-01-01T00:00:00Z"}
    (tmp_path / "store" / key / "latest.json").write_text(json.dumps(pointer))
    with pytest.raises(StoreError, match="is not a version name of this store"):
        PlanStore(str(tmp_path / "store")).latest(key)
    (tmp_path / "store" / key / "latest.json").unlink()
    (tmp_path / "store" / key / "latest.json").mkdir()
    with pytest.raises(StoreError, match="is a folder, not a file"):
        PlanStore(str(tmp_path / "store")).latest(key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(
    st.tuples(
        st.one_of(st.text(min_size=1, max_size=4), st.integers(0, 50), st.none(), st.just(""), st.binary(max_size=3)),
        st.one_of(st.integers(-3, 2**64), st.none(), st.floats(allow_nan=True), st.text(max_size=2), st.booleans()),
        st.one_of(st.integers(-2, 2**65), st.none(), st.floats(allow_nan=True), st.text(max_size=2)),
    ),
    min_size=1, max_size=12,
))
def test_fuzzed_manifests_name_every_bad_row_and_keep_every_good_one(rows):
    table = _raw({"id": [r[0] for r in rows], "seed": [r[1] for r in rows], "class_label": [r[2] for r in rows]})
    bad = {i for i, (row_id, seed, label) in enumerate(rows) if _bad_row(rows, i)}
    try:
        out = validate_manifest(table, DIGITS)
    except ManifestError as e:
        message = str(e)
        assert bad, f"a manifest without bad rows was refused: {message}"
        for i in bad:
            assert f"row {i}" in message, f"row {i} ({rows[i]!r}) is not named in: {message}"
        return
    assert not bad, f"rows {sorted(bad)} were accepted"
    assert out.num_rows == len(rows)  # no good row lost, in order, with its values
    assert out.column("seed").to_pylist() == [int(r[1]) for r in rows]
    assert out.column("class_label").to_pylist() == [int(r[2]) for r in rows]


def _bad_row(rows, i) -> bool:
    def integral(v):
        return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))

    def text_id(v):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                return None
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return str(v)

    row_id, seed, label = rows[i]
    ids = [text_id(r[0]) for r in rows]
    duplicate = ids[i] is not None and ids[i] in ids[:i]
    return (ids[i] is None or duplicate or not integral(seed) or not 0 <= int(seed) < 2**63
            or not integral(label) or not 0 <= int(label) < 10)


def test_cli_refuses_bad_input_in_one_line_before_any_work(tmp_path):
    """Each case exits 2 with one `error:` line on stderr and no traceback, before Ray starts."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "seed": 2**70, "class_label": 1}) + "\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    cases = {
        "seed past int64": ["--manifest", str(manifest), "--out", str(tmp_path / "o1")],
        "--out is a file": ["--classes", "1", "--per-class", "1", "--out", str(a_file)],
        "nested plan": ["--classes", "1", "--per-class", "1", "--plan", str(nested), "--out", str(tmp_path / "o2")],
    }
    for case, args in cases.items():
        proc = invardiff("generate", "--model", "tiny-dit", "--steps", "2", *args)
        assert proc.returncode == 2, f"{case}: {proc.stdout}{proc.stderr}"
        assert "Traceback" not in proc.stderr, f"{case}: {proc.stderr}"
        error = proc.stderr[proc.stderr.index("error: "):].splitlines()
        # One line; a manifest's message adds one line per bad row it names.
        assert len(error) == (2 if case == "seed past int64" else 1), f"{case}: {proc.stderr}"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert a_file.read_text() == "x"


LISTENERS = """
import json, os, time
import psutil, ray
from jobs.ray_runtime import ensure_ray
ensure_ray()
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up and listening too
time.sleep(2)
tree = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
print(json.dumps(sorted({c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.pid in tree})))
ray.shutdown()
"""


def test_embedded_ray_listens_on_loopback_only():
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", LISTENERS], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    addresses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert addresses and set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses
