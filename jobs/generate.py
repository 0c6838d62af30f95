"""The generation job: manifest -> Ray Data actors running a cached diffusion pipeline -> Parquet.

    driver, before Ray starts:  validate the manifest in one streaming pass (keeping its ids, not its rows),
                                the plan against the pipeline's signature, take the output's lease (the write
                                probe), read its run record and the ids already written
    -> the manifest read by Ray Data (jobs/manifest_source.py) -> keep the rows still to do
    -> map_batches(GenerateBatch, ActorPoolStrategy) -> write_parquet
    driver, after:              compact (one row per id), reconcile asked vs written, close the run record

Each actor loads the model once and attaches the cache hooks; each call generates one batch with per-row
seeds and returns one output row per manifest row (an error row, with the reason, if the batch failed).
What the output location holds and who may touch what is in jobs/outputs.py; the exit codes in jobs/cli.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import outputs
from jobs.errors import JobInputError
from jobs.lease import Lease
from jobs.location import Location
from jobs.manifest import ManifestIndex, ManifestSchema, scan_chunks
from jobs.manifest_source import ManifestSource, as_source, normalised_chunks, rows_dataset
from jobs.run_record import RunRecord, new_run_id, request_of, utc_now
from pipelines.build import GeneratorConfig

log = logging.getLogger("invardiff")

# How long a job waits for its whole actor pool before failing (GPU nodes of an autoscaling cluster
# can take minutes to appear).
ACTOR_START_TIMEOUT_S = int(os.environ.get("INVARDIFF_ACTOR_START_TIMEOUT_S", "1800"))
# A Parquet write encodes a block of PNG bytes: light, but it needs a CPU slot left free (see below).
WRITE_TASK_CPUS = 0.25
# Reading the manifest and picking the rows still to do: light tasks that fit beside the write tasks.
READ_TASK_CPUS = 0.1
# Rows per output file, about: big enough for downstream readers, small enough that a file lands every few
# minutes on a GPU pool (fewer rows per file when the whole run is small, so its work still spreads).
DEFAULT_ROWS_PER_FILE = 10_000
DEFAULT_MAX_ATTEMPTS = 3
# CPUs a GPU actor reserves at most: it encodes each batch's PNGs on that many threads (pipelines/png.py) while
# its GPU waits. Estimated, not yet measured on a GPU: 2.5 ms of CPU per 256x256 image, so a 32-image batch of
# cached DiT-XL/2 (~160 ms of GPU at ~200 images/s) waits 80 ms on one thread, 20 ms on four.
GPU_ACTOR_MAX_CPUS = 4


class RequestMismatchError(JobInputError):
    """The output location holds rows generated for another request (seed, model, plan, steps, guidance)."""


@dataclass
class GenerateSummary:
    out: str
    run_id: str
    rows_already_there: int  # asked rows written without error by an earlier run
    rows_attempted: int  # rows this run sent to the actors (new ones and retried error rows)
    rows_retried: int  # of those, error rows of an earlier run
    rows_exhausted: int  # error rows not retried: they failed max_attempts times
    reconciliation: outputs.Reconciliation
    seconds: float
    workers: int
    device: str
    failure: str | None = None  # why the run stopped early, in one line
    shadow: dict | None = None  # with --shadow: jobs.shadow_watch.ShadowOptions.record()

    @property
    def complete(self) -> bool:
        return self.failure is None and self.reconciliation.complete

    @property
    def images_per_second(self) -> float:
        new = self.reconciliation.written - self.rows_already_there
        return new / self.seconds if self.seconds > 0 else 0.0


def make_policy(plan_json: str | None, num_steps: int | None = None):
    """None: no caching; a plan document: InvarDiff, or L2C for a plan from router training; a policy spec
    (`invardiff.policies.policy_spec_json`): DiCache, which needs the sampler's `num_steps`."""
    from invardiff.policies import policy_from_json

    return policy_from_json(plan_json, num_steps=num_steps)


