"""The generation job's own capacity: N rows through manifest -> Ray Data actors -> Parquet with the model
replaced by the load-test stand-in (`--model loadtest`, pipelines/loadtest.py), so every second measured is
the job's, none the model's.

    python -m benchmarks.pipeline_capacity --rows 1000000 --out benchmarks/results/pipeline_capacity

Each phase runs the real command line (`python -m jobs.cli ...`) as a child process, sampled every 0.2 s
with psutil: resident memory of the driver, of the generation actor(s) (the Ray workers running
GenerateBatch), of Ray's other workers and of Ray's own services, and the CPU time of the whole process
tree (the counted work, which a shared machine cannot inflate the way it inflates wall clock).

    actor      in this process, no Ray: GenerateBatch.__call__ on manifest batches, CPU time per row split
               into its parts (the floor of what an actor spends on a row)
    full       `generate` of all N rows into an empty --data/full
    rerun      the same command again: resume with 100 % done
    report     `report` on --data/full
    half       `generate` into --data/half, interrupted (SIGINT) once half the rows are in committed files,
               then the same command again: resume with 50 % done; every id must then be there exactly once

Results: --out/results.json and --out/summary.md (the figures and the targets of issue 14).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("actor", "full", "rerun", "report", "half")
SAMPLE_S = 0.2
GIB = 2**30

TARGETS = {  # issue 14
    "rows_per_s": 2000.0,
    "time_to_first_batch_s": 30.0,
    "driver_peak_rss_gib": 1.5,
    "resume_all_done_s": 60.0,
    "report_s": 60.0,
    "report_peak_rss_gib": 2.0,
}


# ----------------------------------------------------------------------------------------------------
# Watching a command's process tree


def role_of(process, root_pid: int) -> str:
    """driver (the command itself), actor (a Ray worker running GenerateBatch), worker (any other Ray worker:
    manifest reads, Parquet writes, idle) or ray (Ray's own services: raylet, GCS, dashboard, log monitor)."""
    if process.pid == root_pid:
        return "driver"
    try:
        title = " ".join(process.cmdline()) or process.name()
    except Exception:  # noqa: BLE001 - the process ended between listing and reading it
        return "ray"
    if "GenerateBatch" in title:
        return "actor"
    if title.startswith("ray::"):
        return "worker"
    return "ray"


@dataclass
class TreeSample:
    peak_rss: dict[str, int] = field(default_factory=dict)  # role -> the largest single process seen
    peak_rss_sum: dict[str, int] = field(default_factory=dict)  # role -> the largest sum over its processes
    peak_total_rss: int = 0
    cpu_s: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (role, last CPU time seen)

    def cpu_by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for role, seconds in self.cpu_s.values():
            totals[role] = totals.get(role, 0.0) + seconds
        return {role: round(seconds, 2) for role, seconds in sorted(totals.items())}


class Watched:
    """A command run as a child process, its tree sampled until it exits."""

    def __init__(self, argv: list[str], log_path: Path, on_sample=None):
        self.argv, self.log_path, self.on_sample = argv, log_path, on_sample
        self.sample = TreeSample()
        self.roles: dict[int, str] = {}

    def run(self, interrupt_when=None) -> dict:
        import psutil

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started_epoch, started = time.time(), time.perf_counter()
        with open(self.log_path, "w") as log:
            process = subprocess.Popen(self.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            root = psutil.Process(process.pid)
            interrupted_at = None
            while process.poll() is None:
                self._take(root)
                if interrupt_when is not None and interrupted_at is None and interrupt_when():
                    process.send_signal(signal.SIGINT)
                    interrupted_at = time.perf_counter() - started
                time.sleep(SAMPLE_S)
            wall = time.perf_counter() - started
        return {
            "argv": self.argv[2:],
            "exit_code": process.returncode,
            "wall_s": round(wall, 2),
            "started_epoch": started_epoch,
            "interrupted_at_s": None if interrupted_at is None else round(interrupted_at, 2),
            "peak_rss_gib": {role: round(v / GIB, 3) for role, v in sorted(self.sample.peak_rss.items())},
            "peak_rss_sum_gib": {role: round(v / GIB, 3) for role, v in sorted(self.sample.peak_rss_sum.items())},
            "peak_total_rss_gib": round(self.sample.peak_total_rss / GIB, 3),
            "cpu_s": self.sample.cpu_by_role(),
            "cpu_s_total": round(sum(self.sample.cpu_by_role().values()), 2),
            "log": str(self.log_path),
            "log_tail": self.log_path.read_text().strip().splitlines()[-4:],
        }

    def _take(self, root) -> None:
        import psutil

        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        sums: dict[str, int] = {}
        for process in processes:
            try:
                if self.roles.get(process.pid) != "actor":
                    # a Ray worker names itself (its process title) only once it runs something, and a worker
                    # may become an actor
                    self.roles[process.pid] = role_of(process, root.pid)
                role = self.roles[process.pid]
                rss = process.memory_info().rss
                times = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            sums[role] = sums.get(role, 0) + rss
            self.sample.peak_rss[role] = max(self.sample.peak_rss.get(role, 0), rss)
            self.sample.cpu_s[process.pid] = (role, times.user + times.system)
        for role, total in sums.items():
            self.sample.peak_rss_sum[role] = max(self.sample.peak_rss_sum.get(role, 0), total)
        self.sample.peak_total_rss = max(self.sample.peak_total_rss, sum(sums.values()))


# ----------------------------------------------------------------------------------------------------
# What a run left


def output_files(data: Path) -> dict:
    import pyarrow.parquet as pq

    files = sorted(p for p in data.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_")))
    rows = [pq.read_metadata(p).num_rows for p in files]
    sizes = [p.stat().st_size for p in files]
    png = pq.read_table(files[0], columns=["png"]).column("png").combine_chunks().field("bytes") if files else None
    return {
        "files": len(files),
        "rows": sum(rows),
        "bytes": sum(sizes),
        "rows_per_file": [min(rows), max(rows)] if rows else None,
        "mib_per_file": [round(min(sizes) / 2**20, 2), round(max(sizes) / 2**20, 2)] if sizes else None,
        "bytes_per_row": round(sum(sizes) / sum(rows), 1) if rows and sum(rows) else None,
        "png_bytes_per_image": round(sum(len(b) for b in png.to_pylist()) / len(png), 1) if png is not None else None,
        "first_names": [p.name for p in files[:2]],
    }


def committed_rows(data: Path) -> int:
    """Rows in the readable (footer written) data files: what an interrupted run keeps."""
    import pyarrow.parquet as pq

    total = 0
    for p in data.glob("*.parquet") if data.exists() else ():
        try:
            total += pq.read_metadata(p).num_rows
        except Exception:  # noqa: BLE001 - a file being written has no footer yet
            pass
    return total


def row_times(data: Path) -> dict:
    """First and last finish time of the rows, and the throughput jobs/throughput.py defines, from the rows."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from jobs.throughput import throughput

    table = ds.dataset(str(data), format="parquet", exclude_invalid_files=True).to_table(
        columns=["finished_at", "latency_s", "batch_size"])
    finished = pc.divide(table.column("finished_at").cast("int64"), 1000.0).to_numpy()
    rates = throughput(finished, table.column("latency_s").to_numpy(), table.column("batch_size").to_numpy())
    return {"first_finish_epoch": float(finished.min()), "last_finish_epoch": float(finished.max()),
            "end_to_end_rows_per_s": round(rates.end_to_end or 0.0, 1),
            "steady_rows_per_s": round(rates.steady_state or 0.0, 1)}


def ids_exactly_once(data: Path, expected: int) -> dict:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    ids = ds.dataset(str(data), format="parquet").to_table(columns=["id"]).column("id")
    distinct = pc.count_distinct(ids).as_py()
    return {"rows": len(ids), "distinct_ids": distinct, "expected": expected,
            "exactly_once": len(ids) == distinct == expected}


# ----------------------------------------------------------------------------------------------------
# Phases


def class_args(rows: int) -> list[str]:
    classes = min(rows, 1000)
    if rows % classes:
        raise SystemExit(f"--rows must be a multiple of 1000 (or at most 1000), got {rows}")
    return ["--classes", f"0-{classes - 1}", "--per-class", str(rows // classes), "--seed", "0"]


def generate_argv(args, data: Path) -> list[str]:
    argv = [sys.executable, "-m", "jobs.cli", "generate", "--model", args.model, *class_args(args.rows),
            "--batch-size", str(args.batch_size), "--out", str(data)]
    return argv + (["--workers", str(args.workers)] if args.workers else [])


def phase_full(args, logs: Path) -> dict:
    data = args.data / "full"
    shutil.rmtree(data, ignore_errors=True)
    first_file: list[float] = []
    started = time.perf_counter()

    def first_file_seen() -> bool:
        if not first_file and data.exists() and any(data.glob("*.parquet")):
            first_file.append(time.perf_counter() - started)
        return False

    result = Watched(generate_argv(args, data), logs / "full.log").run(interrupt_when=first_file_seen)
    result["output"] = output_files(data)
    times = row_times(data)
    result["rows_from_rows"] = times
    result["rows_per_s_wall"] = round(args.rows / result["wall_s"], 1)
    result["rows_per_cpu_s"] = round(args.rows / result["cpu_s_total"], 1)
    # From the command's start (Ray's start, the manifest pass and actor launch included) to the first row
    # finished by an actor, and to the first data file on disk.
    result["time_to_first_batch_s"] = round(times["first_finish_epoch"] - result["started_epoch"], 2)
    result["time_to_first_file_s"] = round(first_file[0], 2) if first_file else None
    return result


def phase_rerun(args, logs: Path) -> dict:
    data = args.data / "full"
    result = Watched(generate_argv(args, data), logs / "rerun.log").run()
    result["output_after"] = {"rows": output_files(data)["rows"]}
    return result


def phase_report(args, logs: Path) -> dict:
    report_dir = args.out / "report"
    argv = [sys.executable, "-m", "jobs.cli", "report", str(args.data / "full"), "--out", str(report_dir)]
    return Watched(argv, logs / "report.log").run()


def phase_half(args, logs: Path) -> dict:
    data = args.data / "half"
    shutil.rmtree(data, ignore_errors=True)
    half = args.rows // 2
    first = Watched(generate_argv(args, data), logs / "half-interrupted.log").run(
        interrupt_when=lambda: committed_rows(data) >= half)
    kept = committed_rows(data)
    resumed = Watched(generate_argv(args, data), logs / "half-resumed.log").run()
    resumed["rows_per_s_wall"] = round((args.rows - kept) / resumed["wall_s"], 1) if resumed["wall_s"] else None
    return {"interrupted": first, "rows_kept": kept, "resumed": resumed, "ids": ids_exactly_once(data, args.rows)}


def _actor_without_ray(actor_class, generator_config: dict):
    """The actor class built as Ray Data builds it, in this process: only the runtime context it asks Ray for
    (its node and actor id) is stood in for."""
    from unittest import mock

    class Context:
        def get_node_id(self):
            return "node"

        def get_actor_id(self):
            return "actor"

    with mock.patch("ray.get_runtime_context", Context):
        return actor_class(generator_config=generator_config)


def phase_actor(args, logs: Path) -> dict:
    """GenerateBatch.__call__ in this process on the load-test model: CPU time per row, and its parts."""
    import cProfile
    import pstats

    import pyarrow as pa

    from jobs.generate import GenerateBatch
    from jobs.manifest_source import ClassRange

    actor = _actor_without_ray(GenerateBatch, {"model": args.model, "device": "cpu"})
    batch = ClassRange(tuple(range(1000)), 4, 0).rows(0, args.batch_size)
    batch = batch.append_column("attempt", pa.array([1] * args.batch_size, pa.int32()))
    for _ in range(10):
        assert actor(batch).column("error").null_count == args.batch_size, "the stand-in's rows failed"
    calls = max(20, 20_000 // args.batch_size)
    cpu = time.process_time()
    for _ in range(calls):
        actor(batch)
    per_row_us = (time.process_time() - cpu) / (calls * args.batch_size) * 1e6
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls // 4):
        actor(batch)
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_tt
    wanted = {("png.py", "encode_pngs"): "PNG encoding", ("outputs.py", "rows_to_table"): "rows_to_table",
              ("loadtest.py", "generate"): "the stand-in model", ("runner.py", "run_batch"): "run_batch (all of it)"}
    parts = {}
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for (suffix, name), label in wanted.items():
            if function == name and filename.endswith(suffix):
                parts[label] = round(parts.get(label, 0.0) + cumulative / total, 3)
    with open(logs / "actor-profile.txt", "w") as f:
        pstats.Stats(profile, stream=f).sort_stats("cumulative").print_stats(25)
    return {"batch_size": args.batch_size, "cpu_us_per_row": round(per_row_us, 1),
            "share_of_call_profiled": parts, "profile": str(logs / "actor-profile.txt")}


# ----------------------------------------------------------------------------------------------------


def verdicts(results: dict) -> dict:
    checks = {}
    full = results.get("full")
    if full:
        checks["rows_per_s"] = (full["rows_from_rows"]["end_to_end_rows_per_s"], ">=")
        checks["time_to_first_batch_s"] = (full["time_to_first_batch_s"], "<=")
        checks["driver_peak_rss_gib"] = (full["peak_rss_gib"].get("driver"), "<=")
    if results.get("rerun"):
        checks["resume_all_done_s"] = (results["rerun"]["wall_s"], "<=")
    if results.get("report"):
        checks["report_s"] = (results["report"]["wall_s"], "<=")
        checks["report_peak_rss_gib"] = (results["report"]["peak_rss_gib"].get("driver"), "<=")
    out = {}
    for name, (value, op) in checks.items():
        target = TARGETS[name]
        met = value is not None and (value >= target if op == ">=" else value <= target)
        out[name] = {"value": value, "target": f"{op} {target:g}", "met": met}
    return out


def summary_markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [f"# Pipeline capacity: {results['rows']:,} rows, `--model {results['model']}`, batch size "
             f"{results['batch_size']}", "",
             f"Machine: {machine['cpus']} CPUs ({machine['cpu']}), load average at start {machine['load_start']}, "
             f"Python {machine['python']}. Wall clock on a shared machine is flagged as such; CPU time is the "
             "summed user+system time of the command's whole process tree.", "",
             "| figure | value | target | met |", "|---|---|---|---|"]
    for name, verdict in results["verdicts"].items():
        lines.append(f"| {name} | {verdict['value']} | {verdict['target']} | {'yes' if verdict['met'] else 'NO'} |")
    full = results.get("full")
    if full:
        out = full["output"]
        lines += ["", "## Full run", "",
                  f"- wall {full['wall_s']} s (flagged: shared machine), {full['rows_per_s_wall']} rows/s over the "
                  f"whole command; {full['rows_from_rows']['end_to_end_rows_per_s']} rows/s end to end and "
                  f"{full['rows_from_rows']['steady_rows_per_s']} steady-state from the rows (jobs/throughput.py)",
                  f"- CPU {full['cpu_s_total']} s over the process tree ({full['rows_per_cpu_s']} rows per CPU-second); "
                  f"by role: {full['cpu_s']}",
                  f"- time to first batch {full['time_to_first_batch_s']} s, first file on disk "
                  f"{full['time_to_first_file_s']} s",
                  f"- peak RSS (GiB, largest process per role): {full['peak_rss_gib']}; summed per role: "
                  f"{full['peak_rss_sum_gib']}; whole tree {full['peak_total_rss_gib']}",
                  f"- output: {out['files']} files, {out['bytes'] / 2**20:.1f} MiB, rows per file {out['rows_per_file']},"
                  f" MiB per file {out['mib_per_file']}, {out['bytes_per_row']} bytes per row, "
                  f"{out['png_bytes_per_image']} PNG bytes per image"]
    for phase, title in (("rerun", "Resume, 100 % done"), ("report", "Report")):
        r = results.get(phase)
        if r:
            lines += ["", f"## {title}: wall {r['wall_s']} s, CPU {r['cpu_s_total']} s, driver peak RSS "
                      f"{r['peak_rss_gib'].get('driver')} GiB, exit {r['exit_code']}"]
    if results.get("half"):
        h = results["half"]
        lines += ["", f"## Resume, 50 % done: interrupted at {h['interrupted']['interrupted_at_s']} s with "
                  f"{h['rows_kept']:,} rows committed (exit {h['interrupted']['exit_code']}); the rerun took "
                  f"{h['resumed']['wall_s']} s ({h['resumed']['rows_per_s_wall']} rows/s wall, CPU "
                  f"{h['resumed']['cpu_s_total']} s, exit {h['resumed']['exit_code']}); ids: {h['ids']}"]
    if results.get("actor"):
        a = results["actor"]
        lines += ["", f"## Actor path, in process: {a['cpu_us_per_row']} CPU µs per row at batch size "
                  f"{a['batch_size']}; profiled shares of GenerateBatch.__call__: {a['share_of_call_profiled']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline_capacity")
    parser.add_argument("--data", type=Path, default=None, help="Where the runs write (default: --out/data).")
    parser.add_argument("--model", default="loadtest", help="loadtest or loadtest:SECONDS_PER_BATCH.")
    parser.add_argument("--batch-size", type=int, default=16, help="As `invardiff generate` (default 16, its own).")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"Comma-separated, of {', '.join(PHASES)}.")
    parser.add_argument("--keep-data", action="store_true", help="Keep --data after the run.")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or args.rows < 1 or not args.model.startswith("loadtest"):
        parser.error(f"bad --phases {unknown}, --rows or --model (a load test runs --model loadtest[:S])")
    class_args(args.rows)
    args.data = args.data or args.out / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)

    from pipelines.runner import cpu_name

    results = {"rows": args.rows, "model": args.model, "batch_size": args.batch_size, "workers": args.workers,
               "command": "python -m benchmarks.pipeline_capacity " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": {"cpus": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version(),
                           "load_start": round(os.getloadavg()[0], 2)},
               "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip()}
    runners = {"actor": phase_actor, "full": phase_full, "rerun": phase_rerun, "report": phase_report,
               "half": phase_half}
    for phase in [p for p in PHASES if p in phases]:
        print(f"[pipeline_capacity] {phase} ...", flush=True)
        started = time.perf_counter()
        results[phase] = runners[phase](args, logs)
        print(f"[pipeline_capacity] {phase} done in {time.perf_counter() - started:.0f} s", flush=True)
        results["verdicts"] = verdicts(results)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    results["verdicts"] = verdicts(results)
    results["machine"]["load_end"] = round(os.getloadavg()[0], 2)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "summary.md").write_text(summary_markdown(results))
    print(summary_markdown(results))
    if not args.keep_data:
        shutil.rmtree(args.data, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
