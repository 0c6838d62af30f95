"""Distributed calibration: throughput per worker count, refresh wall time, and plan stability vs calibration size.

    .venv/bin/python -m benchmarks.calibration_scaling --out benchmarks/results/calibration_scaling.json

1. Throughput: phase 1 + phase 2 of RUNS runs on 1 and on 2 Ray workers (same chunks, so the same plan),
   runs/s counted over the two phases, actor start-up reported apart.
2. Refresh: `invardiff calibrate --workers 2 --store DIR --refresh` as a user runs it (fresh process, Ray start,
   workers, both phases, drift report, promotion), once to seed the store and once with another --seed.
3. Stability: a reference plan from 32 runs; for k = 1, 2, 4, 8, 16 a plan from the first k of those runs.
   Phase-1 rates of the k-run plans are subsets of the reference's per-run phase-1 rates (phase 1 does not
   depend on the plan); phase 2 is run for every plan, since it depends on that plan's provisional books.
   Jaccard of reuse masks (step gate and each family) against the reference, and the ideal speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def throughput(config, bundle, workers: int, runs: int, batch: int, threads: int | None) -> dict:
    from jobs.calibrate import CalibrationJob

    with CalibrationJob(config, workers=workers, runs=runs, batch_size=batch, torch_threads=threads) as job:
        plan = job.calibrate(bundle)
    s = job.stats
    return {
        "workers": workers, "torch_threads": job._threads, "runs": runs, "batch": batch, "startup_s": round(s.seconds["startup"], 2),
        "phase1_s": round(s.seconds["phase1"], 2), "phase2_s": round(s.seconds["phase2"], 2),
        "runs_per_s": round(s.runs_per_second(), 3), "plan_checksum_without_time": _content_hash(plan),
    }


def _content_hash(plan) -> str:
    import hashlib

    doc = plan.to_dict()
    for name in ("created_at", "plan_id", "checksum"):
        doc.pop(name)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def refresh_wall_time(model: str, steps: int | None, workers: int, runs: int) -> dict:
    store = tempfile.mkdtemp(prefix="invardiff-store-")
    base = [sys.executable, "-m", "jobs.cli", "calibrate", "--model", model, "--workers", str(workers),
            "--store", store, "--runs", str(runs), "--refresh"] + (["--steps", str(steps)] if steps else [])
    result = {}
    for name, extra in (("seed", ["--seed", "10000"]), ("refresh", ["--seed", "20000"])):
        started = time.perf_counter()
        done = subprocess.run(base + extra, capture_output=True, text=True)
        result[f"{name}_wall_s"] = round(time.perf_counter() - started, 1)
        result[f"{name}_exit"] = done.returncode
        result[f"{name}_tail"] = done.stdout.strip().splitlines()[-4:]
        log(f"{name}: exit {done.returncode} in {result[f'{name}_wall_s']}s: {done.stdout.strip().splitlines()[-1:]}")
        if done.returncode not in (0, 3):
            log(done.stderr[-2000:])
    result["store"] = store
    return result


def stability(config, bundle, workers: int, reference_runs: int, ks: list[int], batch: int, subsets: int,
              threads: int | None) -> dict:
    import ray

    from invardiff.calibration import ideal_speedup
    from jobs.calibrate import CalibrationJob, start_workers
    from jobs.drift import family_jaccard
    from pipelines.calibration import build_plan, mean_of, provisional_plan

    actors = start_workers(config, workers, torch_threads=threads)
    try:
        with CalibrationJob(config, workers=workers, runs=reference_runs, batch_size=batch, actors=actors) as ref_job:
            phase1 = ref_job.record_phase(1)
            reference = ref_job.calibrate(bundle, phase1=phase1)
        ref_speedup = ideal_speedup(reference.step_gate, reference.modules)
        log(f"reference: {reference_runs} runs, ideal speedup {ref_speedup:.3f}")
        rows = []
        for k in ks:
            # Disjoint subsets of the reference runs (runs s*k .. s*k+k-1), so each k gets a spread, not one draw.
            for s in range(min(subsets, reference_runs // k)):
                sub = {name: values[s * k : (s + 1) * k] for name, values in phase1.items()}
                job = CalibrationJob(config, workers=workers, runs=reference_runs, batch_size=min(batch, k), actors=actors)
                with job:
                    job.requests = job.requests[s * k : (s + 1) * k]
                    rho1 = mean_of(sub)
                    p2 = job.record_phase(2, provisional=provisional_plan(rho1, bundle))
                    plan = build_plan(job.signature, rho1, mean_of(p2), bundle, job.requests)
                jac = family_jaccard(reference.step_gate, reference.modules, plan.step_gate, plan.modules)
                row = {"k": k, "subset": s, "jaccard": {n: round(v, 3) for n, v in jac.items()},
                       "min_jaccard": round(min(jac.values()), 3), "gated_steps": int(plan.step_gate.sum()),
                       "ideal_speedup": round(ideal_speedup(plan.step_gate, plan.modules), 3)}
                log(f"k={k}: {row}")
                rows.append(row)
        return {"reference_runs": reference_runs, "reference_gated_steps": int(reference.step_gate.sum()),
                "reference_ideal_speedup": round(ref_speedup, 3), "rows": rows}
    finally:
        for actor in actors:
            ray.kill(actor)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the model's, DiT 50).")
    parser.add_argument("--runs", type=int, default=16, help="Runs for the throughput and refresh measurements.")
    parser.add_argument("--reference-runs", type=int, default=32)
    parser.add_argument("--ks", default="1,2,4,8,16")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--out", default=None, help="JSON results file.")
    parser.add_argument("--subsets", type=int, default=4, help="Disjoint run subsets per k (at most 32/k).")
    parser.add_argument("--torch-threads", type=int, default=None, help="Torch threads per worker (default CPUs/workers).")
    parser.add_argument("--skip", default="", help="Comma list of parts to skip: throughput,refresh,stability.")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    import torch

    from jobs.ray_runtime import ensure_ray
    from pipelines.build import GeneratorConfig
    from pipelines.calibration import TauBundle

    started = time.perf_counter()
    config = GeneratorConfig(model=args.model, num_inference_steps=args.steps, device="cpu")
    results = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.calibration_scaling", *(argv or sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}",
        "model": args.model, "steps": args.steps or 50, "preset": args.preset,
    }
    if "refresh" not in skip:  # first: it starts its own Ray in a subprocess
        results["refresh"] = refresh_wall_time(args.model, args.steps, 2, args.runs)
    ensure_ray(num_cpus=os.cpu_count())
    bundle = TauBundle.from_preset("dit", args.preset)
    if "throughput" not in skip:
        results["throughput"] = [throughput(config, bundle, w, args.runs, max(1, args.runs // 2), args.torch_threads)
                                 for w in (1, 2)]
        for row in results["throughput"]:
            log(f"throughput: {row}")
    if "stability" not in skip:
        ks = [int(k) for k in args.ks.split(",")]
        results["stability"] = stability(config, bundle, 2, args.reference_runs, ks, batch=8, subsets=args.subsets,
                                         threads=args.torch_threads)
    results["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