class GenerateBatch:
    """Ray Data callable class: one instance per actor, the model loaded once in __init__."""

    def __init__(self, generator_config: dict, plan_json: str | None = None, torch_threads: int | None = None,
                 progress=None, shadow: dict | None = None, shadow_watch=None):
        import ray
        import torch

        from pipelines.build import build_generator

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.generator = build_generator(GeneratorConfig(**generator_config))
        self.policy = make_policy(plan_json, num_steps=self.generator.num_inference_steps)
        # checked on the driver already; kept for a worker whose model differs
        if getattr(self.policy, "plan", None) is not None:
            self.policy.plan.check_compatible(self.generator.signature())
        self.policy.attach(self.generator.transformer)
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.worker_id = context.get_actor_id() or f"pid-{os.getpid()}"
        self.progress = progress  # a jobs.console.row_counter() actor, told how many rows each batch finished
        # {"fraction", "keep_images"}: the rows (pipelines.shadow.is_shadow) also generated uncached
        self.shadow = shadow or {"fraction": 0.0, "keep_images": False}
        self.shadow_watch = shadow_watch  # a jobs.shadow_watch.ShadowWatch actor, told the shadows' PSNRs

    def generate(self, requests: list) -> list[dict]:
        from pipelines.runner import run_batch
        from pipelines.shadow import shadow_rows

        cached = run_batch(self.generator, requests, self.policy)
        if not self.shadow["fraction"]:
            return cached.rows
        shadows = shadow_rows(self.generator, requests, cached, self.policy, self.shadow["fraction"],
                              keep_images=self.shadow["keep_images"])
        psnrs = [s["shadow_psnr"] for s in shadows if s]
        if psnrs and self.shadow_watch is not None:
            self.shadow_watch.add.remote(psnrs)
        return [{**row, **extra} for row, extra in zip(cached.rows, shadows)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.base import Request

        manifest = batch.to_pylist()
        requests = [
            Request(id=r["id"], seed=int(r["seed"]), class_label=r.get("class_label"), prompt=r.get("prompt"))
            for r in manifest
        ]
        try:
            generated = self.generate(requests)
            error = None
        except Exception as e:  # noqa: BLE001 - one bad batch must not lose the rest of the job; the rows say why
            log.debug("batch failed", exc_info=True)
            generated = [{} for _ in requests]
            error = one_line(e)
        finished_at = time.time()
        rows = []
        for source, out in zip(manifest, generated):
            row = dict(source)
            row.update(out)
            row.update(node_id=self.node_id, worker_id=self.worker_id, finished_at=finished_at, error=error)
            rows.append(row)
        if self.progress is not None:
            self.progress.add.remote(len(rows))
        return outputs.rows_to_table(rows, manifest_schema=batch.schema)


def run_generate(
    manifest: pa.Table | ManifestSource,
    out: str,
    generator_config: GeneratorConfig,
    *,
    schema: ManifestSchema,
    plan_json: str | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    address: str | None = None,
    rows_per_file: int | None = None,
    overwrite: bool = False,
    break_lease: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    command: str = "",
    batch_class: type = GenerateBatch,
    shadow=None,
) -> GenerateSummary:
    """Generate every manifest row not yet written without error under `out`, then reconcile.

    `manifest` is a table in memory or a streamed source (jobs.manifest_source: a Parquet/JSONL file, local or
    on S3, or a class range). Everything that can be checked on the driver is checked before Ray starts
    (JobInputError and its kin); `batch_class` is the actor class (a subclass of GenerateBatch; tests inject
    faults through it)."""
    from jobs import console
    from jobs.plan_store import signature_for

    if max_attempts < 1:
        raise JobInputError(f"--max-attempts must be at least 1, got {max_attempts}")
    source = as_source(manifest, schema)
    index = scan_chunks(source.chunks(), schema)
    _check_device(generator_config, address)
    signature = signature_for(generator_config, address)
    policy = make_policy(plan_json, num_steps=signature.num_inference_steps)
    if getattr(policy, "plan", None) is not None:
        policy.plan.check_compatible(signature)
    request = request_of(signature, policy=policy.name, plan_id=policy.plan_id)
    log.info("%s", console.start_line(signature, policy.name, policy.plan_id))

    location = Location(out)
    lease = Lease.acquire(location, command=command, break_lease=break_lease)
    try:
        lease.keep_alive(on_lost=_interrupt_main)
        return _run_holding_lease(
            source, index, location, lease, request, generator_config, schema=schema, plan_json=plan_json,
            batch_size=batch_size, workers=workers, address=address, rows_per_file=rows_per_file,
            overwrite=overwrite, max_attempts=max_attempts, command=command, batch_class=batch_class,
            shadow=shadow,
        )
    finally:
        lease.release()


def _check_device(config: GeneratorConfig, address: str | None) -> None:
    """--device cuda for the embedded Ray on a machine without CUDA fails in every actor's constructor; say so
    here instead (a cluster named by --address or $RAY_ADDRESS may well have GPUs: Ray counts them there)."""
    if config.device != "cuda" or address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    if not torch.cuda.is_available():
        raise JobInputError("--device cuda: this machine has no CUDA device (use --device cpu, or --address a "
                            "cluster with GPUs)")


def _interrupt_main() -> None:
    import _thread

    _thread.interrupt_main()  # the main thread stops as on Ctrl-C; run_generate then says the lease was lost


def _run_holding_lease(source, index, location, lease, request, generator_config, *, schema, plan_json, batch_size,
                       workers, address, rows_per_file, overwrite, max_attempts, command, batch_class, shadow=None):
    record = RunRecord.load(location)
    inventory = outputs.Inventory.take(location, record)
    inventory.refuse_foreign(location)
    if record is not None and overwrite:
        for name in inventory.data + inventory.partial + inventory.temporaries:
            location.remove(name)
        log.warning("--overwrite: removed %d file(s) of earlier runs from %s", len(inventory.data), location.uri)
        record = None
    if record is not None:
        differences = record.differences(request)
        if differences:
            raise RequestMismatchError(
                f"--out {location.uri} holds rows generated with other settings ({'; '.join(differences)}); "
                "use another --out, or --overwrite to replace the rows there"
            )
    rows = _settle(location, record)  # heals duplicates left by a run stopped between writing and compacting
    _refuse_conflicting_rows(source, index, rows, schema, location)
    todo = Todo.of(index, rows, max_attempts)

    record = record or RunRecord(request=request)
    run_id = new_run_id()
    entry = record.start_run(run_id, command, asked=index.num_rows, already_there=todo.already_there,
                             max_attempts=max_attempts)
    record.save(location)  # before the first data file: every file of this run is attributable to it

    failure, pool, interrupted = None, None, None
    started = time.perf_counter()
    try:
        if todo.count:
            pool = ActorPool.for_job(generator_config, workers, address)
            _write(source, index, todo, location, run_id, pool, schema=schema, plan_json=plan_json,
                   batch_size=batch_size, rows_per_file=rows_per_file, batch_class=batch_class, shadow=shadow)
        else:
            log.warning("all %d rows are already in %s; nothing to generate", index.num_rows, location.uri)
    except KeyboardInterrupt as e:
        interrupted = e
        failure = "lost the lease to another job" if lease.lost.is_set() else "interrupted"
        _stop_ray()
    except Exception as e:  # noqa: BLE001 - a failed write is reported in one line, with what did get written
        failure = one_line(e)
    seconds = time.perf_counter() - started
    if shadow is not None and shadow.stopped and not lease.lost.is_set():
        interrupted, failure = None, f"stopped on drift ({shadow.drift})"  # --stop-on-drift: not a Ctrl-C

    unknown = outputs.Reconciliation(index.num_rows, 0, 0, index.num_rows, ())
    if lease.lost.is_set():
        reconciliation = unknown  # the location is another job's now: not ours to read, clean or write
    else:
        try:
            after = _settle(location, record) if todo.count else rows  # nothing written: nothing new to read
            reconciliation = outputs.reconcile(after, index.ids)
        except Exception as e:  # noqa: BLE001 - the storage itself failed: say so, and what is unknown
            failure = failure or one_line(e)
            reconciliation = unknown
            log.error("could not read back %s to reconcile (%s)", location.uri, one_line(e))
    summary = GenerateSummary(
        out=location.uri, run_id=run_id, rows_already_there=todo.already_there, rows_attempted=todo.count,
        rows_retried=todo.retried, rows_exhausted=todo.exhausted, reconciliation=reconciliation, seconds=seconds,
        workers=pool.workers if pool else 0, device=pool.device if pool else "none", failure=failure,
        shadow=shadow.record() if shadow is not None and shadow.enabled else None,
    )
    status = "complete" if summary.complete else ("interrupted" if interrupted else "incomplete")
    entry.update(finished_at=utc_now(), status=status, written=reconciliation.written, failed=reconciliation.failed,
                 missing=reconciliation.missing, message=failure)
    if summary.shadow is not None:
        entry["shadow"] = summary.shadow
    try:
        if not lease.lost.is_set():
            record.save(location)  # written last: "complete" only once the rows are reconciled
    except Exception as e:  # noqa: BLE001 - the rows are what counts; the record says "running" until a rerun
        log.error("could not update %s (%s)", location.url("_run.json"), one_line(e))
    if interrupted is not None and not lease.lost.is_set():
        interrupted.summary = summary  # the CLI prints what was committed before it exits 130
        raise interrupted
    return summary


def _settle(location: Location, record: RunRecord | None) -> outputs.Rows:
    """The job's rows, one per id: its half-written files removed, superseded rows compacted away."""
    inventory = outputs.Inventory.take(location, record)
    inventory.remove_leftovers(location)
    rows = outputs.Rows.read(location, inventory.data)
    if rows.compact(location):
        rows = outputs.Rows.read(location, outputs.Inventory.take(location, record).data)
    return rows


def _refuse_conflicting_rows(source: ManifestSource, index: ManifestIndex, rows: outputs.Rows, schema: ManifestSchema,
                             location: Location) -> None:
    """An id already in the output must stand for the same image: same seed and the same class or prompt."""
    if rows.table.num_rows == 0:
        return
    condition = schema.condition
    there = rows.table.select(["id", "seed", condition]).rename_columns(["id", "seed_there", f"{condition}_there"])
    clashes, first = 0, []
    for chunk in normalised_chunks(source, schema, index):
        # the written rows of this chunk's ids first: the join's hash table then holds a few rows, not the output
        written = there.filter(pc.is_in(there["id"], value_set=chunk["id"]))
        if written.num_rows == 0:
            continue
        joined = chunk.select(["id", "seed", condition]).join(written, "id", join_type="inner")
        differs = pc.or_(
            pc.not_equal(joined.column("seed"), joined.column("seed_there")),
            pc.not_equal(joined.column(condition), joined.column(f"{condition}_there")),
        )
        clashing = joined.filter(pc.fill_null(differs, True))
        clashes += clashing.num_rows
        first += clashing.slice(0, 3 - len(first)).to_pylist()
    if clashes:
        shown = "; ".join(
            f"id {r['id']!r}: seed {r['seed_there']} and {condition} {r[condition + '_there']!r} there, "
            f"seed {r['seed']} and {condition} {r[condition]!r} asked"
            for r in first
        )
        raise RequestMismatchError(
            f"--out {location.uri}: {clashes} id(s) of the manifest were generated there for another request "
            f"({shown}); use another --out, or --overwrite to replace the rows there"
        )


@dataclass(frozen=True)
class Todo:
    """Which manifest rows a run sends to the actors, as ids (the rows themselves stream from the source)."""

    skip: pa.Array  # ids not to generate: written without error, or failed max_attempts times
    retries: pa.Table  # id, attempt: error rows of earlier runs, with the attempt number they get now
    count: int  # rows to generate
    already_there: int
    retried: int
    exhausted: int

    @classmethod
    def of(cls, index: ManifestIndex, rows: outputs.Rows, max_attempts: int) -> Todo:
        kept, _ = rows.resolved()
        kept = kept.filter(pc.is_in(kept["id"], value_set=index.ids.combine_chunks()))
        done = kept.filter(kept["ok"])["id"]
        failed = kept.filter(pc.invert(kept["ok"]))
        spent = pc.greater_equal(failed["attempt"], max_attempts)
        exhausted = failed.filter(spent)["id"]
        retried = failed.filter(pc.invert(spent))
        if len(exhausted):
            log.warning("%d row(s) failed %d time(s) already and are not retried (raise --max-attempts to retry them)",
                        len(exhausted), max_attempts)
        skip = pa.concat_arrays([done.combine_chunks(), exhausted.combine_chunks()]).cast(pa.string())
        retries = pa.table({"id": retried["id"].cast(pa.string()),
                            "attempt": pc.add(retried["attempt"], 1).cast(pa.int32())})
        return cls(skip, retries, index.num_rows - len(skip), len(done), retried.num_rows, len(exhausted))


def select_todo(batch: pa.Table, *, todo_refs: list, metadata: dict | None) -> pa.Table:
    """The batch's rows still to do, with the attempt each one is (a Ray Data task: the ids travel by reference,
    fetched once per worker process)."""
    skip, retries = _fetch_todo(todo_refs)
    if len(skip):
        batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=skip)))
    attempt = pc.fill_null(pc.take(retries.column("attempt"), pc.index_in(batch.column("id"), value_set=retries.column("id"))), 1) \
        if retries.num_rows else pa.array(np.ones(batch.num_rows, np.int32))
    batch = batch.append_column("attempt", attempt.cast(pa.int32()))
    return batch.replace_schema_metadata(metadata)


