import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import (
    ManifestError,
    ManifestSchema,
    class_manifest,
    parse_class_range,
    read_manifest,
    validate_manifest,
)

DIGITS = ManifestSchema("class_label", num_classes=10)


def test_class_range_forms():
    assert parse_class_range("0-9") == list(range(10))
    assert parse_class_range("1,3, 5") == [1, 3, 5]
    assert parse_class_range("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ManifestError, match="'9-0'"):
        parse_class_range("9-0")
    with pytest.raises(ManifestError, match="'x'"):
        parse_class_range("1,x")


def test_class_manifest_ids_and_seeds_are_distinct():
    t = class_manifest([0, 1], per_class=3, seed=10)
    assert t.column("id").to_pylist() == ["c0-s10-0", "c0-s10-1", "c0-s10-2", "c1-s10-0", "c1-s10-1", "c1-s10-2"]
    assert t.column("seed").to_pylist() == list(range(10, 16))
    assert t.column("class_label").to_pylist() == [0, 0, 0, 1, 1, 1]
    validate_manifest(t, DIGITS)


def test_valid_manifest_is_normalised_and_keeps_extra_columns():
    t = pa.table({"id": [1, 2], "seed": [5.0, 6.0], "class_label": [3, 4], "tag": ["a", "b"]})
    out = validate_manifest(t, DIGITS)
    assert out.column("id").to_pylist() == ["1", "2"]
    assert out.schema.field("seed").type == pa.int64()
    assert out.column("tag").to_pylist() == ["a", "b"]


def test_every_bad_row_is_named_with_its_field():
    t = pa.table(
        {
            "id": ["a", "b", "c", "a", "e"],
            "seed": [1, -1, 2, 3, 4],
            "class_label": [0, 3, 10, 1, 2],
        }
    )
    with pytest.raises(ManifestError) as err:
        validate_manifest(t, DIGITS)
    msg = str(err.value)
    assert "2 problem(s)" not in msg
    assert "row 1 (id 'b'): seed must be in [0, 2**63), got -1" in msg
    assert "row 2 (id 'c'): class_label 10 is not a class of this model (0..9)" in msg
    assert "row 3 (id 'a'): id duplicates row 0" in msg


def test_mistyped_values_are_reported(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"id": "x", "seed": "abc", "class_label": 1}, {"id": "y", "seed": 2, "class_label": 1.5}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ManifestError) as err:
        validate_manifest(read_manifest(str(path)), DIGITS)
    msg = str(err.value)
    assert "id 'x'" in msg and "seed must be an integer" in msg
    assert "id 'y'" in msg and "class_label must be an integer" in msg


def test_missing_column_says_what_the_model_needs():
    t = pa.table({"id": ["a"], "seed": [1], "prompt": ["a cat"]})
    with pytest.raises(ManifestError, match=r"missing column\(s\) class_label \(this model is conditioned on class_label; the manifest has prompt\)"):
        validate_manifest(t, DIGITS)


def test_prompt_manifest_rejects_empty_prompts():
    t = pa.table({"id": ["a", "b"], "seed": [1, 2], "prompt": ["ok", "  "]})
    with pytest.raises(ManifestError, match="row 1 \\(id 'b'\\): prompt must be non-empty text"):
        validate_manifest(t, ManifestSchema("prompt"))


def test_reserved_output_columns_are_refused():
    t = pa.table({"id": ["a"], "seed": [1], "class_label": [1], "png": [b"x"]})
    with pytest.raises(ManifestError, match="png"):
        validate_manifest(t, DIGITS)


def test_unreadable_paths(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(str(tmp_path / "missing.parquet"))
    with pytest.raises(ManifestError, match="expected a .parquet or .jsonl"):
        read_manifest(str(tmp_path / "m.csv"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="cannot read it"):
        read_manifest(str(bad))


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(class_manifest([7], 2, 0), path)
    assert validate_manifest(read_manifest(str(path)), DIGITS).num_rows == 2


def test_empty_manifest():
    with pytest.raises(ManifestError, match="no rows"):
        validate_manifest(pa.table({"id": pa.array([], pa.string())}), DIGITS)
