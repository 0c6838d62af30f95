"""InvarDiff presets on the embedded digits model: speed, fidelity and accuracy against uncached, in one process.

Forecast presets (quality/balanced/fast/turbo) are calibrated with `pipelines.forecast_calibration` on
--forecast-runs calibration runs (candidate errors recorded once and shared); paper-mode presets (paper-*, copy-*)
with the two-phase calibration.

    python -m benchmarks.presets --out bench/presets            # full: 80 images (8 per class), 3 timed rounds
    python -m benchmarks.presets --quick --out bench/presets    # smoke: 20 images, 8 calibration runs, 2 rounds
    python -m benchmarks.presets --sweep --out bench/sweep      # tau sweep (quality axis only, no timing)

Benchmark mode calibrates every DiT preset with the library (`pipelines.calibration.calibrate`, phase 1 shared),
then times the denoising loop of the same batch uncached and cached. Each round runs the uncached batch once and
then every preset once (order rotated per round); a warm-up round is discarded. Speedup = median uncached time /
median cached time. Fidelity (PSNR, SSIM, relative error of the final sampler output) is against the uncached
images of the same seeds from this process; accuracy is the digit classifier's on both.

Sweep mode explores tau bundles without paying one phase-2 pass per bundle: it records every stream's full
trajectory of the calibration runs once, keeps the pairwise L1 distances between steps, and replays the recorder's
phase-2 bookkeeping on them for any provisional plan (the rates depend on the features only through those
distances). It checks the replay against the library's calibration on one bundle before sweeping.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

DIT_PRESETS = ("quality", "balanced", "fast", "turbo", "copy-fast", "paper-dit-fast")


# ----------------------------------------------------------------------------------------------------------------
# Running the sampler


def eval_requests(per_class: int, seed: int = 0):
    from pipelines.base import Request

    # Calibration seeds start at 10_000, so evaluation never reuses a calibration input.
    return [Request(f"c{c}-{i}", seed + c * per_class + i, class_label=c) for c in range(10) for i in range(per_class)]


def run(generator, requests, policy=None) -> dict[str, Any]:
    """One batch, uncached (policy None: plain model, no hooks at all) or with `policy` attached for this run."""
    transformer = generator.transformer
    if policy is not None:
        policy.attach(transformer)
        policy.reset(transformer)
    try:
        cpu_started = time.process_time()
        result = generator.generate(requests)
        cpu_seconds = time.process_time() - cpu_started
        stats = policy.stats(transformer) if policy is not None else None
    finally:
        if policy is not None:
            policy.detach(transformer)
    return {"final": result.final.detach().clone(), "images": result.images, "seconds": result.denoise_seconds,
            "cpu_seconds": cpu_seconds, "stats": stats, "labels": [r.class_label for r in requests]}  # fmt: skip


def full_evals(generator) -> int:
    from invardiff.adapters import get_adapter

    layers = get_adapter(generator.transformer).layers(generator.transformer)
    return generator.num_inference_steps * sum(layers.values())


def fidelity(reference: dict, cached: dict, labels: Sequence[int]) -> dict[str, float]:
    from evaluation.digits_classifier import accuracy
    from evaluation.fidelity import psnr, relative_error, ssim

    p = psnr(cached["images"], reference["images"])
    return {
        "psnr_db": float(np.mean(p)),
        "psnr_min_db": float(np.min(p)),
        "ssim": float(np.mean(ssim(cached["images"], reference["images"]))),
        "rel_err": relative_error(cached["final"], reference["final"]),
        "accuracy": accuracy(cached["images"], labels),
    }


# ----------------------------------------------------------------------------------------------------------------
# Benchmark


def benchmark(args) -> dict[str, Any]:
    from invardiff.plan import Plan
    from invardiff.policy import InvarDiffPolicy
    from pipelines.build import GeneratorConfig, build_generator
    from benchmarks.forecast_presets import calibrate_forecast_preset, measure_forecast_evidence
    from invardiff.presets import FORECAST_PRESETS, is_forecast_preset
    from pipelines.calibration import TauBundle, calibrate, calibration_requests, mean_of, record_rates

    generator = build_generator(GeneratorConfig(model="digits", device="cpu"))
    requests = eval_requests(args.per_class)
    cal_requests = calibration_requests(generator, runs=args.runs)
    plan_dir = args.out / "plans"
    plan_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    plans, phase1, evidence = {}, None, None
    for name in args.presets:
        path = plan_dir / f"{name}.json"
        if is_forecast_preset(name):
            if args.reuse_plans and path.exists():
                plan = Plan.load(path)
                if plan.mode == "forecast" and plan.calibration["goal"]["target_speedup"] == FORECAST_PRESETS[name]:
                    plans[name] = plan
                    continue
            if evidence is None:
                evidence = measure_forecast_evidence(generator, args.forecast_runs)
            plans[name] = calibrate_forecast_preset(generator, name, evidence)
            plans[name].save(path)
            continue
        bundle = TauBundle.from_preset("dit", name)
        if args.reuse_plans and path.exists():
            plan = Plan.load(path)
            # A stale file (preset retuned since) must not be timed under the new name.
            if plan.taus == bundle.taus and plan.nonskip_rate == bundle.nonskip_rate and plan.calibration["runs"] == args.runs:
                plans[name] = plan
                continue
        if args.distances:
            # Bitwise the same plan as the library's two-phase calibration (checked by --sweep --check-replay),
            # without one phase-2 pass per preset: on a loaded 2-core box those passes dominate the run time.
            if phase1 is None:
                distances = dict(np.load(args.distances))
                phase1 = mean_of(replay_rates(distances))
            plans[name] = replay_plan(generator, distances, phase1, bundle, cal_requests)
        else:
            if phase1 is None:
                phase1 = record_rates(generator, cal_requests)
            plans[name] = calibrate(generator, bundle, cal_requests, phase1=phase1)
        plans[name].save(path)
    calibration_s = time.perf_counter() - started
    print(f"calibrated {len(plans)} plans in {calibration_s:.0f}s", flush=True)

    uncached_times: list[float] = []
    cached_times: dict[str, list[float]] = {name: [] for name in plans}
    # Process CPU time next to wall time: on a box shared with other jobs it measures the work done, not the
    # share of the cores this process happened to get (exact with one torch thread, which never spin-waits).
    uncached_cpu: list[float] = []
    cached_cpu: dict[str, list[float]] = {name: [] for name in plans}
    reference = run(generator, requests)  # warm-up, discarded from the timings; also the fidelity reference
    print(f"warm-up: uncached {reference['seconds']:.1f}s", flush=True)
    outputs: dict[str, dict] = {}
    result = None
    for round_index in range(args.rounds):
        shift = round_index % len(plans)
        order = list(plans)[shift:] + list(plans)[:shift]  # rotated so no preset always follows the uncached run
        out = run(generator, requests)
        if not torch.equal(out["final"], reference["final"]):
            raise RuntimeError("uncached sampling is not deterministic in this process; fidelity would be meaningless")
        uncached_times.append(out["seconds"])
        uncached_cpu.append(out["cpu_seconds"])
        for name in order:
            out = run(generator, requests, InvarDiffPolicy(plans[name]))
            outputs.setdefault(name, out)
            cached_times[name].append(out["seconds"])
            cached_cpu[name].append(out["cpu_seconds"])
        print(f"round {round_index + 1}: uncached {uncached_times[-1]:.1f}s "
              + " ".join(f"{n} {cached_times[n][-1]:.1f}s" for n in order), flush=True)  # fmt: skip
        result = summarize(args, generator, plans, reference, outputs, uncached_times, cached_times, calibration_s)
        for row in result["presets"]:
            row["cpu_speedup"] = statistics.median(uncached_cpu) / statistics.median(cached_cpu[row["preset"]])
            row["cpu_efficiency"] = row["cpu_speedup"] / row["ideal_speedup"]
        result["uncached_cpu_s"] = uncached_cpu
        write_benchmark(args.out, result)  # after every round, so a run stopped early still leaves its numbers
    return result


def summarize(args, generator, plans, reference, outputs, uncached_times, cached_times, calibration_s):
    from invardiff.calibration import bits, longest_run
    from invardiff.presets import get_preset

    labels = [int(c) for c in reference["labels"]]
    reference_quality = fidelity(reference, reference, labels)
    full = full_evals(generator)
    rows = []
    for name, plan in plans.items():
        stats = outputs[name]["stats"]
        ideal = full / stats.module_evals_computed
        speedup = statistics.median(uncached_times) / statistics.median(cached_times[name])
        preset = get_preset("dit", name)
        rows.append({
            "preset": name,
            "mode": plan.mode,
            "forecast": plan.forecast,
            "held_out_calibration_rel_err": (plan.calibration.get("held_out") or {}).get("rel_err"),
            "nonskip_rate": preset.get("nonskip_rate"),
            "taus": preset.get("taus"),
            "plan_id": plan.plan_id,
            "gated_steps": int(plan.step_gate.sum()),
            "longest_gated_run": longest_run(plan.step_gate),
            "step_gate": bits(plan.step_gate),
            "module_evals_computed": stats.module_evals_computed,
            "module_evals_total": stats.module_evals_total,
            "steps_computed": stats.steps_computed,
            "speedup": speedup,
            "ideal_speedup": ideal,
            "efficiency": speedup / ideal,
            "uncached_s": statistics.median(uncached_times),
            "cached_s": statistics.median(cached_times[name]),
            "cached_times_s": cached_times[name],
            **fidelity(reference, outputs[name], labels),
            "accuracy_uncached": reference_quality["accuracy"],
        })  # fmt: skip
    return {
        "command": args.command,
        "machine": args.machine,
        "model": generator.model_id,
        "steps": generator.num_inference_steps,
        "guidance_scale": generator.guidance_scale,
        "images": len(labels),
        "batch_size": len(labels),
        "calibration_runs": args.runs,
        "calibration": "replayed from recorded distances" if args.distances else "pipelines.calibration.calibrate",
        "rounds": len(uncached_times),
        "calibration_s": calibration_s,
        "uncached_times_s": uncached_times,
        "accuracy_uncached": reference_quality["accuracy"],
        "presets": rows,
    }


def write_benchmark(out: Path, result: dict[str, Any]) -> None:
    (out / "presets.json").write_text(json.dumps(result, indent=1))
    (out / "presets.md").write_text(benchmark_markdown(result))


def benchmark_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"`{result['command']}` — {result['machine']}",
        "",
        f"{result['model']}, DDIM {result['steps']} steps, CFG {result['guidance_scale']}, {result['images']} images "
        f"(batch {result['batch_size']}), {result['calibration_runs']} calibration runs, median of "
        f"{result['rounds']} interleaved timed rounds after a warm-up. Uncached denoising loop: "
        f"{statistics.median(result['uncached_times_s']):.1f} s; classifier accuracy uncached "
        f"{100 * result['accuracy_uncached']:.1f} %.",
        "",
        "| preset | plan | gated steps (longest run) | wall speedup | ideal | efficiency "
        "| CPU-time speedup (efficiency) | PSNR dB | SSIM | accuracy | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["presets"]:
        t = r["taus"]
        if r.get("mode") == "forecast":
            what = f"forecast {r['forecast']['target']}"
        else:
            what = f"paper, τ {r['nonskip_rate']:g} / {t['step']:g} / {t['attn']:g} / {t['ff']:g}"
        lines.append(
            f"| {r['preset']} | {what} "
            f"| {r['gated_steps']} ({r['longest_gated_run']}) | {r['speedup']:.2f}× | {r['ideal_speedup']:.2f}× "
            f"| {r['efficiency']:.2f} | {r.get('cpu_speedup', math.nan):.2f}× ({r.get('cpu_efficiency', math.nan):.2f}) "
            f"| {r['psnr_db']:.1f} | {r['ssim']:.3f} | {100 * r['accuracy']:.1f} % "
            f"| {r['rel_err']:.4f} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Sweep: phase 2 replayed from recorded trajectories


def record_distances(generator, cal_requests) -> dict[str, np.ndarray]:
    """{group: float64[R, L, T, T]}: D[r, l, j, k] = sum |Z[k] - Z[j] + eps| over run r's samples (both CFG halves),
    for j < k, measured exactly as the recorder measures one step (fp32 difference, fp64 sum)."""
    from invardiff.adapters import get_adapter
    from invardiff.recorder import l1_per_sample

    transformer = generator.transformer
    adapter = get_adapter(transformer)
    trajectories: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []

    def keep(key):
        def hook(_module, _inputs, output):
            trajectories.setdefault(key, []).append(output.detach().clone())

        return hook

    for site in adapter.cache_sites(transformer):
        handles.append(site.module.register_forward_hook(keep((site.families[0], site.layer))))
    handles.append(adapter.blocks(transformer)[-1].module.register_forward_hook(keep(("step", 0))))
    try:
        generator.generate(cal_requests)
    finally:
        for handle in handles:
            handle.remove()

    runs = len(cal_requests)
    groups = 2 if generator.uses_cfg else 1
    layers = {**adapter.layers(transformer), "step": 1}
    steps = generator.num_inference_steps
    distances = {group: np.zeros((runs, n, steps, steps)) for group, n in layers.items()}
    for (group, layer), zs in trajectories.items():
        for k in range(1, steps):
            for j in range(k):
                per_sample = l1_per_sample(zs[k], zs[j], 1e-8)
                distances[group][:, layer, j, k] = per_sample.view(groups, runs).sum(0).numpy()
    return distances


def replay_rates(distances: dict[str, np.ndarray], provisional=None) -> dict[str, np.ndarray]:
    """The recorder's per-run rates ({"step": [R, T], family: [R, T, L]}) for a provisional plan (None: phase 1)."""
    from invardiff.calibration import RateTracker

    result = {}
    for group, d in distances.items():
        runs, layers, steps, _ = d.shape
        rho = np.zeros((runs, steps, layers))
        for layer in range(layers):
            if provisional is None:
                mask = None
            elif group == "step":
                mask = provisional[0]
            else:
                mask = provisional[1][group][:, layer]
            for r in range(runs):
                tracker, anchor = RateTracker(steps, mask), None
                for k in range(steps):
                    if tracker.update(None if anchor is None else float(d[r, layer, anchor, k])):
                        anchor = k
                rho[r, :, layer] = tracker.rates
        result[group] = rho[:, :, 0] if group == "step" else rho
    return result


