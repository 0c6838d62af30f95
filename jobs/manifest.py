"""Generation manifests: read, validate, or make one from a class range.

A manifest is Parquet or JSON Lines, local or any fsspec URI, one row per image:
  id           unique string (integers are kept as their decimal string, UTF-8 binary as its text)
  seed         integer in [0, 2**63)
  class_label  integer class id (class-conditional DiT models), or
  prompt       non-empty text (text-to-image FLUX models)
Any other column is carried through to the output unchanged.

Validation runs on the driver before any model is loaded, in one streaming pass over chunks of the manifest
(the driver keeps the ids, never the rows), and reports every problem of the first 20 bad rows, naming the
row number, its id and the field, with the count of the rest. Values are typed only once they are known to fit (a seed
or label past int64 is a named problem, not an OverflowError).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_SEED = 2**63
INT64 = (-(2**63), 2**63)
MAX_REPORTED_ROWS = 20  # every problem of the first 20 bad rows is listed, so no bad row hides behind another
CHUNK_ROWS = 65_536  # rows validated at a time: the driver's memory follows this, not the manifest's size
MAX_CLASS_RANGE = 1_000_000  # '0-99999999999' is a typo, not a request for 10**11 classes
RESERVED_OUTPUT_COLUMNS = {
    "png", "width", "height", "model_id", "policy", "plan_id", "latency_s", "batch_size", "steps_total",
    "steps_computed", "module_evals_total", "module_evals_computed", "device", "device_name", "node_id",
    "worker_id", "peak_memory_bytes", "finished_at", "attempt", "error",
}


class ManifestError(ValueError):
    """The manifest cannot be used; the message lists what is wrong, row by row."""


@dataclass(frozen=True)
class ManifestSchema:
    """What the target model needs from each row."""

    condition: str  # "class_label" or "prompt"
    num_classes: int | None = None


def parse_class_range(text: str) -> list[int]:
    """'0-9' -> [0..9]; '1,3,5' -> [1, 3, 5]; '0-2,7' -> [0, 1, 2, 7]."""
    classes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise ManifestError(f"--classes: {part!r} is not a class id or a range like 0-9") from None
        if hi - lo >= MAX_CLASS_RANGE:
            raise ManifestError(f"--classes: {part!r} spans {hi - lo + 1} classes; at most {MAX_CLASS_RANGE}")
        classes.extend(range(lo, hi + 1))
    return classes


def class_manifest(classes: list[int], per_class: int, seed: int) -> pa.Table:
    """Rows for `per_class` images of each class, in memory (jobs.manifest_source.ClassRange streams them)."""
    from jobs.manifest_source import ClassRange

    source = ClassRange(tuple(classes), per_class, seed)
    return source.rows(0, source.num_rows)


def prompt_manifest(prompts: list[str], per_prompt: int, seed: int) -> pa.Table:
    """Rows for `per_prompt` images of each prompt, ids `p{prompt index}-s{seed}-{i}` (see class_manifest)."""
    if per_prompt < 1:
        raise ManifestError(f"--per-prompt must be at least 1, got {per_prompt}")
    texts = [t for t in prompts for _ in range(per_prompt)]
    check_seed_range(seed, len(texts))
    ids = [f"p{p}-s{seed}-{i}" for p in range(len(prompts)) for i in range(per_prompt)]
    seeds = [seed + i for i in range(len(texts))]
    return pa.table({"id": ids, "seed": pa.array(seeds, pa.int64()), "prompt": texts})


def check_seed_range(seed: int, rows: int) -> None:
    if seed < 0 or seed + rows > MAX_SEED:
        raise ManifestError(f"--seed must be in [0, 2**63 - {rows}] so that all {rows} row seeds fit, got {seed}")


class RawManifest(dict):
    """Column name -> list of Python values, as read, before any type is imposed (JSONL rows may disagree)."""

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.values()), []))


# A chunk of manifest rows as read: Python values (JSONL), or an Arrow table (Parquet, class ranges, tables in
# memory), which is checked column-wise at once and row by row only when it holds a problem to name.
Chunk = RawManifest | pa.Table


def column_names(chunk: Chunk) -> list[str]:
    return chunk.column_names if isinstance(chunk, pa.Table) else list(chunk)


def as_raw(chunk: Chunk) -> RawManifest:
    return RawManifest(chunk.to_pydict()) if isinstance(chunk, pa.Table) else chunk


def manifest_format(uri: str) -> str:
    """'parquet' or 'jsonl', from the file name; anything else is refused."""
    ext = posixpath.splitext(uri.split("?")[0])[1].lower()
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise ManifestError(f"manifest {uri}: expected a .parquet or .jsonl file")


def iter_manifest_chunks(uri: str, storage_options: dict | None = None,
                         chunk_rows: int = CHUNK_ROWS) -> Iterator[Chunk]:
    """The manifest at a local path or fsspec URI, `chunk_rows` rows at a time: memory stays flat in its size."""
    import fsspec
    import pyarrow.parquet as pq

    fmt = manifest_format(uri)
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            if fmt == "parquet":
                for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows):
                    yield pa.Table.from_batches([batch])
                return
            records: list[dict] = []
            start = end = 0
            for n, line in enumerate(f, start=1):
                end += len(line)
                record = parse_jsonl_line(line.decode("utf-8"), where=f"manifest {uri}: line {n}")
                if record is not None:
                    records.append(record)
                if len(records) == chunk_rows:
                    yield records_to_raw(records, span=(start, end))
                    records, start = [], end
            if records:
                yield records_to_raw(records, span=(start, end))
    except FileNotFoundError:
        raise ManifestError(f"manifest {uri}: no such file") from None
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {uri}: cannot read it ({e})") from None


def parse_jsonl_line(line: str, where: str) -> dict | None:
    """One JSONL record; None for a blank line (skipped, not a row)."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ManifestError(f"{where} is not a JSON object")
    return record


