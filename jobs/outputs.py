"""The output dataset: one Parquet row per manifest row, under a location the job owns (local or fsspec).

What the location holds, and what the job may do with each kind of entry:

    _run.json, _lease.json                  the job's bookkeeping (jobs/run_record.py, jobs/lease.py)
    <run_id>_<write>_<task>.parquet         data written by a run the record lists: read as output; removed only
                                            when unreadable (a write cut off by a crash) or with --overwrite
    .<name>.<32 hex>.tmp                    the job's own temporaries (a whole-object write cut off): removed
    anything else                           not the job's: never deleted, never read; the job refuses the location

Within the job's files each id has one row: the first one written without error, else the error row of its
latest attempt. A rerun retries error rows (attempt + 1), and `compact` then removes the rows a newer one
supersedes, rewriting the file whole (a reader sees the file before or after, never a mix).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import hf_features
from jobs.errors import JobInputError
from jobs.location import Location
from jobs.lease import LEASE_NAME
from jobs.run_record import RECORD_NAME, RUN_ID, RunRecord

log = logging.getLogger("invardiff")

# Fixed types, so that error rows (all nulls) and image rows from different actors write compatible files.
GENERATED_FIELDS = [
    pa.field("png", hf_features.PNG_TYPE),  # {bytes, path}: how datasets.Image stores an image
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
    pa.field("attempt", pa.int32()),
    pa.field("error", pa.string()),
    # Shadow rows only (`generate --shadow`, pipelines/shadow.py), null elsewhere: the fidelity of this row's
    # image to the same request generated uncached, and that uncached run's share of device time (not in
    # latency_s: the report counts it apart). shadow_png, the uncached image's PNG, with --keep-shadow-images.
    pa.field("shadow_psnr", pa.float64()),
    pa.field("shadow_ssim", pa.float64()),
    pa.field("shadow_rel_err", pa.float64()),
    pa.field("shadow_latency_s", pa.float64()),
    pa.field("shadow_png", pa.binary()),
]
GENERATED_NAMES = {f.name for f in GENERATED_FIELDS}
DATA_FILE = re.compile(r"^(?P<run>r[0-9]{8}T[0-9]{6}Z[0-9a-f]{8})_[^/]+\.parquet$")
TEMPORARY = re.compile(r"^\.[^/]+\.[0-9a-f]{32}\.tmp$")


class ForeignFilesError(JobInputError):
    """The output location holds files the job did not write."""


def output_schema(manifest_schema: pa.Schema) -> pa.Schema:
    """The manifest's columns, then ours; with the features that make the files a Hugging Face image dataset
    (and `class_label` a ClassLabel when the manifest's metadata names the classes, jobs/hf_features.py)."""
    schema = pa.schema([f for f in manifest_schema if f.name not in GENERATED_NAMES] + GENERATED_FIELDS)
    return hf_features.with_metadata(schema, hf_features.class_names(manifest_schema))


def rows_to_table(rows: list[dict], manifest_schema: pa.Schema) -> pa.Table:
    """Output rows (dicts: manifest fields, then ours; a missing key is null) as a table of `output_schema`.

    Arrow converts the list of dicts in one C++ pass, as a struct array, instead of a Python pass per column
    (half the time per row from 64-row batches up); `finished_at` (seconds, float) and `png` (bytes) are staged
    as plain columns and turned into the millisecond timestamp and the {bytes, path} struct column-wise."""
    schema = output_schema(manifest_schema)
    staged = pa.struct([
        (f.name, pa.float64() if f.name == "finished_at" else pa.binary() if f.name == "png" else f.type)
        for f in schema
    ])
    table = pa.Table.from_struct_array(pa.array(rows, staged))
    columns = dict(zip(table.column_names, (c.combine_chunks() for c in table.columns)))
    # int(seconds * 1000): truncated toward zero, as a float -> int cast truncates
    columns["finished_at"] = pc.multiply(columns["finished_at"], 1000.0).cast(pa.int64(), safe=False).cast(
        schema.field("finished_at").type
    )
    png = columns["png"]
    ids = columns["id"].cast(pa.string()) if "id" in columns else pa.nulls(len(png), pa.string())
    paths = pc.binary_join_element_wise(ids, ".png", "")  # '<id>.png', null without an id
    columns["png"] = pa.StructArray.from_arrays([png, paths], fields=list(hf_features.PNG_TYPE), mask=png.is_null())
    return pa.table([columns[f.name] for f in schema], schema=schema)


def filename_provider(run_id: str):
    """Ray Data names each file `<run_id>_<write uuid>_<task>.parquet`: every data file names its run."""
    from ray.data.datasource import FilenameProvider

    assert RUN_ID.match(run_id), run_id
    return FilenameProvider(dataset_uuid=run_id, file_format="parquet")


@dataclass
class Inventory:
    """The location's entries, sorted by whose they are."""

    data: list[str]  # readable data files of the job's runs
    partial: list[str]  # the job's data files cut off mid-write (no footer)
    temporaries: list[str]
    foreign: list[str]

    @classmethod
    def take(cls, location: Location, record: RunRecord | None) -> Inventory:
        runs = record.run_ids if record else set()
        data, partial, temporaries, foreign = [], [], [], []
        for name in location.names():
            match = DATA_FILE.match(name)
            if name in (RECORD_NAME, LEASE_NAME):
                continue
            if TEMPORARY.match(name):
                temporaries.append(name)
            elif match and match["run"] in runs:
                (data if _readable(location, name) else partial).append(name)
            else:
                foreign.append(name)
        return cls(data, partial, temporaries, foreign)

    def refuse_foreign(self, location: Location) -> None:
        if self.foreign:
            shown = ", ".join(self.foreign[:3]) + (f" and {len(self.foreign) - 3} more" if len(self.foreign) > 3 else "")
            raise ForeignFilesError(
                f"--out {location.uri} holds {len(self.foreign)} file(s) this job did not write ({shown}); "
                "invardiff never deletes or reinterprets them: give an empty or new --out"
            )

    def remove_leftovers(self, location: Location) -> None:
        """Delete the job's own half-written files: their rows are generated again."""
        for name in self.partial + self.temporaries:
            log.warning("removing %s, a write cut off before it finished; its rows will be generated again",
                        location.url(name))
            location.remove(name)


def _readable(location: Location, name: str) -> bool:
    """A Parquet file is readable only once its footer is written (an S3 object only once its upload completed),
    so a readable file is a committed one."""
    try:
        with location.fs.open(location.path(name), "rb") as f:
            pq.read_metadata(f)
        return True
    except Exception:  # noqa: BLE001 - truncated, empty, header only: any failure to read the footer
        return False


@dataclass
class Rows:
    """Where each row of the job's files is: one entry per physical row (duplicates included)."""

    table: pa.Table  # id, seed, class_label and/or prompt, ok (bool), attempt, file (index), row (index in file)
    files: list[str]

    @classmethod
    def read(cls, location: Location, files: list[str]) -> Rows:
        parts = []
        for index, name in enumerate(files):
            with location.fs.open(location.path(name), "rb") as f:
                parquet = pq.ParquetFile(f)
                names = parquet.schema_arrow.names
                wanted = [c for c in ("id", "seed", "class_label", "prompt", "error", "attempt") if c in names]
                part = parquet.read(columns=wanted)
            n = part.num_rows
            parts.append(
                pa.table(
                    {
                        "id": part.column("id").cast(pa.string()),
                        "seed": part.column("seed").cast(pa.int64()) if "seed" in names else pa.nulls(n, pa.int64()),
                        "class_label": (part.column("class_label").cast(pa.int64()) if "class_label" in names
                                        else pa.nulls(n, pa.int64())),
                        "prompt": part.column("prompt").cast(pa.string()) if "prompt" in names else pa.nulls(n, pa.string()),
                        "error": part.column("error") if "error" in names else pa.nulls(n, pa.string()),
                        "attempt": (part.column("attempt").cast(pa.int32()).fill_null(1) if "attempt" in names
                                    else pa.array(np.ones(n, np.int32))),
                        "file": pa.array(np.full(n, index, np.int32)),
                        "row": pa.array(np.arange(n, dtype=np.int64)),
                    }
                )
            )
        empty = pa.schema([("id", pa.string()), ("seed", pa.int64()), ("class_label", pa.int64()), ("prompt", pa.string()),
                           ("error", pa.string()), ("attempt", pa.int32()), ("file", pa.int32()), ("row", pa.int64())])
        table = pa.concat_tables(parts) if parts else empty.empty_table()
        return cls(table, files)

    def resolved(self) -> tuple[pa.Table, pa.Table]:
        """(kept, superseded): per id the row that stands, and every other row; each with an `ok` column.

        Arrow hash aggregations over the ids, not a sort: a resume of a million rows resolves in well under a
        second. A row's place is one int64, file << 32 | row (rows per file stay below 2**32)."""
        table = self.table
        place = pc.add(pc.shift_left(table["file"].cast(pa.int64()), 32), table["row"])
        table = table.append_column("ok", pc.is_null(table["error"])).append_column("place", place)
        good = table.filter(table["ok"])
        first_good = good.group_by("id", use_threads=False).aggregate([("place", "min")])
        bad = table.filter(pc.invert(table["ok"]))
        bad = bad.filter(pc.invert(pc.is_in(bad["id"], value_set=first_good["id"])))
        latest = bad.group_by("id", use_threads=False).aggregate([("attempt", "max")])
        bad = bad.join(latest, "id").filter(pc.equal(pc.field("attempt"), pc.field("attempt_max")))
        last_bad = bad.group_by("id", use_threads=False).aggregate([("place", "max")])
        standing = pa.concat_arrays([first_good["place_min"].combine_chunks(), last_bad["place_max"].combine_chunks()])
        stands = pc.is_in(table["place"], value_set=standing)
        return table.filter(stands).drop_columns(["place"]), table.filter(pc.invert(stands)).drop_columns(["place"])

    def compact(self, location: Location) -> int:
        """Rewrite the files that hold superseded rows without them; return how many rows went."""
        _, superseded = self.resolved()
        for index in pc.unique(superseded["file"]).to_pylist():
            name = self.files[index]
            with location.fs.open(location.path(name), "rb") as f:
                table = pq.read_table(f)
            dropped = superseded.filter(pc.equal(superseded["file"], index))["row"]
            positions = pa.array(np.arange(table.num_rows, dtype=np.int64))
            remaining = table.filter(pc.invert(pc.is_in(positions, value_set=dropped)))
            if remaining.num_rows == 0:
                location.remove(name)
                continue
            buffer = io.BytesIO()
            pq.write_table(remaining, buffer)
            location.replace(name, buffer.getvalue())
        return superseded.num_rows


@dataclass(frozen=True)
class Reconciliation:
    """What a run was asked for against what the location holds for it after the run."""

    asked: int
    written: int  # asked ids with a row written without error
    failed: int  # asked ids whose row is an error row
    missing: int  # asked ids with no row at all
    reasons: tuple[tuple[str, int], ...]  # (error, rows) for the failed rows, most frequent first

    @property
    def complete(self) -> bool:
        return self.written == self.asked

    def line(self) -> str:
        return f"{self.asked} rows asked: {self.written} written, {self.failed} failed, {self.missing} missing"


def reconcile(rows: Rows, asked_ids: pa.Array | pa.ChunkedArray) -> Reconciliation:
    """Counts against the asked ids (distinct: the manifest's validation saw to that)."""
    kept, _ = rows.resolved()
    kept = kept.filter(pc.is_in(kept["id"], value_set=_array(asked_ids)))
    written = pc.sum(kept["ok"].cast(pa.int64())).as_py() or 0
    errors = kept.filter(pc.invert(kept["ok"]))["error"]
    counts = pc.value_counts(errors).to_pylist() if len(errors) else []
    reasons = tuple(sorted(((c["values"], c["counts"]) for c in counts), key=lambda rc: (-rc[1], rc[0])))
    asked = len(asked_ids)
    return Reconciliation(asked, written, len(errors), asked - kept.num_rows, reasons)


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def read_outputs(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Every row of the job's data files under `uri` (a location without a run record is read as it is)."""
    location = Location(uri)
    record = RunRecord.load(location)
    if record is not None:
        files = Inventory.take(location, record).data
    else:
        files = [n for n in location.names() if n.endswith(".parquet") and not n.startswith(("_", "."))]
    if not files:
        raise FileNotFoundError(f"no Parquet output under {uri}")
    tables = []
    for name in files:
        with location.fs.open(location.path(name), "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive")