def replay_plan(generator, distances, rho1, bundle, cal_requests, provisional_mode="full"):
    from pipelines.calibration import build_plan, mean_of, provisional_plan

    p1 = provisional_plan(rho1, bundle, provisional_mode)
    rho2 = mean_of(replay_rates(distances, p1))
    return build_plan(generator.signature(), rho1, rho2, bundle, cal_requests, provisional_mode)


def sweep(args) -> dict[str, Any]:
    from invardiff.calibration import bits, ideal_speedup, longest_run
    from invardiff.policy import InvarDiffPolicy
    from pipelines.build import GeneratorConfig, build_generator
    from pipelines.calibration import TauBundle, calibrate, calibration_requests, mean_of

    generator = build_generator(GeneratorConfig(model="digits", device="cpu"))
    cal_requests = calibration_requests(generator, runs=args.runs)
    requests = eval_requests(args.per_class)
    labels = [r.class_label for r in requests]
    started = time.perf_counter()
    cache = args.out / f"distances-{args.runs}.npz"
    if args.reuse_plans and cache.exists():
        distances = dict(np.load(cache))
    else:
        distances = record_distances(generator, cal_requests)
        np.savez(cache, **distances)
    rho1 = mean_of(replay_rates(distances))
    print(f"recorded trajectories in {time.perf_counter() - started:.0f}s", flush=True)

    check = None
    if args.check_replay:
        bundle = TauBundle.from_preset("dit", "paper-dit-fast")
        library = calibrate(generator, bundle, cal_requests)
        replayed = replay_plan(generator, distances, rho1, bundle, cal_requests)
        check = {
            "max_abs_rho1_diff": max(float(np.max(np.abs(library.rho_phase1[g] - rho1[g]))) for g in rho1),
            "max_abs_rho2_diff": max(float(np.max(np.abs(library.rho_phase2[g] - replayed.rho_phase2[g]))) for g in rho1),
            "same_books": bool(np.array_equal(library.step_gate, replayed.step_gate)
                               and all(np.array_equal(library.modules[f], replayed.modules[f]) for f in library.modules)),
        }  # fmt: skip
        print(f"replay check: {check}", flush=True)

    reference = run(generator, requests)
    points, seen = [], {}
    for mode in args.modes:
        for nonskip in args.nonskip:
            for step in args.tau_step:
                for module_tau in args.tau_module:
                    taus = {"step": step, "attn": module_tau, "ff": module_tau}
                    plan = replay_plan(generator, distances, rho1, TauBundle(taus, nonskip), cal_requests, mode)
                    ideal = ideal_speedup(plan.step_gate, plan.modules)
                    point = {"provisional_mode": mode, "nonskip_rate": nonskip, "taus": taus, "ideal_speedup": ideal,
                             "gated_steps": int(plan.step_gate.sum()), "longest_gated_run": longest_run(plan.step_gate),
                             "step_gate": bits(plan.step_gate)}  # fmt: skip
                    key = (bits(plan.step_gate), *(bits(plan.modules[f]) for f in plan.modules))
                    if ideal < args.min_ideal:
                        continue
                    if key not in seen:
                        out = run(generator, requests, InvarDiffPolicy(plan))
                        seen[key] = fidelity(reference, out, labels)
                    point.update(seen[key])
                    points.append(point)
                    print(f"{mode} n{nonskip} step{step} mod{module_tau}: ideal {ideal:.2f} "
                          f"err {point['rel_err']:.4f} acc {point['accuracy']:.3f} gated {point['step_gate']}", flush=True)  # fmt: skip
                    # Written after every point: a sweep stopped early still leaves what it measured.
                    (args.out / "sweep-points.json").write_text(json.dumps(points, indent=1))
    return {"command": args.command, "machine": machine(), "images": len(requests), "calibration_runs": args.runs,
            "accuracy_uncached": fidelity(reference, reference, labels)["accuracy"], "replay_check": check,
            "points": points, "frontier": frontier(points)}  # fmt: skip