_TODO_CACHE: dict[str, tuple] = {}


def _fetch_todo(refs: list) -> tuple[pa.Array, pa.Table]:
    import ray

    key = refs[0].hex()
    if key not in _TODO_CACHE:
        _TODO_CACHE.clear()
        _TODO_CACHE[key] = tuple(ray.get(refs))
    return _TODO_CACHE[key]


@dataclass(frozen=True)
class ActorPool:
    """The generation actors a job runs: how many, on which device, each with what CPU share."""

    workers: int
    gpus: int  # GPUs in the cluster (0: CPU actors)
    actor_cpus: float
    torch_threads: int
    config: GeneratorConfig  # with the device the actors use
    cpu_nodes: int  # live nodes with CPUs: one manifest read at a time on each

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    @classmethod
    def for_job(cls, generator_config: GeneratorConfig, workers: int | None, address: str | None) -> ActorPool:
        """Starts (or joins) Ray: the pool is shaped by what the cluster has."""
        from jobs.ray_runtime import cluster_gpus, ensure_ray, node_shapes

        ensure_ray(address)
        nodes = node_shapes()
        gpus = cluster_gpus() if generator_config.device in (None, "cuda") else 0
        config = generator_config if gpus or generator_config.device else _with_device(generator_config, "cpu")
        if workers is None:
            workers = max(1, gpus) if gpus else 1
        actor_cpus, torch_threads = gpu_actor_shape(nodes) if gpus else cpu_actor_shape(workers, nodes)
        return cls(workers, gpus, actor_cpus, torch_threads, config, cpu_nodes=sum(1 for cpus, _ in nodes if cpus))


