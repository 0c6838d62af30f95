"""The output dataset: one Parquet row per manifest row, under a directory or prefix (local or fsspec)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("invardiff")

# Fixed types, so that error rows (all nulls) and image rows from different actors write compatible files.
GENERATED_FIELDS = [
    pa.field("png", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("model_id", pa.string()),
    pa.field("policy", pa.string()),
    pa.field("plan_id", pa.string()),
    pa.field("latency_s", pa.float64()),
    pa.field("batch_size", pa.int32()),
    pa.field("steps_total", pa.int32()),
    pa.field("steps_computed", pa.int32()),
    pa.field("module_evals_total", pa.int64()),
    pa.field("module_evals_computed", pa.int64()),
    pa.field("device", pa.string()),
    pa.field("device_name", pa.string()),
    pa.field("node_id", pa.string()),
    pa.field("worker_id", pa.string()),
    pa.field("peak_memory_bytes", pa.int64()),
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
    pa.field("error", pa.string()),
]


def output_schema(manifest_schema: pa.Schema) -> pa.Schema:
    return pa.schema(list(manifest_schema) + GENERATED_FIELDS)


def rows_to_table(rows: list[dict], manifest_schema: pa.Schema) -> pa.Table:
    schema = output_schema(manifest_schema)
    columns = {}
    for field in schema:
        values = [r.get(field.name) for r in rows]
        if field.name == "finished_at":
            values = [None if v is None else int(v * 1000) for v in values]
            columns[field.name] = pa.array(values, pa.int64()).cast(field.type)
        else:
            columns[field.name] = pa.array(values, field.type)
    return pa.table(columns, schema=schema)


def _parquet_files(uri: str) -> tuple[object, list[str]]:
    import fsspec

    from jobs.ray_runtime import storage_options_for

    fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri))
    if not fs.exists(root):
        return fs, []
    prefix = root.rstrip("/") + "/"
    return fs, sorted(p for p in fs.find(root) if _is_data_file(p[len(prefix):]))


def _is_data_file(relative: str) -> bool:
    # Writers keep bookkeeping next to the data (_SUCCESS, .crc, Ray Data's _checkpoint/); those are
    # not output rows, and the report skips the same entries.
    return relative.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in relative.split("/"))


def existing_ids(uri: str) -> set[str]:
    """Ids already written under `uri`. A file that cannot be read (a write cut off by a crash) is removed,
    so its rows are generated again rather than half-kept."""
    fs, files = _parquet_files(uri)
    ids: set[str] = set()
    for path in files:
        try:
            with fs.open(path, "rb") as f:
                ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        except Exception as e:  # noqa: BLE001 - any unreadable file is a partial write
            log.warning("removing unreadable output file %s (%s); its rows will be generated again", path, e)
            fs.rm(path)
    return ids


def read_outputs(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, files = _parquet_files(uri)
    if not files:
        raise FileNotFoundError(f"no Parquet output under {uri}")
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive")