def records_to_raw(records: list[dict], span: tuple[int, int] | None = None) -> RawManifest:
    names = list(dict.fromkeys(k for r in records for k in r))
    raw = RawManifest({name: [r.get(name) for r in records] for name in names})
    raw.span = span  # the chunk's byte range in its JSONL file: where a worker reads the same rows again
    return raw


def read_manifest(uri: str, storage_options: dict | None = None) -> RawManifest:
    """A whole Parquet or JSONL manifest, in memory (small manifests; a job streams it, jobs/manifest_source.py)."""
    chunks = [as_raw(chunk) for chunk in iter_manifest_chunks(uri, storage_options)]
    names = list(dict.fromkeys(name for chunk in chunks for name in chunk))
    return RawManifest({name: [v for chunk in chunks for v in chunk.get(name, [None] * chunk.num_rows)]
                        for name in names})


def _row_ref(row: int, id_: str | None) -> str:
    return f"row {row} (id {id_!r})" if id_ is not None else f"row {row}"


def _integers(values: list) -> tuple[list, list[int]]:
    """Values as Python ints where they are integral, and the indices where they are not (or are null)."""
    bad = []
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or v is None:
            bad.append(i)
            out.append(None)
        elif isinstance(v, int):
            out.append(v)
        elif isinstance(v, float) and v.is_integer():
            out.append(int(v))
        else:
            bad.append(i)
            out.append(None)
    return out, bad


def check_columns(names: list[str], schema: ManifestSchema) -> None:
    """The manifest's columns against what the model needs and what the output reserves."""
    missing = [c for c in ("id", "seed", schema.condition) if c not in names]
    if missing:
        other = "prompt" if schema.condition == "class_label" else "class_label"
        hint = f" (this model is conditioned on {schema.condition}; the manifest has {other})" if other in names else ""
        raise ManifestError(
            f"manifest is missing column(s) {', '.join(missing)}{hint}; columns present: {', '.join(names)}"
        )
    clashes = sorted(RESERVED_OUTPUT_COLUMNS & set(names))
    if clashes:
        raise ManifestError(f"manifest columns {', '.join(clashes)} are reserved for generation outputs; rename them")