def _write(source, index, todo: Todo, location, run_id, pool: ActorPool, *, schema, plan_json, batch_size,
           rows_per_file, batch_class, shadow=None) -> None:
    import ray

    from jobs import console, hf_features
    from jobs.ray_runtime import filesystem_for
    from jobs.shadow_watch import DriftMonitor, start_watch
    from pipelines.build import class_names

    if not console.verbose():
        _hide_ray_data_failure_reports()
    # Start generating only when the whole pool is up: otherwise the first actor to load the model
    # takes most blocks of a small job, and on a cluster a node that cannot start its actor would go
    # unnoticed while the job quietly runs at a fraction of its throughput.
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    workers = pool.workers
    # Several batches per block keep actors busy, and enough blocks exist for every actor to get work.
    rows_per_block = max(batch_size, min(batch_size * 8, math.ceil(todo.count / (workers * 2))))
    if rows_per_file is None:
        # Whole blocks: a writer gathers blocks until it has rows_per_file, so a target between two block
        # counts would leave every file with a block's remainder as a file of its own (195 files for 1M rows).
        wanted = min(DEFAULT_ROWS_PER_FILE, math.ceil(todo.count / (workers * 4)))
        rows_per_file = max(1, wanted // rows_per_block) * rows_per_block
    # The class names ride on the rows' schema to the actors, which write them as ClassLabel metadata.
    named = hf_features.with_metadata(index.schema, class_names(pool.config.model))
    todo_refs = [ray.put(todo.skip), ray.put(todo.retries)]
    # One read task per node at a time, as cpu_actor_shape reserves: reads keep well ahead of the actors, and
    # the share kept for the Parquet writes stays theirs (three reads at once took it, and the first file
    # landed only once the whole manifest had been read).
    read = dict(num_cpus=READ_TASK_CPUS, concurrency=max(1, pool.cpu_nodes))
    ds = rows_dataset(source, schema, index, **read)
    ds = ds.map_batches(select_todo, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"todo_refs": todo_refs, "metadata": named.metadata}, **read)
    ds = _in_blocks_of(ds, rows_per_block, **read)
    counter = console.row_counter()
    watch = start_watch(shadow) if shadow is not None and shadow.enabled else None
    ds = ds.map_batches(
        batch_class,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if pool.gpus else 0,
        num_cpus=pool.actor_cpus,
        fn_constructor_kwargs=dict(
            generator_config=asdict(pool.config), plan_json=plan_json, torch_threads=pool.torch_threads,
            progress=counter,
            **({} if watch is None else dict(shadow={"fraction": shadow.fraction, "keep_images": shadow.keep_images},
                                             shadow_watch=watch)),
        ),
    )
    fs, path = filesystem_for(location.uri)
    log.info(
        "generating %d images with %d %s actor(s), batch size %d; output: %s (run %s)",
        todo.count, workers, "GPU" if pool.gpus else "CPU", batch_size, location.uri, run_id,
    )
    monitor = DriftMonitor(watch, shadow, on_stop=_interrupt_main) if watch is not None else contextlib.nullcontext()
    with console.Progress("generate", todo.count) as progress, monitor:
        progress.follow(console.read_counter(counter))
        ds.write_parquet(
            path, filesystem=fs, min_rows_per_file=rows_per_file,
            filename_provider=outputs.filename_provider(run_id),
            ray_remote_args={"num_cpus": WRITE_TASK_CPUS},
        )


