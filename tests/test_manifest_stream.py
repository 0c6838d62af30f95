"""Streaming manifests: validation in chunks (the driver keeps ids, not rows), generated class ranges, and a job
whose rows Ray Data reads from the manifest file itself."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import ManifestError, ManifestSchema, iter_manifest_chunks, scan_chunks
from jobs.manifest_source import ClassRange, ManifestFile
from pipelines.build import GeneratorConfig

DIGITS = ManifestSchema("class_label", num_classes=10)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_problems_across_chunks_are_named_with_global_rows_and_duplicates_point_to_the_first(tmp_path):
    rows = [{"id": f"r{i}", "seed": i, "class_label": i % 10} for i in range(10)]
    rows[4]["seed"] = -1
    rows[8]["id"] = "r1"  # a duplicate two chunks after its first row
    rows[9]["class_label"] = 12
    uri = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ManifestError) as err:
        scan_chunks(iter_manifest_chunks(uri, chunk_rows=3), DIGITS)
    msg = str(err.value)
    assert msg.startswith("manifest has 3 problem(s) in 3 row(s)")
    assert "row 4 (id 'r4'): seed must be in [0, 2**63), got -1" in msg
    assert "row 8 (id 'r1'): id duplicates row 1" in msg
    assert "row 9 (id 'r9'): class_label 12 is not a class of this model (0..9)" in msg


def test_only_the_first_bad_rows_are_listed_and_the_rest_counted(tmp_path):
    rows = [{"id": f"r{i}", "seed": -1, "class_label": 0} for i in range(50)]
    with pytest.raises(ManifestError) as err:
        scan_chunks(iter_manifest_chunks(write_jsonl(tmp_path / "m.jsonl", rows), chunk_rows=7), DIGITS)
    msg = str(err.value)
    assert "in 50 row(s)" in msg and "row 19 (id 'r19')" in msg and "row 20 (id 'r20')" not in msg
    assert "... and 30 more in 30 more row(s)" in msg


def test_extra_columns_unify_across_chunks_or_are_refused(tmp_path):
    rows = [{"id": str(i), "seed": i, "class_label": 0, "score": 1 if i < 3 else 1.5} for i in range(6)]
    index = scan_chunks(iter_manifest_chunks(write_jsonl(tmp_path / "a.jsonl", rows), chunk_rows=3), DIGITS)
    assert index.schema.field("score").type == pa.float64() and index.ids.to_pylist() == [str(i) for i in range(6)]
    rows = [{"id": str(i), "seed": i, "class_label": 0, "tag": 1 if i < 3 else "x"} for i in range(6)]
    with pytest.raises(ManifestError, match="'tag' mixes value types"):
        scan_chunks(iter_manifest_chunks(write_jsonl(tmp_path / "b.jsonl", rows), chunk_rows=3), DIGITS)


def test_class_range_rows_are_computed_from_their_index():
    source = ClassRange((3, 7), per_class=3, seed=10)
    assert source.rows(2, 5).to_pylist() == [
        {"id": "c3-s10-2", "seed": 12, "class_label": 3},
        {"id": "c7-s10-0", "seed": 13, "class_label": 7},
        {"id": "c7-s10-1", "seed": 14, "class_label": 7},
    ]
    assert scan_chunks(source.chunks(), DIGITS).num_rows == 6
    with pytest.raises(ManifestError, match="class 3 is given more than once"):
        ClassRange((3, 3), per_class=1, seed=0)
    with pytest.raises(ManifestError, match="class_label 12 is not a class"):
        scan_chunks(ClassRange((12,), 1, 0).chunks(), DIGITS)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_job_reads_the_manifest_file_with_ray_data_and_resumes(ray_local, tmp_path, fmt):
    from jobs.generate import run_generate
    from jobs.outputs import read_outputs

    rows = [{"id": 100 + i, "seed": i, "class_label": i % 3, "tag": f"t{i}"} for i in range(6)]
    if fmt == "jsonl":
        uri = write_jsonl(tmp_path / "m.jsonl", rows)
    else:
        uri = str(tmp_path / "m.parquet")
        pq.write_table(pa.Table.from_pylist(rows), uri, row_group_size=2)
    config = GeneratorConfig(model="tiny-dit", num_inference_steps=2, device="cpu")
    out = str(tmp_path / "out")
    summary = run_generate(ManifestFile(uri), out, config, schema=DIGITS, batch_size=2)
    assert summary.complete and summary.rows_attempted == 6
    written = read_outputs(out, columns=["id", "tag", "attempt"]).to_pylist()
    assert Counter(r["id"] for r in written) == Counter(str(100 + i) for i in range(6))  # integer ids as text
    assert {r["id"]: r["tag"] for r in written} == {str(100 + i): f"t{i}" for i in range(6)}
    again = run_generate(ManifestFile(uri), out, config, schema=DIGITS, batch_size=2)
    assert again.complete and again.rows_attempted == 0 and again.rows_already_there == 6


def test_a_file_changed_between_validation_and_the_workers_read_fails_instead_of_generating_unchecked_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    source = ManifestFile(write_jsonl(path, [{"id": "a", "seed": 1, "class_label": 2}]))
    scan_chunks(source.chunks(), DIGITS)
    assert source.read_span({"start": 0, "stop": path.stat().st_size}, DIGITS).column("id").to_pylist() == ["a"]
    write_jsonl(path, [{"id": "a", "seed": 1, "class_label": 99}])
    with pytest.raises(ManifestError, match="changed after the job validated it: row 0 .*class_label 99"):
        source.read_span({"start": 0, "stop": path.stat().st_size}, DIGITS)