def check_rows(chunk: Chunk, schema: ManifestSchema, offset: int = 0) -> tuple[list[tuple[int, str]], pa.Table | None]:
    """Every problem of each row on its own (row numbers counted from `offset`), and the rows with normalised
    types (id: string, seed: int64, class_label: int64) when there is none. Ids repeated across rows are the
    scan's business (ManifestScan), not a chunk's."""
    if isinstance(chunk, pa.Table):
        typed = _typed_if_valid(chunk, schema)
        if typed is not None:
            return [], typed
    raw = as_raw(chunk)
    problems: list[tuple[int, str]] = []
    n = raw.num_rows
    raw = RawManifest({name: raw.get(name, [None] * n) for name in dict.fromkeys(["id", "seed", schema.condition, *raw])})

    ids: list = []
    for i, v in enumerate(raw["id"]):
        if isinstance(v, bytes):  # a binary id column: its text, not the repr "b'a'"
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                problems.append((offset + i, f"row {offset + i}: id is binary and not UTF-8 text ({v[:20]!r})"))
                ids.append(None)
                continue
        if v is None or (isinstance(v, str) and not v.strip()) or isinstance(v, (bool, float, list, dict)):
            problems.append((offset + i, f"row {offset + i}: id must be a non-empty string or integer, got {v!r}"))
            ids.append(None)
        else:
            ids.append(str(v))

    def add(i: int, msg: str) -> None:
        problems.append((offset + i, f"{_row_ref(offset + i, ids[i])}: {msg}"))

    seeds, bad = _integers(raw["seed"])
    for i in bad:
        add(i, f"seed must be an integer, got {raw['seed'][i]!r}")
    for i, s in enumerate(seeds):
        if s is not None and not 0 <= s < MAX_SEED:
            add(i, f"seed must be in [0, 2**63), got {s}")

    if schema.condition == "class_label":
        labels, bad = _integers(raw["class_label"])
        for i in bad:
            add(i, f"class_label must be an integer, got {raw['class_label'][i]!r}")
        lo, hi = (0, schema.num_classes) if schema.num_classes is not None else INT64
        for i, c in enumerate(labels):
            if c is not None and not lo <= c < hi:
                add(i, f"class_label {c} is not a class of this model ({lo}..{hi - 1})")
    else:
        prompts = raw["prompt"]
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                add(i, f"prompt must be non-empty text, got {p!r}")

    if problems:
        problems.sort(key=lambda p: p[0])  # stable: a row's problems stay in field order
        return problems, None
    # Typed only now: every value is known to fit (a seed or label past int64 would raise OverflowError).
    columns = {"id": pa.array(ids, pa.string()), "seed": pa.array(seeds, pa.int64())}
    if schema.condition == "class_label":
        columns["class_label"] = pa.array(labels, pa.int64())
    else:
        columns["prompt"] = pa.array(prompts, pa.string())
    for name, values in raw.items():
        if name not in columns:
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise ManifestError(f"manifest column {name!r} mixes value types; give it one type") from None
            except OverflowError:
                raise ManifestError(f"manifest column {name!r} has an integer outside the 64-bit range") from None
    return [], pa.table(columns)


def _typed_if_valid(table: pa.Table, schema: ManifestSchema) -> pa.Table | None:
    """An Arrow chunk normalised as `check_rows` normalises it, when its types and values pass every check at once
    (a million rows in milliseconds); None when any might not, for the row-by-row pass to name the problems."""
    names = table.column_names
    if any(c not in names for c in ("id", "seed", schema.condition)):
        return None
    columns = {}
    ids = table.column("id")
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_integer(ids.type)):
        return None
    ids = ids.cast(pa.string())
    if ids.null_count or (len(ids) and pc.any(pc.equal(pc.utf8_trim_whitespace(ids), "")).as_py()):
        return None
    columns["id"] = ids
    seed_range = (0, MAX_SEED)
    label_range = (0, schema.num_classes) if schema.num_classes is not None else INT64
    for name, (lo, hi) in (("seed", seed_range), ("class_label", label_range)):
        if name == "seed" or schema.condition == "class_label":
            values = table.column(name)
            if not pa.types.is_integer(values.type) or values.null_count:
                return None
            if len(values):
                low, high = pc.min_max(values).values()
                if not (lo <= low.as_py() and high.as_py() < hi):
                    return None
            columns[name] = values.cast(pa.int64())
    if schema.condition == "prompt":
        prompts = table.column("prompt")
        if not (pa.types.is_string(prompts.type) or pa.types.is_large_string(prompts.type)) or prompts.null_count:
            return None
        if len(prompts) and pc.any(pc.equal(pc.utf8_trim_whitespace(prompts), "")).as_py():
            return None
        columns["prompt"] = prompts.cast(pa.string())
    for name in names:
        columns.setdefault(name, table.column(name))
    return pa.table(columns)


@dataclass(frozen=True)
class ManifestIndex:
    """What a job keeps of a validated manifest: its ids in order (for resume and reconciliation) and the schema
    every row is given; never the rows."""

    ids: pa.ChunkedArray
    schema: pa.Schema

    @property
    def num_rows(self) -> int:
        return len(self.ids)


