"""The generation job: manifest -> Ray Data actors running a cached diffusion pipeline -> Parquet.

    read + validate manifest (driver)   ->   skip ids already in the output (resume)
    -> from_arrow -> map_batches(GenerateBatch, ActorPoolStrategy)  ->  write_parquet (local or s3://)

Each actor loads the model once, validates the plan against its own pipeline and attaches the cache
hooks; each call generates one batch with per-row seeds and returns one output row per manifest row
(an error row, with the reason, if the batch failed).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import pyarrow as pa

from jobs import outputs
from jobs.manifest import ManifestSchema, validate_manifest
from pipelines.build import GeneratorConfig

log = logging.getLogger("invardiff")

# How long a job waits for its whole actor pool before failing (GPU nodes of an autoscaling cluster
# can take minutes to appear).
ACTOR_START_TIMEOUT_S = int(os.environ.get("INVARDIFF_ACTOR_START_TIMEOUT_S", "1800"))
# A Parquet write encodes a block of PNG bytes: light, but it needs a CPU slot left free (see below).
WRITE_TASK_CPUS = 0.25


@dataclass
class GenerateSummary:
    out: str
    rows_in_manifest: int
    rows_skipped: int  # already present in the output from an earlier run
    rows_written: int
    errors: int
    seconds: float
    workers: int
    device: str

    @property
    def images_per_second(self) -> float:
        return (self.rows_written - self.errors) / self.seconds if self.seconds > 0 else 0.0


def make_policy(plan_json: str | None):
    from invardiff.policy import InvarDiffPolicy, NoCache

    if plan_json is None:
        return NoCache()
    from invardiff.plan import Plan

    return InvarDiffPolicy(Plan.from_json(plan_json))


class GenerateBatch:
    """Ray Data callable class: one instance per actor, the model loaded once in __init__."""

    def __init__(self, generator_config: dict, plan_json: str | None = None, torch_threads: int | None = None):
        import ray
        import torch

        from pipelines.build import build_generator

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.generator = build_generator(GeneratorConfig(**generator_config))
        self.policy = make_policy(plan_json)
        if plan_json is not None:
            self.policy.plan.check_compatible(self.generator.signature())
        self.policy.attach(self.generator.transformer)
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.worker_id = context.get_actor_id() or f"pid-{__import__('os').getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.base import Request
        from pipelines.runner import run_batch

        manifest = batch.to_pylist()
        requests = [
            Request(id=r["id"], seed=int(r["seed"]), class_label=r.get("class_label"), prompt=r.get("prompt"))
            for r in manifest
        ]
        finished_at = None
        try:
            generated = run_batch(self.generator, requests, self.policy).rows
            error = None
        except Exception as e:  # one bad batch must not lose the rest of the job; the rows say why
            log.exception("batch failed")
            generated = [{} for _ in requests]
            error = f"{type(e).__name__}: {e}"
        finished_at = time.time()
        rows = []
        for source, out in zip(manifest, generated):
            row = dict(source)
            row.update(out)
            row.update(node_id=self.node_id, worker_id=self.worker_id, finished_at=finished_at, error=error)
            rows.append(row)
        return outputs.rows_to_table(rows, manifest_schema=batch.schema)


def _split_blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]


def run_generate(
    manifest: pa.Table,
    out: str,
    generator_config: GeneratorConfig,
    *,
    schema: ManifestSchema,
    plan_json: str | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    address: str | None = None,
    rows_per_file: int | None = None,
) -> GenerateSummary:
    """Generate every manifest row not yet present under `out`. Validation happens before Ray starts."""
    import ray

    from jobs.ray_runtime import cluster_gpus, ensure_ray, filesystem_for

    manifest = validate_manifest(manifest, schema)
    # Resume is an anti-join of the manifest against the ids already in the output, not Ray Data's
    # CheckpointConfig (ray.data.checkpoint, beta in 2.60), which we evaluated and do not use here:
    #   * its planner only checkpoints read -> ... -> write plans; ours starts from_arrow (the manifest
    #     is validated, or built from --classes/--prompt, on the driver before Ray starts), and it
    #     silently disables itself otherwise;
    #   * it keeps a second store next to the output (checkpoint_path, which must be cluster-shared:
    #     a local path is only correct on one node). Deleting output files but not the checkpoint
    #     would then skip ids that are nowhere, i.e. lose rows. Here the output is the only record;
    #   * its two-phase commit buys nothing for Parquet files: a file is readable only once its
    #     footer is written (an S3 object only once its upload completes), so a readable file is a
    #     committed one, and existing_ids() deletes the unreadable leftovers of a killed write.
    # Both need a unique id column and cost the same (every done id in memory once). One job per
    # output at a time: a second job would delete the first one's files that are still being written.
    done = outputs.existing_ids(out)
    todo = manifest.filter(pa.compute.invert(pa.compute.is_in(manifest.column("id"), pa.array(sorted(done), pa.string())))) if done else manifest
    rows_skipped = manifest.num_rows - todo.num_rows
    if todo.num_rows == 0:
        log.warning("all %d rows are already in %s; nothing to do", manifest.num_rows, out)
        return GenerateSummary(out, manifest.num_rows, rows_skipped, 0, 0, 0.0, 0, "none")

    ensure_ray(address)
    # Start generating only when the whole pool is up: otherwise the first actor to load the model
    # takes most blocks of a small job, and on a cluster a node that cannot start its actor would go
    # unnoticed while the job quietly runs at a fraction of its throughput.
    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    gpus = cluster_gpus() if generator_config.device in (None, "cuda") else 0
    config = generator_config if gpus or generator_config.device else _with_device(generator_config, "cpu")
    if workers is None:
        workers = max(1, gpus) if gpus else 1
    if gpus:
        actor_cpus, torch_threads = 1.0, None
    else:
        actor_cpus, torch_threads = cpu_actor_shape(workers)

    # Several batches per block keep actors busy, and enough blocks exist for every actor to get work.
    rows_per_block = max(batch_size, min(batch_size * 8, math.ceil(todo.num_rows / (workers * 2))))
    ds = ray.data.from_arrow(_split_blocks(todo, rows_per_block))
    ds = ds.map_batches(
        GenerateBatch,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if gpus else 0,
        num_cpus=actor_cpus,
        fn_constructor_kwargs=dict(
            generator_config=asdict(config), plan_json=plan_json, torch_threads=torch_threads
        ),
    )
    fs, path = filesystem_for(out)
    log.warning(
        "generating %d images (%d already in %s) with %d %s actor(s), batch size %d; output: %s",
        todo.num_rows, rows_skipped, out, workers, "GPU" if gpus else "CPU", batch_size, out,
    )
    started = time.perf_counter()
    ds.write_parquet(
        path, filesystem=fs, min_rows_per_file=rows_per_file, ray_remote_args={"num_cpus": WRITE_TASK_CPUS}
    )
    seconds = time.perf_counter() - started

    written = outputs.read_outputs(out, columns=["id", "error", "device"])
    new = written.filter(pa.compute.is_in(written.column("id"), todo.column("id")))
    errors = int(pa.compute.sum(pa.compute.is_valid(new.column("error"))).as_py() or 0)
    devices = sorted(set(new.column("device").drop_null().to_pylist())) or ["?"]
    if errors:
        reasons = pa.compute.value_counts(new.column("error").drop_null()).to_pylist()
        for reason in reasons[:5]:
            log.warning("%d row(s) failed: %s", reason["counts"], reason["values"])
    return GenerateSummary(
        out=out,
        rows_in_manifest=manifest.num_rows,
        rows_skipped=rows_skipped,
        rows_written=new.num_rows,
        errors=errors,
        seconds=seconds,
        workers=workers,
        device=",".join(devices),
    )


def cpu_actor_shape(workers: int) -> tuple[float, int]:
    """(CPUs reserved, torch intra-op threads) for each CPU actor.

    An actor reserves its node's CPUs shared among the actors that node gets (workers spread evenly),
    less WRITE_TASK_CPUS for the Parquet writes: an actor pool that holds every CPU deadlocks Ray Data
    (environment notes). Reserving the share, not a fixed 1 CPU, is what keeps two actors meant for two
    nodes from landing on one (Ray Data's SPREAD is best effort, and did colocate them), and threads
    follow the share: more threads than cores oversubscribes a node (on a busy 2-core machine one batch
    took 1.1 s with 1 thread and 6-12 s with 2). INVARDIFF_TORCH_THREADS overrides the thread count.
    """
    import ray

    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0.0)]
    smallest = min(node_cpus) if node_cpus else 1.0
    actors_per_node = math.ceil(workers / max(1, len(node_cpus)))
    actor_cpus = max(0.05, (smallest - WRITE_TASK_CPUS) / actors_per_node)
    override = os.environ.get("INVARDIFF_TORCH_THREADS")
    threads = int(override) if override else int(smallest // actors_per_node)
    return actor_cpus, max(1, threads)


def _with_device(config: GeneratorConfig, device: str) -> GeneratorConfig:
    from dataclasses import replace

    return replace(config, device=device)
