"""Where a generation job's rows come from, streamed twice: once through the driver's validation pass, once
through Ray Data to the actors.

    ManifestFile   a Parquet or JSONL file, local or fsspec (s3://...): the driver reads it in chunks
                   (jobs/manifest.py), the workers by Parquet row group or JSONL byte range
    ClassRange     `--classes 0-999 --per-class 1000`: rows computed from their index, on the workers too
    ManifestTable  a table already in memory (the Python API, tests, `--prompt`)

The driver keeps the manifest's ids (ManifestIndex: for duplicates, resume and reconciliation), never its rows.
Every source's rows reach the actors through the same `check_rows` the driver validated them with, so a row is
typed the same on both sides (Ray Data's own file readers are not used: they list files in a task that asks a
whole CPU, which never schedules beside a CPU actor pool holding the rest of the node); a file changed between the two reads fails the run rather than generating rows
nobody validated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.manifest import (
    CHUNK_ROWS,
    INT64,
    Chunk,
    ManifestError,
    ManifestIndex,
    ManifestSchema,
    RawManifest,
    check_rows,
    check_seed_range,
    conform,
    iter_manifest_chunks,
    manifest_format,
    parse_jsonl_line,
    records_to_raw,
    table_chunks,
)


@dataclass(frozen=True)
class ManifestFile:
    """The workers read the file in spans: a Parquet file by row group, a JSONL file by the byte ranges of the
    driver's chunks (recorded during its validation pass). Ray Data's own file readers list files in a task
    that asks a whole CPU, which never schedules beside a CPU actor pool holding the rest of the node."""

    uri: str
    storage_options: dict = field(default_factory=dict)
    jsonl_spans: list = field(default_factory=list, compare=False)

    def describe(self) -> str:
        return f"manifest {self.uri}"

    def chunks(self) -> Iterator[Chunk]:
        self.jsonl_spans.clear()
        for raw in iter_manifest_chunks(self.uri, self.storage_options):
            if getattr(raw, "span", None) is not None:
                self.jsonl_spans.append(raw.span)
            yield raw

    def raw_dataset(self, schema: ManifestSchema, **task):
        import fsspec
        import pyarrow.parquet as pq
        import ray

        if manifest_format(self.uri) == "parquet":
            with fsspec.open(self.uri, "rb", **self.storage_options) as f:
                spans = [{"row_group": i} for i in range(pq.ParquetFile(f).num_row_groups)]
        else:
            spans = [{"start": a, "stop": b} for a, b in self.jsonl_spans]
        ds = ray.data.from_items(spans, override_num_blocks=max(1, len(spans)))
        return ds.map_batches(_read_spans, batch_size=1, batch_format="pyarrow",
                              fn_kwargs={"source": self, "schema": schema}, **task)

    def read_span(self, span: dict, schema: ManifestSchema) -> pa.Table:
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(self.uri, "rb", **self.storage_options) as f:
            if "row_group" in span:
                return pq.ParquetFile(f).read_row_group(span["row_group"])
            f.seek(span["start"])
            lines = f.read(span["stop"] - span["start"]).decode("utf-8").splitlines()
        records = [r for r in (parse_jsonl_line(line, where=f"manifest {self.uri}") for line in lines) if r is not None]
        # typed here: JSONL values of one column may disagree in type (ids 7 and "a"), which Arrow cannot carry
        return revalidated(records_to_raw(records), schema, self.describe())


@dataclass(frozen=True)
class ClassRange:
    """`per_class` images of each class, seeds seed, seed+1, ... in row order, ids `c{class}-s{seed}-{i}`: the id
    names the request (the first seed included), so a rerun with another --seed never mistakes its rows for
    these."""

    classes: tuple[int, ...]
    per_class: int
    seed: int

    def __post_init__(self):
        if self.per_class < 1:
            raise ManifestError(f"--per-class must be at least 1, got {self.per_class}")
        check_seed_range(self.seed, self.num_rows)
        outside = [c for c in self.classes if not INT64[0] <= c < INT64[1]]
        if outside:
            raise ManifestError(f"--classes: {outside[0]} is not a 64-bit integer class id")
        values, counts = np.unique(np.asarray(self.classes, dtype=np.int64), return_counts=True)
        if (counts > 1).any():
            raise ManifestError(f"--classes: class {values[counts > 1][0]} is given more than once")

    @property
    def num_rows(self) -> int:
        return len(self.classes) * self.per_class

    def describe(self) -> str:
        return f"{len(self.classes)} class(es) x {self.per_class}"

    def rows(self, start: int, stop: int) -> pa.Table:
        index = np.arange(start, stop, dtype=np.int64)
        labels = np.asarray(self.classes, dtype=np.int64)[index // self.per_class]
        ids = pc.binary_join_element_wise(
            "c", pa.array(labels).cast(pa.string()), f"-s{self.seed}-", pa.array(index % self.per_class).cast(pa.string()), ""
        )
        return pa.table({"id": ids, "seed": pa.array(index + self.seed), "class_label": pa.array(labels)})

    def chunks(self) -> Iterator[pa.Table]:
        for start in range(0, self.num_rows, CHUNK_ROWS):
            yield self.rows(start, min(start + CHUNK_ROWS, self.num_rows))

    def raw_dataset(self, schema: ManifestSchema, **task):
        import ray

        spans = [{"start": s, "stop": min(s + CHUNK_ROWS, self.num_rows)} for s in range(0, self.num_rows, CHUNK_ROWS)]
        return ray.data.from_items(spans).map_batches(
            _expand_spans, batch_size=1, batch_format="pyarrow", fn_kwargs={"source": self}, **task
        )


@dataclass(frozen=True)
class ManifestTable:
    table: pa.Table

    def describe(self) -> str:
        return f"{self.table.num_rows} row(s) in memory"

    def chunks(self) -> Iterator[pa.Table]:
        return table_chunks(self.table)

    def raw_dataset(self, schema: ManifestSchema, **task):
        import ray

        return ray.data.from_arrow(list(table_chunks(self.table)))


ManifestSource = ManifestFile | ClassRange | ManifestTable


def as_source(manifest, schema: ManifestSchema) -> ManifestSource:
    """A source for what the Python API accepts: a source, a table, or read_manifest's columns."""
    if isinstance(manifest, (ManifestFile, ClassRange, ManifestTable)):
        return manifest
    if isinstance(manifest, RawManifest):
        problems, table = check_rows(manifest, schema)
        # typed when it can be; otherwise the driver's scan names the problems before anything reads the rows
        return ManifestTable(table) if not problems else _Unreadable(manifest)
    return ManifestTable(manifest)