def _in_blocks_of(ds, rows: int, *, num_cpus: float, concurrency: int):
    """`ds.repartition(target_num_rows_per_block=rows)` (streaming), with the read tasks' CPUs and concurrency
    (so that it runs fused with them, in the same task).

    Blocks of a few batches spread the work over every actor. The public call asks 1 CPU per task, which never
    schedules beside a CPU actor pool holding the rest of the node: Ray Data then waits forever. Ray is pinned
    to 2.60 (pyproject.toml); tests/test_generate_job.py runs this on every job."""
    from ray.data import Dataset
    from ray.data._internal.compute import TaskPoolStrategy
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators import StreamingRepartition

    op = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[ds._logical_plan.dag],
                              ray_remote_args={"num_cpus": num_cpus}, compute=TaskPoolStrategy(size=concurrency))
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


class _FileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.hide = True  # Ray Data's console handler drops hidden records; its log file keeps them
        return True


def _hide_ray_data_failure_reports() -> None:
    """Keep Ray Data's report of a failed dataset (a full traceback) off the console: the run ends with the same
    failure in one line (`one_line`), and the traceback stays in Ray Data's log file (--verbose shows it)."""
    failure_log = logging.getLogger("ray.data.exceptions")
    if not any(isinstance(f, _FileOnly) for f in failure_log.filters):
        failure_log.addFilter(_FileOnly())