class ManifestScan:
    """One streaming validation pass: `add` each chunk in order, then `finish`.

    Memory grows with the ids (for the duplicate check and reconciliation), not with the rows; the problems of
    the first MAX_REPORTED_ROWS bad rows are kept, the rest counted."""

    def __init__(self, schema: ManifestSchema):
        self.manifest_schema = schema
        self.rows = 0
        self.ids: list[pa.Array] = []
        self.schema: pa.Schema | None = None
        self.shown: list[tuple[int, str]] = []  # every problem of the first MAX_REPORTED_ROWS bad rows
        self.problems = 0
        self.bad_rows: list[np.ndarray] = []

    def add(self, chunk: Chunk) -> pa.Table | None:
        """Check one chunk; its rows normalised, or None when it has problems."""
        names = column_names(chunk)
        if self.rows == 0 or RESERVED_OUTPUT_COLUMNS & set(names):  # a later JSONL chunk may add columns
            check_columns(names, self.manifest_schema)
        problems, table = check_rows(chunk, self.manifest_schema, offset=self.rows)
        if problems:
            self._note(problems)
            raw = as_raw(chunk)
            self.ids.append(pa.array([_id_or_none(v) for v in raw.get("id", [None] * raw.num_rows)], pa.string()))
        else:
            self.ids.append(table.column("id").combine_chunks())
            self.schema = table.schema if self.schema is None else unify(self.schema, table.schema)
        self.rows += chunk.num_rows
        return table

    def _note(self, problems: list[tuple[int, str]]) -> None:
        self.problems += len(problems)
        rows = np.unique(np.fromiter((r for r, _ in problems), np.int64))
        self.bad_rows.append(rows)
        shown_rows = {r for r, _ in self.shown}
        room = MAX_REPORTED_ROWS - len(shown_rows)
        if room > 0:
            keep = set(rows[:room].tolist())
            self.shown.extend(p for p in problems if p[0] in keep)

    def finish(self) -> ManifestIndex:
        if self.rows == 0:
            raise ManifestError("manifest has no rows")
        ids = pa.chunked_array(self.ids, pa.string())
        self._note_duplicates(ids)
        if self.problems:
            self.shown.sort(key=lambda p: p[0])
            bad = np.unique(np.concatenate(self.bad_rows))
            first = set(bad[:MAX_REPORTED_ROWS].tolist())
            shown = [msg for row, msg in self.shown if row in first]
            more = (f"\n  ... and {self.problems - len(shown)} more in {len(bad) - MAX_REPORTED_ROWS} more row(s)"
                    if len(bad) > MAX_REPORTED_ROWS else "")
            raise ManifestError(f"manifest has {self.problems} problem(s) in {len(bad)} row(s):\n  "
                                + "\n  ".join(shown) + more)
        return ManifestIndex(ids, self.schema)

    def _note_duplicates(self, ids: pa.ChunkedArray) -> None:
        rows = pa.table({"id": ids, "row": pa.array(np.arange(len(ids), dtype=np.int64))}).filter(pc.is_valid(ids))
        first = rows.group_by("id", use_threads=False).aggregate([("row", "min"), ("row", "count")])
        repeated = first.filter(pc.greater(first.column("row_count"), 1))
        if repeated.num_rows == 0:
            return
        later = rows.join(repeated.select(["id", "row_min"]), "id", join_type="inner")
        later = later.filter(pc.not_equal(later.column("row"), later.column("row_min"))).sort_by("row")
        self.problems += later.num_rows
        self.bad_rows.append(later.column("row").to_numpy())
        # Only the first MAX_REPORTED_ROWS duplicates can be among the first bad rows shown.
        self.shown.extend((r["row"], f"{_row_ref(r['row'], r['id'])}: id duplicates row {r['row_min']}")
                          for r in later.slice(0, MAX_REPORTED_ROWS).to_pylist())


def _id_or_none(v) -> str | None:
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if v is None or isinstance(v, (bool, float, list, dict)) or (isinstance(v, str) and not v.strip()):
        return None
    return str(v)


def unify(a: pa.Schema, b: pa.Schema) -> pa.Schema:
    """The schema both chunks' rows fit (a column null in one chunk takes the other's type; ints widen to floats)."""
    if a.equals(b):
        return a
    try:
        return pa.unify_schemas([a, b], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        differs = [f.name for f in b if f.name in a.names and a.field(f.name).type != f.type]
        name = differs[0] if differs else "?"
        raise ManifestError(f"manifest column {name!r} mixes value types; give it one type") from None


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A chunk's rows in the manifest's unified schema (a column the chunk lacks is null there)."""
    if table.schema.equals(schema):
        return table
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.table(columns, schema=schema)


def scan_chunks(chunks: Iterable[Chunk], schema: ManifestSchema) -> ManifestIndex:
    scan = ManifestScan(schema)
    for chunk in chunks:
        scan.add(chunk)
    return scan.finish()


def table_chunks(table: pa.Table, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, chunk_rows):
        yield table.slice(start, chunk_rows)


def validate_manifest(table: pa.Table | RawManifest, schema: ManifestSchema) -> pa.Table:
    """Return the manifest as a table with normalised types (id: string, seed: int64, class_label: int64),
    or raise ManifestError listing every problem of the first bad rows."""
    chunks = table_chunks(table) if isinstance(table, pa.Table) else [table]
    scan = ManifestScan(schema)
    normalised = [scan.add(chunk) for chunk in chunks]
    index = scan.finish()
    return pa.concat_tables([conform(t, index.schema) for t in normalised])
