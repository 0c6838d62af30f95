"""What each part of a forecast plan is worth, on the embedded digits model (issue 10, BENCHMARKS.md section 6).

    python -m benchmarks.forecast_ablation --out bench/ablation            # 20 held-out images, 16 calibration runs
    python -m benchmarks.forecast_ablation --quick --out bench/ablation    # 8 images, 4 calibration runs

Every row is one plan run on the same held-out images (seeds 0.., classes cycled; calibration seeds start at
10_000) and compared with the uncached images of the same seeds from this process:

* copy vs forecast on the same schedule (the DP schedule at 3x, its orders replaced by 0);
* calibrated vs uniform placement of the computed steps (same count, first-order forecast), per budget;
* residual vs modules target (each with its own DP schedule);
* with vs without InvarDiff's module books on the computed steps (paper-mode `copy-balanced` books);
* calibration runs 2 / 4 / 8 / 16: the plan the library picks from the first N runs, and the Jaccard similarity
  of its compute mask to the 16-run one.

Speed is counted (module evaluations, uncached / plan) and process CPU time with one torch thread (uncached /
plan, one run each: on a shared box rank by the counted column).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def eval_requests(generator, count: int):
    from pipelines.base import Request

    return [Request(f"eval-{i}", i, class_label=i % generator.num_classes) for i in range(count)]


def run(generator, requests, plan=None) -> dict:
    from invardiff.policy import InvarDiffPolicy, NoCache

    policy = InvarDiffPolicy(plan) if plan is not None else NoCache()
    policy.attach(generator.transformer)
    try:
        policy.reset(generator.transformer)
        cpu = time.process_time()
        result = generator.generate(requests)
        cpu = time.process_time() - cpu
        stats = policy.stats(generator.transformer)
    finally:
        policy.detach(generator.transformer)
    return {"final": result.final, "images": result.images, "cpu_s": cpu, "evals": stats.module_evals_computed}


def compare(name: str, out: dict, reference: dict, labels, **extra) -> dict:
    from evaluation.digits_classifier import accuracy
    from evaluation.fidelity import psnr, relative_error

    row = {
        "row": name,
        "counted_speedup": reference["evals"] / out["evals"],
        "cpu_speedup": reference["cpu_s"] / out["cpu_s"],
        "psnr_db": float(np.mean(psnr(out["images"], reference["images"]))),
        "rel_err": relative_error(out["final"], reference["final"]),
        "accuracy": accuracy(out["images"], labels),
        **extra,
    }
    print(f"{name:58s} {row['counted_speedup']:.2f}x counted {row['cpu_speedup']:.2f}x cpu "
          f"{row['psnr_db']:.1f} dB rel {row['rel_err']:.4f}", flush=True)  # fmt: skip
    return row


def cache_bytes(generator, requests, plan) -> int:
    """Peak bytes the plan's cache holds during one generation (every context), read after each transformer call."""
    from invardiff import apply_invardiff, invardiff_cache_contents, remove_invardiff, reset_invardiff

    transformer = generator.transformer
    peak = [0]

    def record(_module, _args, _output):
        peak[0] = max(peak[0], sum(c["bytes"] for c in invardiff_cache_contents(transformer).values()))

    apply_invardiff(transformer, plan)
    handle = transformer.register_forward_hook(record)
    try:
        reset_invardiff(transformer)
        generator.generate(requests)
    finally:
        handle.remove()
        remove_invardiff(transformer)
    return peak[0]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None, help="calibration runs (default 16)")
    args = parser.parse_args(argv)
    images = args.images or (8 if args.quick else 20)
    runs = args.runs or (4 if args.quick else 16)
    torch.set_num_threads(1)

    from invardiff.forecast import ForecastSchedule, choose_schedule, computed_steps_for, min_max_gap, pool_errors, uniform_schedule
    from invardiff.plan import Plan
    from pipelines.build import GeneratorConfig, build_generator
    from pipelines.calibration import TauBundle, calibrate, calibration_requests
    from pipelines.forecast_calibration import (
        RECORD_MAX_GAP_FOR_BOUND,
        ForecastTarget,
        calibrate_forecast,
        record_errors,
        sampler_gains,
    )

    started = time.perf_counter()
    generator = build_generator(GeneratorConfig(model="digits", device="cpu"))
    signature = generator.signature()
    steps = signature.num_inference_steps
    requests = eval_requests(generator, images)
    labels = [r.class_label for r in requests]
    reference = run(generator, requests)
    run(generator, requests)  # warm-up for the CPU-time column: the first run pays one-off costs
    reference = {**run(generator, requests), "images": reference["images"], "final": reference["final"]}

    cal = calibration_requests(generator, runs=runs)
    gains = (sampler_gains(generator) ** 2)[:, None]
    # Two runs per chunk, so the first N runs' errors are the first N/2 chunks, pooled.
    parts = {t: record_errors(generator, cal, t, RECORD_MAX_GAP_FOR_BOUND, batch_size=2) for t in ("residual", "modules")}

    def raw_errors(target: str, n: int = runs):
        return pool_errors(parts[target][: max(1, n // 2)])

    def errors(target: str, n: int = runs):
        copy_error, linear_error = raw_errors(target, n)
        return copy_error * gains, linear_error * gains[:, :, None]

    def dp(target: str, computed: int, n: int = runs) -> ForecastSchedule:
        gap = max(3, min_max_gap(steps, computed))
        return choose_schedule(*errors(target, n), computed, max_gap=gap)

    def plan_of(schedule, target, modules=None):
        return Plan.from_forecast(signature, schedule, target=target, modules=modules)

    rows = []
    # budgets: calibrated vs uniform, both targets
    for speedup in (2.0, 2.5, 3.0, 4.0):
        computed = computed_steps_for(steps, speedup)
        for target in ("residual", "modules"):
            schedule = dp(target, computed)
            rows.append(compare(f"{speedup:g}x DP-order {target}", run(generator, requests, plan_of(schedule, target)),
                                reference, labels, group="placement", budget=speedup, target=target))  # fmt: skip
            uniform = uniform_schedule(steps, computed)
            rows.append(compare(f"{speedup:g}x uniform + forecast {target}",
                                run(generator, requests, plan_of(uniform, target)), reference, labels,
                                group="placement", budget=speedup, target=target))  # fmt: skip

    # copy vs forecast on one schedule (3x)
    computed = computed_steps_for(steps, 3.0)
    for target in ("residual", "modules"):
        schedule = dp(target, computed)
        copied = ForecastSchedule(schedule.compute, np.where(schedule.compute, -1, 0))
        rows.append(compare(f"3x DP schedule {target}, copy instead of forecast",
                            run(generator, requests, plan_of(copied, target)), reference, labels,
                            group="copy-vs-forecast", target=target))  # fmt: skip
        copy_dp = choose_schedule(*errors(target), computed, max_gap=3, orders=(0,))
        rows.append(compare(f"3x DP placed for copying {target}, copy",
                            run(generator, requests, plan_of(copy_dp, target)), reference, labels,
                            group="copy-vs-forecast", target=target))  # fmt: skip

    # module books on computed steps
    say = lambda _m: None  # noqa: E731
    paper = calibrate(generator, TauBundle.from_preset("dit", "copy-balanced"), calibration_requests(generator, runs=8))
    for target in ("residual", "modules"):
        schedule = dp(target, computed_steps_for(steps, 2.5))
        rows.append(compare(f"2.5x DP-order {target} + copy-balanced module books",
                            run(generator, requests, plan_of(schedule, target, modules=paper.modules)), reference,
                            labels, group="module-books", target=target))  # fmt: skip

    # calibration runs: what the library picks from the first N runs
    reference_mask = None
    for n in sorted({2, 4, 8, runs} & set(range(1, runs + 1)), reverse=True):
        subset = cal[:n]
        raw = {t: raw_errors(t, n) for t in ("residual", "modules")}  # calibrate_forecast scales them itself
        plan = calibrate_forecast(generator, ForecastTarget(speedup=3.0), subset, errors=raw, held_out=0, progress=say)
        mask = plan.forecast_schedule.compute
        reference_mask = mask if reference_mask is None else reference_mask
        rows.append(compare(f"3x library plan from {n} calibration runs ({plan.forecast['target']})",
                            run(generator, requests, plan), reference, labels, group="calibration-runs", runs=n,
                            target=plan.forecast["target"], jaccard_vs_most_runs=jaccard(mask, reference_mask)))  # fmt: skip

    # memory of the stored pairs, per target, for this batch
    memory = {}
    for target in ("residual", "modules"):
        schedule = dp(target, computed_steps_for(steps, 3.0))
        memory[target] = cache_bytes(generator, requests, plan_of(schedule, target))
    memory["paper copy-balanced"] = cache_bytes(generator, requests, paper)

    result = {
        "memory_bytes": memory,
        "batch": images,
        "command": "python -m benchmarks.forecast_ablation " + " ".join(sys.argv[1:] if argv is None else argv),
        "images": images,
        "calibration_runs": runs,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(result, indent=1))
    (args.out / "ablation.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}`: {result['images']} held-out images, {result['calibration_runs']} calibration runs, "
        f"{result['seconds']:.0f} s.",
        "",
        "| row | counted speedup | CPU-time speedup | PSNR dB | rel err | accuracy | Jaccard |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        jac = f"{r['jaccard_vs_most_runs']:.2f}" if "jaccard_vs_most_runs" in r else ""
        lines.append(f"| {r['row']} | {r['counted_speedup']:.2f}× | {r['cpu_speedup']:.2f}× | {r['psnr_db']:.1f} "
                     f"| {r['rel_err']:.4f} | {100 * r['accuracy']:.0f} % | {jac} |")  # fmt: skip
    lines += ["", f"Cache held at its peak during one generation of {result['batch']} images (CFG doubles the rows):", ""]
    lines += [f"- {name}: {value / 2**20:.2f} MiB" for name, value in result["memory_bytes"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