def _stop_ray() -> None:
    """Stop this driver's Ray work before cleaning up after an interrupt: no write task may finish a file
    after the cleanup looked for half-written ones (an embedded Ray stops with it; on a cluster the job's
    workers are stopped when their driver disconnects)."""
    import ray
    from ray._private import auto_init_hook

    if ray.is_initialized():
        # Ray Data's executor threads go on polling for a moment after an interrupt; with auto-connect on, the
        # first of them to call Ray after the shutdown would start a whole new local Ray (20 s on 2 cores).
        auto_init_hook.enable_auto_connect = False
        ray.shutdown()


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(e: BaseException) -> str:
    """What a failure comes down to, in one line: `Type: message`.

    Ray wraps a worker's error in layers (ActorDiedError around the traceback of a failed actor constructor,
    RayTaskError around a task's, Ray Data's SystemException/UserCodeException markers with no message);
    the innermost layer that says something is named, with the first `SomeError: message` line of its text
    when that text carries a traceback."""
    chain, seen = [], set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        inner = getattr(e, "cause", None)
        e = inner if isinstance(inner, BaseException) else (e.__cause__ or e.__context__)
    saying = [x for x in chain if str(x).strip()] or chain
    error = saying[-1]
    text = _ANSI.sub("", str(error)).strip()
    if isinstance(error, OSError) and error.strerror and isinstance(error.filename, str) and "\n" in error.filename:
        # Ray Data re-raises a failed write (a full disk) as OSError(errno, strerror, <its retry advice>): the
        # advice sits where the file name goes and would make the line run on with escaped newlines.
        text = f"[Errno {error.errno}] {error.strerror}"
    quoted = _EXCEPTION_LINE.search(text)
    if quoted and quoted.group(1).rsplit(".", 1)[-1] != type(error).__name__:
        message = f"{quoted.group(1).rsplit('.', 1)[-1]}: {quoted.group(2)}"
    else:
        message = quoted.group(2) if quoted else (text.splitlines()[0] if text else "")
    return f"{type(error).__name__}: {message}"[:500] if message else type(error).__name__


