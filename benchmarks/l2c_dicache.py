"""L2C and DiCache on the embedded digits model, on the seeds of the InvarDiff rows of BENCHMARKS.md §5.

    python -m benchmarks.l2c_dicache --out DIR [--train] [--routers DIR] [--lams 1e-5,1e-4,1e-3]
                                     [--thresholds 0.05,0.1,0.2] [--images 40] [--batch-size 10]

--train trains one L2C router per lambda (`jobs.train_router.train_router`, the function behind
`invardiff train-router`), timed, and writes router and plan files into --routers; without it the routers there
are loaded and thresholded again. Then uncached, L2C at every lambda and DiCache (per-row streams) at every
threshold, plus DiCache batch-global at the middle threshold, run on seeds 0.. (classes cycled) in rounds of
--batch-size, every method back to back per round in rotated order (the harness of `benchmarks/bench.py`).

Counted work: rows entering each attention/feed-forward module (torch pre-hooks on its first Linear), so a
DiCache tail that runs on 3 of 20 rows counts 3, not a whole call. Speedups are uncached / method: counted rows,
and the median over rounds of the paired process-CPU-time and wall-time ratios. Fidelity: PSNR/SSIM against the
uncached image of the same seed; accuracy: the digit classifier. Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench import BenchConfig, Method, build, requests_for, run_once
from invardiff._hookutils import unwrap
from invardiff.adapters import get_adapter


class RowCounter:
    """Rows that enter every cached module, summed over calls (the `counter` interface `run_once` expects)."""

    def __init__(self) -> None:
        self.rows = 0
        self._handles: list[Any] = []

    def attach(self, transformer) -> "RowCounter":
        transformer = unwrap(transformer)
        for site in get_adapter(transformer).cache_sites(transformer):
            linear = next(m for m in site.module.modules() if isinstance(m, torch.nn.Linear))
            self._handles.append(linear.register_forward_pre_hook(self._count))
        return self

    def _count(self, module, args) -> None:
        self.rows += int(args[0].shape[0])

    def reset(self) -> None:
        self.rows = 0

    def total(self) -> int:
        return self.rows


ROUTERS = Path(__file__).resolve().parent / "results" / "l2c"


def bench_methods(generator, config, say=print) -> list[Method]:
    """The L2C and DiCache rows of `benchmarks/bench.py`.

    L2C: one row per lambda in `config.l2c_lams` whose router, trained for exactly this pipeline, is stored in
    ROUTERS (training takes minutes per lambda, so the harness does not train; the digits model's are committed).
    DiCache: one row per threshold, batch-global as the reference code (one decision per batch), because the
    harness counts evaluations per call and a per-row sub-batch is a fraction of a call; this script measures
    the per-row mode with a row counter."""
    from invardiff.policies.dicache import DiCachePolicy
    from invardiff.policies.l2c import L2CPolicy, L2CRouter

    rows = []
    for lam in config.l2c_lams:
        path = ROUTERS / f"router-lam{lam:g}.json"
        router = L2CRouter.load(path) if path.exists() else None
        if router is None or router.signature.mismatches(generator.signature()):
            say(f"L2C lambda={lam:g}: no router trained for this pipeline in {ROUTERS}; row left out")
            continue
        plan = router.to_plan(generator.transformer, config.l2c_theta)
        rows.append(Method(f"L2C lambda={lam:g} theta={config.l2c_theta:g}", "l2c", L2CPolicy(plan)))
    steps = generator.num_inference_steps
    rows += [
        Method(f"DiCache delta={d:g} (batch-global)", "dicache", DiCachePolicy(d, steps, batch_mode="global"))
        for d in config.dicache_thresholds
    ]
    return rows


def train_routers(lams: list[float], routers: Path, theta: float, say) -> dict[float, dict]:
    from jobs.train_router import train_router
    from pipelines.build import GeneratorConfig

    routers.mkdir(parents=True, exist_ok=True)
    out = {}
    for lam in lams:
        say(f"training the L2C router for lambda={lam:g}")
        trained = train_router(GeneratorConfig(model="digits", device="cpu"), lam, theta=theta,
                               progress=lambda m: say(f"  {m}"))
        trained.router.save(routers / f"router-lam{lam:g}.json")
        trained.plan.save(routers / f"plan-lam{lam:g}.json")
        out[lam] = {k: trained.router.training[k] for k in ("wall_seconds", "cpu_seconds", "iterations", "batch_size")}
    return out


def l2c_plans(generator, lams: list[float], routers: Path, theta: float) -> dict[float, Any]:
    from invardiff.policies.l2c import L2CRouter

    plans = {}
    for lam in lams:
        router = L2CRouter.load(routers / f"router-lam{lam:g}.json")
        mismatches = router.signature.mismatches(generator.signature())
        if mismatches:
            raise SystemExit(f"router for lambda={lam:g} was trained for another pipeline: {mismatches}")
        plans[lam] = (router, router.to_plan(generator.transformer, theta))
    return plans


def dicache_profile(generator, policy, requests) -> list[float]:
    """Share of rows that ran the tail at each step, over one generation of `requests`."""
    from invardiff._hookutils import cache_context

    transformer = generator.transformer
    policy.attach(transformer)
    try:
        policy.reset(transformer)
        with cache_context(transformer, "cond"):
            generator.generate(requests)
        calls = policy.decisions(transformer)["cond"]
    finally:
        policy.detach(transformer)
    return [sum(row) / len(row) for row in calls]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--routers", type=Path, default=ROUTERS)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--lams", default="1e-5,1e-4,1e-3")
    parser.add_argument("--theta", type=float, default=0.1)
    parser.add_argument("--thresholds", default="0.05,0.1,0.2")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args(argv)
    say = lambda m: print(f"[l2c_dicache] {m}", flush=True)  # noqa: E731
    lams = [float(v) for v in args.lams.split(",")]
    thresholds = [float(v) for v in args.thresholds.split(",")]
    started = time.perf_counter()

    config = BenchConfig(images=args.images, batch_size=args.batch_size)
    generator = build(config)  # one torch thread, as in bench.py
    training = train_routers(lams, args.routers, args.theta, say) if args.train else {}

    from invardiff.policies.dicache import DiCachePolicy
    from invardiff.policies.l2c import L2CPolicy
    from invardiff.policy import NoCache

    steps = generator.num_inference_steps
    plans = l2c_plans(generator, lams, args.routers, args.theta)
    methods = [Method("uncached", "uncached", NoCache())]
    methods += [Method(f"L2C lambda={lam:g} theta={args.theta:g}", "l2c", L2CPolicy(plan))
                for lam, (_, plan) in plans.items()]
    methods += [Method(f"DiCache delta={d:g} (per row)", "dicache", DiCachePolicy(d, steps)) for d in thresholds]
    middle = thresholds[len(thresholds) // 2]
    methods.append(Method(f"DiCache delta={middle:g} (batch-global)", "dicache",
                          DiCachePolicy(middle, steps, batch_mode="global")))

    counter = RowCounter().attach(generator.transformer)
    warmup = requests_for(generator, 2, seed=900_000)
    for method in methods:
        run_once(generator, method, warmup, counter)
    requests = requests_for(generator, args.images)
    rounds = [requests[i : i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    runs: dict[str, list] = {m.name: [] for m in methods}
    for r, chunk in enumerate(rounds):
        say(f"round {r + 1}/{len(rounds)}")
        for method in methods[r % len(methods):] + methods[: r % len(methods)]:
            runs[method.name].append(run_once(generator, method, chunk, counter))

    rows = summarise(generator, methods, runs, requests)
    for method, row in zip(methods, rows):
        if method.kind == "l2c":
            lam = next(lam for lam in lams if row["method"].startswith(f"L2C lambda={lam:g} "))
            router, plan = plans[lam]
            row["kept_per_cache_step"] = router.kept_per_cache_step(args.theta)
            row["plan_id"] = plan.plan_id
            row["router_training"] = training.get(lam) or {
                k: router.training.get(k) for k in ("wall_seconds", "cpu_seconds", "iterations", "batch_size")
            }
        elif method.kind == "dicache":
            row["computed_share_per_step"] = [round(x, 3) for x in dicache_profile(generator, method.policy, rounds[0])]
    result = {
        "command": "python -m benchmarks.l2c_dicache " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "table.md").write_text(markdown(rows) + "\n")
    say(f"wrote {args.out / 'table.md'} in {result['seconds']:.0f} s")
    print(markdown(rows))
    return result


def summarise(generator, methods, runs, requests) -> list[dict]:
    from evaluation import digits_classifier, fidelity

    reference = runs["uncached"]
    ref_images = np.concatenate([r.images for r in reference])
    ref_rows = sum(r.counted for r in reference)
    labels = [r.class_label for r in requests]
    rows = []
    for method in methods:
        mine = runs[method.name]
        images = np.concatenate([r.images for r in mine])
        same = method.name == "uncached"
        rows.append(
            dict(
                method=method.name,
                kind=method.kind,
                counted_speedup=ref_rows / sum(r.counted for r in mine),
                cpu_speedup=statistics.median(a.cpu_seconds / b.cpu_seconds for a, b in zip(reference, mine)),
                wall_speedup=statistics.median(a.seconds / b.seconds for a, b in zip(reference, mine)),
                psnr=None if same else float(np.mean(fidelity.psnr(images, ref_images))),
                ssim=None if same else float(np.mean(fidelity.ssim(images, ref_images))),
                accuracy=float(digits_classifier.accuracy(images, labels)),
                policy_evals=sum(r.policy_evals or 0 for r in mine),
            )
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | counted speedup | CPU-time speedup | wall speedup | PSNR dB | SSIM | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = "∞ (reference)" if r["psnr"] is None else f"{r['psnr']:.2f}"
        ssim = "1" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['method']} | {r['counted_speedup']:.2f}× | {r['cpu_speedup']:.2f}× | "
                     f"{r['wall_speedup']:.2f}× | {psnr} | {ssim} | {r['accuracy']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
