"""torch.compile on the digits model, eager vs compiled, uncached and under the `balanced` plan (BENCHMARKS.md §9).

    python -m benchmarks.compile_check [--batch 8] [--repeats 3] [--backend inductor] [--out DIR]

Rows, all in one process on the same requests:
* uncached, eager; uncached, `torch.compile(transformer)` (no cache: nothing per-step to guard on);
* balanced plan, eager; balanced plan, `torch.compile(transformer)` (the whole model: the hooks' step decisions
  become guards, so it recompiles each step until dynamo's recompile limit and runs the rest eagerly);
* balanced plan, `invardiff.compile_blocks` (regional: compiled computation, eager decisions).

Each row: one warm-up generation (its process CPU time includes the compiles), then `--repeats` timed ones.
Speed is process CPU time (`time.process_time`, all threads of this process; one intra-op thread so the figure
does not depend on what else the shared machine runs); wall clock is recorded but only flagged. Counted work is
the transformer module evaluations that ran (`invardiff_stats`; uncached: every one). Compiles are dynamo's frame
counter: during the warm-up, and during the timed runs (a static plan: 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

BALANCED = Path(__file__).resolve().parent / "results" / "forecast-plans" / "balanced.json"
ROWS = ("uncached eager", "uncached compiled (whole model)", "balanced eager", "balanced compiled (whole model)",
        "balanced compile_blocks")  # fmt: skip


class _LimitHits(logging.Handler):
    """Dynamo's warning when a frame exceeds the recompile limit: that frame runs eagerly from then on."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "hit config." in record.getMessage():
            self.hits.append(record.getMessage().splitlines()[0])


def frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def run_row(generator, name: str, plan, requests, repeats: int, backend: str) -> dict:
    from invardiff import apply_invardiff, compile_blocks, invardiff_stats, remove_invardiff, reset_invardiff

    transformer = generator.transformer
    torch._dynamo.reset()
    cached = plan is not None and not name.startswith("uncached")
    if cached:
        apply_invardiff(transformer, plan)
    if "whole model" in name:
        generator.transformer = torch.compile(transformer, backend=backend, dynamic=False)
    elif "compile_blocks" in name:
        compile_blocks(transformer, backend=backend)
    limits = _LimitHits()
    logging.getLogger("torch._dynamo").addHandler(limits)
    try:
        start_frames, cpu, wall = frames(), time.process_time(), time.perf_counter()
        final = generator.generate(requests).final
        warmup = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                  "frames_compiled": frames() - start_frames}  # fmt: skip
        if cached:
            reset_invardiff(transformer)
        cpu_s, wall_s, timed_start = [], [], frames()
        for _ in range(repeats):
            cpu, wall = time.process_time(), time.perf_counter()
            generator.generate(requests)
            cpu_s.append(time.process_time() - cpu)
            wall_s.append(time.perf_counter() - wall)
        timed_frames = frames() - timed_start
        stats = invardiff_stats(transformer) if cached else None
    finally:
        logging.getLogger("torch._dynamo").removeHandler(limits)
        generator.transformer = transformer
        if cached:
            remove_invardiff(transformer)
    layers = transformer.config.num_layers
    total = 2 * layers * generator.num_inference_steps  # attention + feed-forward per layer and step
    computed = stats.module_evals_computed / repeats if stats else total
    return {
        "name": name,
        "cpu_s_per_generation": statistics.median(cpu_s),
        "wall_s_per_generation": statistics.median(wall_s),
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "module_evals": computed,
        "counted_speedup": total / computed,
        "warmup": warmup,
        "frames_compiled_timed": timed_frames,
        "recompile_limit_hits": limits.hits,
        "final": final,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per generation (CFG doubles the rows)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (the balanced plan has 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo only)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/compile-check")))
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or args.batch < 1 or args.repeats < 1:
        parser.error(f"unknown rows {unknown}" if unknown else "--batch and --repeats must be at least 1")

    from invardiff.plan import Plan
    from pipelines.base import Request
    from pipelines.build import GeneratorConfig, build_generator

    plan = Plan.load(BALANCED)
    if args.steps != plan.num_steps:
        parser.error(f"--steps {args.steps}: the balanced plan is calibrated for {plan.num_steps} steps")
    torch.set_num_threads(1)
    generator = build_generator(GeneratorConfig(model="digits", num_inference_steps=plan.num_steps,
                                                guidance_scale=plan.signature.guidance_scale))  # fmt: skip
    requests = [Request(f"r{i}", i, class_label=i % 10) for i in range(args.batch)]
    results = []
    for name in rows:
        print(f"[compile-check] {name} ...", flush=True)
        results.append(run_row(generator, name, plan, requests, args.repeats, args.backend))
        print(f"[compile-check]   {results[-1]['cpu_s_per_generation']:.3f} s CPU per generation", flush=True)
    reference = {r["name"]: r for r in results}
    for r in results:
        eager = reference.get("balanced eager" if r["name"].startswith("balanced") else "uncached eager")
        uncached = reference.get("uncached eager")
        r["speedup_vs_eager_same_cache"] = eager["cpu_s_per_generation"] / r["cpu_s_per_generation"] if eager else None
        r["speedup_vs_uncached_eager"] = (
            uncached["cpu_s_per_generation"] / r["cpu_s_per_generation"] if uncached else None
        )
        r["max_abs_diff_vs_eager_same_cache"] = float((r["final"] - eager["final"]).abs().max()) if eager else None
    for r in results:
        del r["final"]
    result = {
        "command": "python -m benchmarks.compile_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 intra-op thread",
        "torch": torch.__version__,
        "backend": args.backend,
        "batch": args.batch,
        "steps": plan.num_steps,
        "plan": plan.plan_id,
        "rows": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "compile_check.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [
        f"`{result['command']}` on {result['machine']}, torch {result['torch']}, backend {result['backend']}, "
        f"batch {result['batch']} (CFG: {2 * result['batch']} rows), {result['steps']} steps, plan {result['plan']}.",
        "",
        "| row | CPU s / generation | vs eager, same cache | vs uncached eager | counted | warm-up CPU s | "
        "frames compiled (warm-up / timed) | recompile limit hit | max abs diff vs eager | wall s ⚠ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['cpu_s_per_generation']:.3f} | {_fmt(r['speedup_vs_eager_same_cache'], '.2f')}x"
            f" | {_fmt(r['speedup_vs_uncached_eager'], '.2f')}x | {r['counted_speedup']:.2f}x"
            f" | {r['warmup']['cpu_s']:.1f}"
            f" | {r['warmup']['frames_compiled']} / {r['frames_compiled_timed']}"
            f" | {'yes' if r['recompile_limit_hits'] else 'no'} | {_fmt(r['max_abs_diff_vs_eager_same_cache'], '.1e')}"
            f" | {r['wall_s_per_generation']:.3f} |"
        )
    lines += ["", "⚠ wall clock on a shared machine: indicative only; CPU time is the figure."]
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
