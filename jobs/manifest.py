"""Generation manifests: read, validate, or make one from a class range.

A manifest is Parquet or JSON Lines, local or any fsspec URI, one row per image:
  id           unique string (integers are accepted and kept as their decimal string)
  seed         integer in [0, 2**63)
  class_label  integer class id (class-conditional DiT models), or
  prompt       non-empty text (text-to-image FLUX models)
Any other column is carried through to the output unchanged.

Validation runs on the driver before any model is loaded, and reports every bad row it finds (up to a
limit), naming the row number, its id and the field.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa

MAX_SEED = 2**63
MAX_REPORTED_ERRORS = 20
RESERVED_OUTPUT_COLUMNS = {
    "png", "width", "height", "model_id", "policy", "plan_id", "latency_s", "batch_size", "steps_total",
    "steps_computed", "module_evals_total", "module_evals_computed", "device", "device_name", "node_id",
    "worker_id", "peak_memory_bytes", "finished_at", "error",
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
                classes.extend(range(lo, hi + 1))
            else:
                classes.append(int(part))
        except ValueError:
            raise ManifestError(f"--classes: {part!r} is not a class id or a range like 0-9") from None
    return classes


def class_manifest(classes: list[int], per_class: int, seed: int) -> pa.Table:
    """Rows for `per_class` images of each class, ids `c{class}-{i}` and seeds seed, seed+1, ..."""
    if per_class < 1:
        raise ManifestError(f"--per-class must be at least 1, got {per_class}")
    if seed < 0:
        raise ManifestError(f"--seed must be non-negative, got {seed}")
    labels = [c for c in classes for _ in range(per_class)]
    ids = [f"c{c}-{i}" for c in classes for i in range(per_class)]
    seeds = [seed + i for i in range(len(labels))]
    return pa.table({"id": ids, "seed": pa.array(seeds, pa.int64()), "class_label": pa.array(labels, pa.int64())})


def prompt_manifest(prompts: list[str], per_prompt: int, seed: int) -> pa.Table:
    ids = [f"p{p}-{i}" for p in range(len(prompts)) for i in range(per_prompt)]
    texts = [t for t in prompts for _ in range(per_prompt)]
    seeds = [seed + i for i in range(len(texts))]
    return pa.table({"id": ids, "seed": pa.array(seeds, pa.int64()), "prompt": texts})


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
    errors: list[str] = []

    def add(msg: str) -> None:
        errors.append(msg)

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
        if v is None or (isinstance(v, str) and not v.strip()) or isinstance(v, (bool, float, list, dict)):
            add(f"row {i}: id must be a non-empty string or integer, got {v!r}")
            ids.append(None)
        else:
            ids.append(str(v))
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v is None:
            continue
        if v in seen:
            add(f"{_row_ref(i, ids)}: id duplicates row {seen[v]}")
        else:
            seen[v] = i

    seeds, bad = _integers(table["seed"])
    for i in bad:
        add(f"{_row_ref(i, ids)}: seed must be an integer, got {table['seed'][i]!r}")
    for i, s in enumerate(seeds):
        if s is not None and not 0 <= s < MAX_SEED:
            add(f"{_row_ref(i, ids)}: seed must be in [0, 2**63), got {s}")

    columns = {"id": pa.array(ids, pa.string()), "seed": pa.array(seeds, pa.int64())}
    if schema.condition == "class_label":
        labels, bad = _integers(table["class_label"])
        for i in bad:
            add(f"{_row_ref(i, ids)}: class_label must be an integer, got {table['class_label'][i]!r}")
        if schema.num_classes is not None:
            for i, c in enumerate(labels):
                if c is not None and not 0 <= c < schema.num_classes:
                    add(f"{_row_ref(i, ids)}: class_label {c} is not a class of this model (0..{schema.num_classes - 1})")
        columns["class_label"] = pa.array(labels, pa.int64())
    else:
        prompts = table["prompt"]
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                add(f"{_row_ref(i, ids)}: prompt must be non-empty text, got {p!r}")
        columns["prompt"] = pa.array([p if isinstance(p, str) else None for p in prompts], pa.string())

    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise ManifestError(f"manifest has {len(errors)} problem(s):\n  " + "\n  ".join(shown) + more)

    for name, values in table.items():
        if name not in columns:
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise ManifestError(f"manifest column {name!r} mixes value types; give it one type") from None
    return pa.table(columns)

