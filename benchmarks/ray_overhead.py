"""What Ray costs: the generation job against a plain in-process loop over the same pipeline and rows,
and the job's images/s with 1 and 2 actors on one node and on two local nodes.

    python -m benchmarks.ray_overhead --images 160 --batch-size 16 [--steps 50] [--out DIR]

The phases run one after another on the same manifest (embedded digits model, uncached, CPU), all in
this process except the 2-node jobs:
  loop       build the generator once, run_batch over the rows (generation + PNG encoding, as the
             actors do), write one Parquet file. Run first and last; the two are averaged, so a
             machine that gets busier during the run shows up as loop-to-loop spread.
  job 1n/Na  run_generate (the `invardiff generate` job) on an embedded 1-node Ray, N actors.
  job 2n/Na  the same job on a local head + 2 worker nodes (cluster/local-multinode.sh, 1 CPU each),
             this script submitted through the Jobs API so that its driver runs on the head, as
             `invardiff submit generate` does.
For each job, the output rows give its phases: startup (submission to the first batch's start: actor
launch, torch/diffusers import, model load), steady (first batch start to last batch end) and tail
(last batch end to the write's return: last Parquet write and job teardown). Ray's own start
(`ray.init`, cluster start) is outside every timed phase and reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Phase:
    name: str
    images: int
    wall_s: float  # what a user waits for, without Ray's own start
    startup_s: float | None = None
    steady_s: float | None = None
    tail_s: float | None = None
    busy_s: float | None = None  # summed generation time of all batches (all actors)
    load_average: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def steady_images_per_s(self) -> float | None:
        return self.images / self.steady_s if self.steady_s else None


def manifest(images: int, seed: int = 0):
    from jobs.manifest import class_manifest

    per_class = max(1, images // 10)
    return class_manifest(list(range(10)), per_class, seed)


def plain_loop(config, table, batch_size: int, out: Path) -> Phase:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from invardiff.policy import NoCache
    from pipelines.base import Request
    from pipelines.build import build_generator
    from pipelines.runner import run_batch

    import torch

    torch.set_num_threads(int(os.environ["INVARDIFF_TORCH_THREADS"]))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    generator = build_generator(config)
    policy = NoCache()
    policy.attach(generator.transformer)
    built = time.perf_counter()
    rows, busy = [], 0.0
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size).to_pylist()
        requests = [Request(id=r["id"], seed=int(r["seed"]), class_label=r["class_label"]) for r in chunk]
        run = run_batch(generator, requests, policy)
        busy += sum(row["latency_s"] for row in run.rows)
        rows.extend(run.rows)
    generated = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "loop.parquet")
    finished = time.perf_counter()
    return Phase(
        "loop", len(rows), wall_s=finished - started, startup_s=built - started, steady_s=generated - built,
        tail_s=finished - generated, busy_s=busy, load_average=load,
    )


def ray_job(name: str, config, table, batch_size: int, workers: int, out: Path, address: str | None) -> Phase:
    from jobs.generate import run_generate
    from jobs.manifest import ManifestSchema
    from jobs.outputs import read_outputs

    load = os.getloadavg()[0]
    submitted = time.time()
    summary = run_generate(
        table, str(out), config, schema=ManifestSchema("class_label", num_classes=10), batch_size=batch_size,
        workers=workers, address=address,
    )
    ended = time.time()
    if not summary.complete or summary.rows_attempted != table.num_rows:
        raise RuntimeError(f"{name}: {summary}")
    rows = read_outputs(str(out), columns=["latency_s", "batch_size", "finished_at", "node_id"]).to_pandas()
    finished = rows["finished_at"].astype("int64") / 1e3  # ms -> s
    started = finished - rows["latency_s"] * rows["batch_size"]
    nodes = rows["node_id"].nunique()
    print(f"  {name}: rows from {nodes} node(s)", file=sys.stderr)
    return Phase(
        name, len(rows), wall_s=ended - submitted, startup_s=float(started.min() - submitted),
        steady_s=float(finished.max() - started.min()), tail_s=float(ended - finished.max()),
        busy_s=float(rows["latency_s"].sum()), load_average=load,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """cluster/local-multinode.sh: head (0 CPU) + 2 worker nodes of 1 CPU, on free ports."""

    def __init__(self):
        self.state = Path(tempfile.mkdtemp(prefix="iro-", dir="/tmp"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "3"  # nothing to drain after the jobs
        self.script = ["bash", str(REPO / "cluster" / "local-multinode.sh")]

    def __enter__(self) -> str:
        started = time.perf_counter()
        subprocess.run(
            [*self.script, "start", "--workers", "2", "--cpus-per-worker", "1", "--port", str(self.port),
             "--dashboard-port", str(self.dashboard_port), "--state-dir", str(self.state)],
            env=self.env, check=True, capture_output=True, timeout=300,
        )
        self.start_seconds = time.perf_counter() - started
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __exit__(self, *exc):
        subprocess.run([*self.script, "stop", "--state-dir", str(self.state)], env=self.env, capture_output=True,
                       timeout=180)
        shutil.rmtree(self.state, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 50)")
    parser.add_argument("--out", type=Path, default=None, help="keep outputs and results.json here")
    parser.add_argument("--skip-multinode", action="store_true")
    parser.add_argument("--skip-single-node", action="store_true")
    parser.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="intra-op threads of the loop and of every actor (the same for all, so that only Ray differs)",
    )
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["INVARDIFF_TORCH_THREADS"] = str(args.torch_threads)  # read by run_generate on the driver
    import ray

    from jobs.ray_runtime import ensure_ray
    from pipelines.build import GeneratorConfig

    work = args.out or Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    config = GeneratorConfig(model="digits", num_inference_steps=args.steps, device="cpu")
    table = manifest(args.images)
    phases: list[Phase] = []
    extra: dict[str, float] = {}

    def record(phase: Phase) -> None:
        phases.append(phase)
        print(f"  {phase.name}: {phase.images_per_s:.2f} images/s ({phase.wall_s:.1f} s)", file=sys.stderr)

    if args.in_job:
        run_in_job(config, table, args, work)
        return
    # Imports (torch, diffusers: ~10 s) once, untimed, so that both loops measure the same warm work:
    # model build + generation + PNG + Parquet. The jobs' actors pay their imports in "startup".
    from pipelines.build import build_generator

    build_generator(config)
    record(plain_loop(config, table, args.batch_size, work / "loop-a"))

    if not args.skip_single_node:
        started = time.perf_counter()
        ensure_ray(None)
        extra["ray_init_s"] = time.perf_counter() - started
        for workers in (1, 2):
            record(ray_job(f"job 1 node, {workers} actor(s)", config, table, args.batch_size, workers,
                           work / f"job-1n-{workers}a", None))
        ray.shutdown()

    if not args.skip_multinode:
        for phase in multinode_phases(args, work, extra):
            record(phase)

    record(plain_loop(config, table, args.batch_size, work / "loop-b"))
    report(phases, extra, args, work)


def multinode_phases(args, work: Path, extra: dict) -> list[Phase]:
    """The jobs on head + 2 worker nodes, driven the way users drive them: this script submitted
    through the Jobs API, its driver on the head. (A driver attached from outside with
    ray.init(address=...) picks one of the three raylets that share this machine's IP, and in two of
    three tries its first ray.put failed with OwnerDiedError.)"""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from jobs.submit import DEFAULT_EXCLUDES

    command = [
        "python", "-m", "benchmarks.ray_overhead", "--in-job", "--images", str(args.images), "--batch-size",
        str(args.batch_size), "--torch-threads", str(args.torch_threads), "--out", str(work),
        *(["--steps", str(args.steps)] if args.steps else []),
    ]
    cluster = LocalCluster()
    with cluster as dashboard:
        extra["cluster_start_s"] = cluster.start_seconds
        client = JobSubmissionClient(dashboard)
        job = client.submit_job(
            entrypoint=" ".join(command),
            runtime_env={
                "working_dir": str(REPO), "excludes": list(DEFAULT_EXCLUDES),
                "env_vars": {"INVARDIFF_TORCH_THREADS": str(args.torch_threads), "HF_HUB_OFFLINE": "1"},
            },
        )
        while not (status := client.get_job_status(job)).is_terminal():
            time.sleep(1)
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"2-node job {status}:\n{client.get_job_logs(job)[-5000:]}")
        print(client.get_job_logs(job).count("rows from 2 node(s)"), "run(s) used both nodes", file=sys.stderr)
    result = json.loads((work / "multinode.json").read_text())
    extra.update(result["extra"])
    return [Phase(**phase) for phase in result["phases"]]


def run_in_job(config, table, args, work: Path) -> None:
    from jobs.ray_runtime import ensure_ray

    extra = {}
    started = time.perf_counter()
    ensure_ray(None)  # RAY_ADDRESS of the job
    extra["ray_connect_s"] = time.perf_counter() - started
    phases = []
    for workers in (1, 2):
        phase = ray_job(f"job 2 nodes, {workers} actor(s)", config, table, args.batch_size, workers,
                        work / f"job-2n-{workers}a", None)
        phases.append(asdict(phase))
    (work / "multinode.json").write_text(json.dumps({"phases": phases, "extra": extra}))


def report(phases: list[Phase], extra: dict, args, work: Path) -> None:
    loops = [p for p in phases if p.name == "loop"]
    loop_wall = sum(p.wall_s for p in loops) / len(loops)
    loop_steady = sum(p.steady_s for p in loops) / len(loops)
    loop_rate = loops[0].images / loop_wall
    print()
    print(f"digits model, {args.images} images, batch {args.batch_size}, steps {args.steps or 'default (50)'}, "
          f"{args.torch_threads} torch thread(s) per actor and in the loop; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"loop runs: {loops[0].wall_s:.1f} s and {loops[-1].wall_s:.1f} s (first and last)")
    print()
    print("| run | images/s (wall) | vs loop | overhead / image | startup | steady images/s | tail | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for p in phases:
        if p.name == "loop":
            continue
        overhead = (p.wall_s - loop_wall) / p.images
        print(f"| {p.name} | {p.images_per_s:.2f} | {p.images_per_s / loop_rate:.2f}x | {overhead * 1000:.0f} ms "
              f"| {p.startup_s:.1f} s | {p.steady_images_per_s:.2f} | {p.tail_s:.1f} s | {p.load_average:.1f} |")
    print(f"| plain loop (mean of 2) | {loop_rate:.2f} | 1.00x | - | {sum(p.startup_s for p in loops) / 2:.1f} s "
          f"(model build) | {loops[0].images / loop_steady:.2f} | - | "
          f"{sum(p.load_average for p in loops) / 2:.1f} |")
    print()
    print("Not in any row: " + ", ".join(f"{k} {v:.1f} s" for k, v in extra.items() if v))
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "extra": extra,
         "phases": [asdict(p) | {"images_per_s": p.images_per_s} for p in phases]}, indent=2))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