def gpu_actor_shape(nodes: list[tuple[float, float]]) -> tuple[float, int]:
    """(CPUs reserved, threads) for each GPU actor, from the nodes' (CPUs, GPUs): its GPU's share of the node's
    CPUs, less the manifest reads' and Parquet writes' share, up to GPU_ACTOR_MAX_CPUS; at least 1."""
    per_gpu = [cpus / gpus for cpus, gpus in nodes if gpus]
    share = min(per_gpu) - READ_TASK_CPUS - WRITE_TASK_CPUS if per_gpu else 1.0
    cpus = max(1, min(GPU_ACTOR_MAX_CPUS, math.floor(share)))
    return float(cpus), cpus


def cpu_actor_shape(workers: int, nodes: list[tuple[float, float]]) -> tuple[float, int]:
    """(CPUs reserved, torch intra-op threads) for each CPU actor, from the nodes' (CPUs, GPUs).

    An actor reserves its node's CPUs shared among the actors that node gets (workers spread evenly),
    less READ_TASK_CPUS + WRITE_TASK_CPUS for the manifest reads and Parquet writes: an actor pool that holds
    every CPU deadlocks Ray Data
    (environment notes). Reserving the share, not a fixed 1 CPU, is what keeps two actors meant for two
    nodes from landing on one (Ray Data's SPREAD is best effort, and did colocate them), and threads
    follow the share: more threads than cores oversubscribes a node (on a busy 2-core machine one batch
    took 1.1 s with 1 thread and 6-12 s with 2). INVARDIFF_TORCH_THREADS overrides the thread count.
    """
    node_cpus = [cpus for cpus, _ in nodes if cpus]
    smallest = min(node_cpus) if node_cpus else 1.0
    actors_per_node = math.ceil(workers / max(1, len(node_cpus)))
    actor_cpus = max(0.05, (smallest - READ_TASK_CPUS - WRITE_TASK_CPUS) / actors_per_node)
    override = os.environ.get("INVARDIFF_TORCH_THREADS")
    threads = int(override) if override else int(smallest // actors_per_node)
    return actor_cpus, max(1, threads)


def _with_device(config: GeneratorConfig, device: str) -> GeneratorConfig:
    from dataclasses import replace

    return replace(config, device=device)