def frontier(points: list[dict]) -> list[dict]:
    """Points no other point beats on both ideal speedup and relative error."""
    best = []
    for p in sorted(points, key=lambda p: (-p["ideal_speedup"], p["rel_err"])):
        if not best or p["rel_err"] < best[-1]["rel_err"]:
            best.append(p)
    return best


def sweep_markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}` — {result['machine']}", "",
             f"{result['images']} images, {result['calibration_runs']} calibration runs, uncached accuracy "
             f"{100 * result['accuracy_uncached']:.1f} %. Frontier (ideal speedup vs rel err):", "",
             "| mode | nonskip | τ_step | τ_module | gated | ideal | rel err | PSNR | SSIM | acc |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in result["frontier"]:
        lines.append(f"| {p['provisional_mode']} | {p['nonskip_rate']:g} | {p['taus']['step']:g} | {p['taus']['attn']:g} "
                     f"| {p['gated_steps']} ({p['longest_gated_run']}) | {p['ideal_speedup']:.2f} | {p['rel_err']:.4f} "
                     f"| {p['psnr_db']:.1f} | {p['ssim']:.3f} | {100 * p['accuracy']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def machine() -> str:
    import os
    import platform

    from pipelines.runner import cpu_name

    return (f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{platform.python_version()}, load average at start {os.getloadavg()[0]:.1f}")  # fmt: skip


def main(argv=None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="20 images, 8 calibration runs, 2 rounds")
    parser.add_argument("--sweep", action="store_true", help="tau sweep instead of the preset benchmark")
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None, help="paper-mode calibration runs (default 16)")
    parser.add_argument("--forecast-runs", type=int, default=8, help="forecast calibration runs (default 8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--presets", nargs="+", default=list(DIT_PRESETS))
    parser.add_argument("--reuse-plans", action="store_true", help="reuse OUT/plans/*.json calibrated for the same taus (sweep: the recorded distances)")
    parser.add_argument("--distances", type=Path, default=None,
                        help="calibrate by replaying a sweep's distances-RUNS.npz instead of the phase-2 passes")
    parser.add_argument("--check-replay", action="store_true", help="sweep: compare the replay with the library once")
    parser.add_argument("--modes", nargs="+", default=["full", "dit-legacy"])
    parser.add_argument("--nonskip", nargs="+", type=float, default=[0.0, 0.1])
    parser.add_argument("--tau-step", nargs="+", type=float, default=[0.5, 0.55, 0.6, 0.63, 0.66, 0.7])
    parser.add_argument("--tau-module", nargs="+", type=float, default=[0.0, 0.1, 0.2])
    parser.add_argument("--min-ideal", type=float, default=0.0, help="sweep: skip plans below this ideal speedup")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.command = "python -m benchmarks.presets " + " ".join(sys.argv[1:] if argv is None else argv)
    args.per_class = args.per_class or (2 if args.quick else 8 if not args.sweep else 4)
    args.runs = args.runs or (8 if args.quick else 16)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    args.machine = machine()

    if args.sweep:
        result = sweep(args)
        (args.out / "sweep.json").write_text(json.dumps(result, indent=1))
        (args.out / "sweep.md").write_text(sweep_markdown(result))
        print(sweep_markdown(result))
        return
    result = benchmark(args)
    print(benchmark_markdown(result))


if __name__ == "__main__":
    main()
