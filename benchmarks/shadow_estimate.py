"""How well shadow samples estimate a run's fidelity, and what 1 % shadowing costs (BENCHMARKS.md section 8).

    .venv/bin/python -m benchmarks.shadow_estimate --plan benchmarks/results/forecast-plans/balanced.json \
        --rows 2000 --budget-s 600 --out benchmarks/results/shadow-estimate.json

In one process, no Ray: the embedded digits model generates N rows (classes cycled, seed = row index) under the
plan and again uncached, in batches of --batch-size, one torch thread, and keeps every row's PSNR (pipelines.shadow.fidelity, the
metric the job writes). Rows stop at --rows, or when --budget-s of process CPU time or --wall-budget-s of wall time
is spent; N is what got done.

Then, against the true mean PSNR over all N rows:
  * the job's own estimate: the rows `pipelines.shadow.is_shadow` picks at 1 % and 5 %, with their 95 % interval;
  * coverage: --draws random subsets of 1 % and 5 % of the N rows (other seeds would pick other rows), the share
    whose 95 % Student-t interval holds the true mean, and the mean interval half-width;
  * cost: process CPU seconds per image of a cached batch of --batch-size, and of an uncached batch of one row
    (what a 1 % shadow usually is: one row of a batch), so shadowing a fraction f costs f x (uncached one-row
    seconds) / (cached seconds per image) of the cached run's compute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np


def generate_pairs(plan_path: str, rows: int, batch_size: int, budget_s: float, wall_budget_s: float, say=print):
    import torch

    from invardiff.plan import Plan
    from invardiff.policies import policy_from_json
    from invardiff.policy import NoCache
    from pipelines.base import Request
    from pipelines.build import GeneratorConfig, build_generator
    from pipelines.shadow import fidelity

    torch.manual_seed(0)
    # One thread: on a shared, oversubscribed machine more threads spin-wait and inflate CPU time, not speed.
    torch.set_num_threads(1)
    generator = build_generator(GeneratorConfig(model="digits", device="cpu"))
    plan = Plan.load(plan_path)
    cached_policy = policy_from_json(plan.to_json(), num_steps=generator.num_inference_steps)
    plan.check_compatible(generator.signature())
    uncached_policy = NoCache()

    def run(policy, requests):
        policy.attach(generator.transformer)
        policy.reset(generator.transformer)
        try:
            started = time.process_time()
            result = generator.generate(requests)
            return result, time.process_time() - started
        finally:
            policy.detach(generator.transformer)

    psnrs, ids, seeds = [], [], []
    cached_cpu = uncached_cpu = 0.0
    spent, wall = time.process_time(), time.perf_counter()
    for start in range(0, rows, batch_size):
        requests = [Request(f"row-{i}", i, class_label=i % 10) for i in range(start, min(rows, start + batch_size))]
        cached, seconds = run(cached_policy, requests)
        cached_cpu += seconds
        uncached, seconds = run(uncached_policy, requests)
        uncached_cpu += seconds
        rows_fidelity = fidelity(cached.images, uncached.images, cached.final, uncached.final)
        psnrs += [r.psnr for r in rows_fidelity]
        ids += [r.id for r in requests]
        seeds += [r.seed for r in requests]
        if (start // batch_size) % 5 == 0:
            say(f"{len(psnrs)} rows, {time.process_time() - spent:.0f} s CPU")
        if time.process_time() - spent > budget_s or time.perf_counter() - wall > wall_budget_s:
            break
    # A shadow of a batch is usually one row at 1 %: its cost is an uncached batch of one.
    single = []
    for i in range(8):
        _, seconds = run(uncached_policy, [Request(f"single-{i}", 10_000 + i, class_label=i % 10)])
        single.append(seconds)
    return dict(
        psnr=psnrs, ids=ids, seeds=seeds,
        cached_cpu_s_per_image=cached_cpu / len(psnrs), uncached_cpu_s_per_image=uncached_cpu / len(psnrs),
        uncached_single_row_cpu_s=float(np.median(single)), plan_id=plan.plan_id,
    )


def estimate(psnr: np.ndarray, ids: list[str], seeds: list[int], fractions, draws: int, rng_seed: int = 0) -> dict:
    from pipelines.shadow import IDENTICAL_PSNR_DB, is_shadow, mean_interval

    psnr = np.minimum(psnr, IDENTICAL_PSNR_DB)
    true_mean = float(psnr.mean())
    rng = np.random.default_rng(rng_seed)
    out = {"true_mean_psnr": true_mean, "rows": len(psnr), "fractions": {}}
    for fraction in fractions:
        picked = np.array([is_shadow(i, s, fraction) for i, s in zip(ids, seeds)])
        job = mean_interval(psnr[picked])
        k = max(2, round(fraction * len(psnr)))
        covered, widths = 0, []
        for _ in range(draws):
            interval = mean_interval(psnr[rng.choice(len(psnr), size=k, replace=False)])
            covered += interval.low <= true_mean <= interval.high
            widths.append(interval.half_width)
        out["fractions"][str(fraction)] = {
            "job_shadows": int(picked.sum()),
            "job_mean": job.mean if job else None,
            "job_interval": [job.low, job.high] if job else None,
            "job_interval_holds_true_mean": bool(job and job.low <= true_mean <= job.high),
            "subset_size": k,
            "draws": draws,
            "coverage_95": covered / draws,
            "mean_half_width_db": float(np.mean(widths)),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="benchmarks/results/forecast-plans/balanced.json")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=600.0, help="process CPU seconds for generation")
    parser.add_argument("--wall-budget-s", type=float, default=math.inf, help="wall seconds for generation")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/shadow-estimate.json")
    args = parser.parse_args(argv)

    from pipelines.runner import cpu_name

    pairs = generate_pairs(args.plan, args.rows, args.batch_size, args.budget_s, args.wall_budget_s,
                           say=lambda m: print(f"[shadow] {m}", flush=True))
    result = estimate(np.asarray(pairs["psnr"]), pairs["ids"], pairs["seeds"], (0.01, 0.05), args.draws)
    cached, single = pairs["cached_cpu_s_per_image"], pairs["uncached_single_row_cpu_s"]
    result.update(
        plan=args.plan, plan_id=pairs["plan_id"], batch_size=args.batch_size, machine=f"{cpu_name()}, {os.cpu_count()} cores", cached_cpu_s_per_image=cached, uncached_cpu_s_per_image=pairs["uncached_cpu_s_per_image"],
        uncached_single_row_cpu_s=single,
        shadow_cost={str(f): f * single / cached for f in (0.01, 0.05)},
        per_row_psnr=[round(float(p), 4) for p in pairs["psnr"]],
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_row_psnr"}, indent=1))


if __name__ == "__main__":
    main()
