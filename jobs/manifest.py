"""Generation manifests: read, validate, or make one from a class range.

A manifest is Parquet or JSON Lines, local or any fsspec URI, one row per image:
  id           unique string (integers are kept as their decimal string, UTF-8 binary as its text)
  seed         integer in [0, 2**63)
  class_label  integer class id (class-conditional DiT models), or
  prompt       non-empty text (text-to-image FLUX models)
Any other column is carried through to the output unchanged.

Validation runs on the driver before any model is loaded, and reports every problem of the first 20 bad
rows, naming the row number, its id and the field. Values are typed only once they are known to fit (a seed
or label past int64 is a named problem, not an OverflowError).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa

MAX_SEED = 2**63
INT64 = (-(2**63), 2**63)
MAX_REPORTED_ROWS = 20  # every problem of the first 20 bad rows is listed, so no bad row hides behind another
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
    """Rows for `per_class` images of each class, seeds seed, seed+1, ... and ids `c{class}-s{seed}-{i}`: the id
    names the request (the first seed included), so a rerun with another --seed never mistakes its rows for
    these."""
    if per_class < 1:
        raise ManifestError(f"--per-class must be at least 1, got {per_class}")
    labels = [c for c in classes for _ in range(per_class)]
    _check_seed_range(seed, len(labels))
    outside = [c for c in classes if not INT64[0] <= c < INT64[1]]
    if outside:
        raise ManifestError(f"--classes: {outside[0]} is not a 64-bit integer class id")
    ids = [f"c{c}-s{seed}-{i}" for c in classes for i in range(per_class)]
    seeds = [seed + i for i in range(len(labels))]
    return pa.table({"id": ids, "seed": pa.array(seeds, pa.int64()), "class_label": pa.array(labels, pa.int64())})


def prompt_manifest(prompts: list[str], per_prompt: int, seed: int) -> pa.Table:
    """Rows for `per_prompt` images of each prompt, ids `p{prompt index}-s{seed}-{i}` (see class_manifest)."""
    if per_prompt < 1:
        raise ManifestError(f"--per-prompt must be at least 1, got {per_prompt}")
    texts = [t for t in prompts for _ in range(per_prompt)]
    _check_seed_range(seed, len(texts))
    ids = [f"p{p}-s{seed}-{i}" for p in range(len(prompts)) for i in range(per_prompt)]
    seeds = [seed + i for i in range(len(texts))]
    return pa.table({"id": ids, "seed": pa.array(seeds, pa.int64()), "prompt": texts})


def _check_seed_range(seed: int, rows: int) -> None:
    if seed < 0 or seed + rows > MAX_SEED:
        raise ManifestError(f"--seed must be in [0, 2**63 - {rows}] so that all {rows} row seeds fit, got {seed}")


class RawManifest(dict):
    """Column name -> list of Python values, as read, before any type is imposed (JSONL rows may disagree)."""

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.values()), []))


def read_manifest(uri: str, storage_options: dict | None = None) -> RawManifest:
    """Read a Parquet or JSONL manifest from a local path or fsspec URI."""
    import json

    import fsspec
    import pyarrow.parquet as pq

    ext = posixpath.splitext(uri.split("?")[0])[1].lower()
    if ext not in (".parquet", ".pq", ".jsonl", ".json", ".ndjson"):
        raise ManifestError(f"manifest {uri}: expected a .parquet or .jsonl file")
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            if ext in (".parquet", ".pq"):
                return RawManifest(pq.read_table(f).to_pydict())
            records = []
            for n, line in enumerate(f.read().decode("utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"manifest {uri}: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ManifestError(f"manifest {uri}: line {n} is not a JSON object")
                records.append(record)
    except FileNotFoundError:
        raise ManifestError(f"manifest {uri}: no such file") from None
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest {uri}: cannot read it ({e})") from None
    names = list(dict.fromkeys(k for r in records for k in r))
    return RawManifest({name: [r.get(name) for r in records] for name in names})


def _row_ref(i: int, ids: list) -> str:
    return f"row {i} (id {ids[i]!r})" if ids[i] is not None else f"row {i}"


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


def validate_manifest(table: pa.Table | RawManifest, schema: ManifestSchema) -> pa.Table:
    """Return the manifest as a table with normalised types (id: string, seed: int64, class_label: int64),
    or raise ManifestError listing every problem found."""
    if isinstance(table, pa.Table):
        table = RawManifest(table.to_pydict())
    errors: list[tuple[int, str]] = []

    def add(row: int, msg: str) -> None:
        errors.append((row, msg))

    if table.num_rows == 0:
        raise ManifestError("manifest has no rows")
    required = ["id", "seed", schema.condition]
    missing = [c for c in required if c not in list(table)]
    if missing:
        other = "prompt" if schema.condition == "class_label" else "class_label"
        hint = (
            f" (this model is conditioned on {schema.condition}; the manifest has {other})"
            if other in list(table) else ""
        )
        raise ManifestError(
            f"manifest is missing column(s) {', '.join(missing)}{hint}; columns present: {', '.join(list(table))}"
        )
    clashes = sorted(RESERVED_OUTPUT_COLUMNS & set(list(table)))
    if clashes:
        raise ManifestError(f"manifest columns {', '.join(clashes)} are reserved for generation outputs; rename them")

    raw_ids = table["id"]
    ids: list = []
    for i, v in enumerate(raw_ids):
        if isinstance(v, bytes):  # a binary id column: its text, not the repr "b'a'"
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                add(i, f"row {i}: id is binary and not UTF-8 text ({v[:20]!r})")
                ids.append(None)
                continue
        if v is None or (isinstance(v, str) and not v.strip()) or isinstance(v, (bool, float, list, dict)):
            add(i, f"row {i}: id must be a non-empty string or integer, got {v!r}")
            ids.append(None)
        else:
            ids.append(str(v))
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v is None:
            continue
        if v in seen:
            add(i, f"{_row_ref(i, ids)}: id duplicates row {seen[v]}")
        else:
            seen[v] = i

    seeds, bad = _integers(table["seed"])
    for i in bad:
        add(i, f"{_row_ref(i, ids)}: seed must be an integer, got {table['seed'][i]!r}")
    for i, s in enumerate(seeds):
        if s is not None and not 0 <= s < MAX_SEED:
            add(i, f"{_row_ref(i, ids)}: seed must be in [0, 2**63), got {s}")

    if schema.condition == "class_label":
        labels, bad = _integers(table["class_label"])
        for i in bad:
            add(i, f"{_row_ref(i, ids)}: class_label must be an integer, got {table['class_label'][i]!r}")
        lo, hi = (0, schema.num_classes) if schema.num_classes is not None else INT64
        for i, c in enumerate(labels):
            if c is not None and not lo <= c < hi:
                add(i, f"{_row_ref(i, ids)}: class_label {c} is not a class of this model ({lo}..{hi - 1})")
    else:
        prompts = table["prompt"]
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                add(i, f"{_row_ref(i, ids)}: prompt must be non-empty text, got {p!r}")

    if errors:
        errors.sort(key=lambda e: e[0])  # stable: a row's problems stay in field order
        bad_rows = sorted({row for row, _ in errors})
        shown = [msg for row, msg in errors if row in set(bad_rows[:MAX_REPORTED_ROWS])]
        more = (f"\n  ... and {len(errors) - len(shown)} more in {len(bad_rows) - MAX_REPORTED_ROWS} more row(s)"
                if len(bad_rows) > MAX_REPORTED_ROWS else "")
        raise ManifestError(f"manifest has {len(errors)} problem(s) in {len(bad_rows)} row(s):\n  "
                            + "\n  ".join(shown) + more)

    # Typed only now: every value is known to fit (a seed or label past int64 would raise OverflowError).
    columns = {"id": pa.array(ids, pa.string()), "seed": pa.array(seeds, pa.int64())}
    if schema.condition == "class_label":
        columns["class_label"] = pa.array(labels, pa.int64())
    else:
        columns["prompt"] = pa.array(prompts, pa.string())

    for name, values in table.items():
        if name not in columns:
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise ManifestError(f"manifest column {name!r} mixes value types; give it one type") from None
            except OverflowError:
                raise ManifestError(f"manifest column {name!r} has an integer outside the 64-bit range") from None
    return pa.table(columns)