@dataclass(frozen=True)
class _Unreadable:
    raw: RawManifest

    def describe(self) -> str:
        return f"{self.raw.num_rows} row(s) in memory"

    def chunks(self) -> Iterator[RawManifest]:
        return iter([self.raw])


def normalised_chunks(source: ManifestSource, schema: ManifestSchema, index: ManifestIndex) -> Iterator[pa.Table]:
    """The source's rows again, typed as validated (for checks against what an output already holds)."""
    offset = 0
    for raw in source.chunks():
        yield conform(revalidated(raw, schema, source.describe(), offset), index.schema)
        offset += raw.num_rows


def rows_dataset(source: ManifestSource, schema: ManifestSchema, index: ManifestIndex, **task):
    """Ray Data dataset of the source's rows, typed exactly as the driver's validation typed them; `task`: the
    read tasks' options (num_cpus, concurrency)."""
    return source.raw_dataset(schema, **task).map_batches(
        _normalise, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"schema": schema, "target": index.schema, "where": source.describe()}, **task,
    )


def _normalise(batch: pa.Table, *, schema: ManifestSchema, target: pa.Schema, where: str) -> pa.Table:
    return conform(revalidated(batch, schema, where), target)


def revalidated(raw: Chunk, schema: ManifestSchema, where: str, offset: int = 0) -> pa.Table:
    """Rows read a second time, typed by the checks they passed the first time; a file changed in between fails
    the run rather than generating rows nobody validated."""
    problems, table = check_rows(raw, schema, offset)
    if problems:
        raise ManifestError(f"{where} changed after the job validated it: {problems[0][1]}")
    return table


def _read_spans(batch: pa.Table, *, source: ManifestFile, schema: ManifestSchema) -> pa.Table:
    return pa.concat_tables([source.read_span(span, schema) for span in batch.to_pylist()], promote_options="permissive")


def _expand_spans(batch: pa.Table, *, source: ClassRange) -> pa.Table:
    spans = zip(batch.column("start").to_pylist(), batch.column("stop").to_pylist())
    return pa.concat_tables([source.rows(start, stop) for start, stop in spans])
