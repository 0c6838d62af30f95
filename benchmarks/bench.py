"""InvarDiff against the peer caching methods, on one model, seeds and classes.

    invardiff bench [--quick] --out DIR
    python -m benchmarks.bench [--quick] --out DIR [--model digits|tiny-dit|tiny-flux|PATH] [--random-dit-xl]

Rows: uncached; InvarDiff presets and a tau_step sweep (calibrated here, on seeds disjoint from the evaluated ones);
diffusers' FirstBlockCache, TaylorSeer, MagCache (ratios computed here) and Pyramid Attention Broadcast;
cache-dit's DBCache; fixed-interval reuse of whole steps and of attention/feed-forward outputs (FORA); fewer DDIM
steps at the same compute.

How it measures:
* Speed. The evaluated images are cut into rounds of `batch_size`. Every round runs every method back to back,
  in a rotated order, so each method's time has an uncached time taken moments apart on the same batch; the wall
  speedup is the median over rounds of uncached / method denoising time. A warm-up batch per method is discarded.
* Ideal speedup: attention and feed-forward evaluations counted while running (`peers.ModuleCounter`), uncached /
  method. Nothing is derived from a method's own claims.
* Fidelity: PSNR / SSIM / MS-SSIM of each image to the uncached image with the same seed and class.
* On the digits model: digit-classifier accuracy and the Fréchet distance to the 1797 real digits in the
  classifier's feature space.
* Peak memory: CUDA allocator peak; on CPU, the peak of live tensor bytes during the warm-up batch (torch
  profiler memory events), since the process RSS only ever grows.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# The published InvarDiff step gates (method doc §4.6, computed from the authors' cache_books JSON); 1 = gated.
PAPER_STEP_GATES = {
    "dit-slow": "00110111111011110110001100110000011000111101111100",
    "dit-fast": "00111111111111110110001100110000011100001101111100",
    "flux-fast": "0010111111011101111111000000",
    "flux-slow": "0000001111011101111111000000",
}
PAPER_GATED_STEPS = {"dit-slow": (29, 50), "dit-fast": (30, 50), "flux-fast": (17, 28), "flux-slow": (14, 28)}

NO_LOCAL_WEIGHTS = "skipped: no local weights"
LPIPS_WHY = "LPIPS needs an AlexNet/VGG backbone that lpips/torchmetrics download through torchvision"
FID_WHY = "FID needs Inception weights that torch-fidelity/clean-fid download"


@dataclass(frozen=True)
class BenchConfig:
    model: str = "digits"
    images: int = 40  # evaluated images: seeds 0.., classes cycled
    batch_size: int = 10  # one timing round
    warmup_batch: int = 2
    steps: int | None = None  # None: the model's default (DiT 50)
    guidance: float | None = None
    dtype: str = "float32"
    device: str | None = None
    threads: int | None = 1  # one thread: on a shared 2-core box two threads oversubscribe and time 10x noisier
    calibration_runs: int = 16
    forecast_calibration_runs: int = 8
    # The forecast presets (the product), and the best paper-mode points for comparison. None: every preset.
    presets: tuple[str, ...] | None = ("quality", "balanced", "fast", "turbo", "copy-fast", "paper-dit-fast")
    uniform_speedups: tuple[float, ...] = (2.5, 3.0, 4.0)  # "uniform spacing + forecast" baselines at these budgets
    tau_steps: tuple[float, ...] = ()  # a paper-mode tau_step sweep (BENCHMARKS.md section 3 has the earlier one)
    fbc_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2)
    taylorseer_intervals: tuple[int, ...] = (2, 3, 4)
    taylorseer_warmups: tuple[int, ...] = (3, 1)  # diffusers' default, and the smallest it allows
    mag_thresholds: tuple[float, ...] = (0.06, 0.12, 0.24)
    pab_ranges: tuple[int, ...] = (2,)
    dbcache_thresholds: tuple[float, ...] = (0.08, 0.16, 0.24)
    step_intervals: tuple[int, ...] = (2, 3)
    fora_intervals: tuple[int, ...] = (2, 3)
    fewer_steps: tuple[int, ...] = (25, 17)
    l2c_lams: tuple[float, ...] = (1e-5, 1e-4, 1e-3)  # routers from `invardiff train-router`, if stored for the model
    l2c_theta: float = 0.1
    dicache_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2)
    random_dit_xl: bool = False
    lpips_weights: str | None = None
    fid_weights: str | None = None


FULL = BenchConfig()
QUICK = replace(
    FULL,
    images=16,
    batch_size=8,
    warmup_batch=1,
    calibration_runs=8,
    forecast_calibration_runs=4,
    presets=("balanced", "fast", "copy-fast"),
    uniform_speedups=(3.0,),
    taylorseer_warmups=(1,),
    tau_steps=(0.45,),
    fbc_thresholds=(0.1,),
    taylorseer_intervals=(3,),
    mag_thresholds=(0.12,),
    pab_ranges=(2,),
    dbcache_thresholds=(0.16,),
    step_intervals=(2,),
    fora_intervals=(2,),
    fewer_steps=(25,),
    l2c_lams=(1e-4,),
    dicache_thresholds=(0.1,),
)


@dataclass
class Method:
    name: str
    kind: str  # uncached | invardiff | invardiff-sweep | diffusers | cache-dit | baseline | l2c | dicache
    policy: Any = None  # a CachePolicy; None for a row that was not run
    steps: int | None = None  # sampler steps, when they differ from the reference's
    skipped: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Pareto front


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, both coordinates to maximise, sorted by the first.

    A point is dominated when another is at least as good in both and better in one. Points with a NaN or None
    coordinate are never on the front. Equal points are all kept."""
    valid = [
        i for i, (x, y) in enumerate(points) if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))
    ]
    front = []
    for i in valid:
        xi, yi = points[i]
        if not any(
            points[j][0] >= xi and points[j][1] >= yi and (points[j][0] > xi or points[j][1] > yi) for j in valid
        ):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def dominated_by(point: tuple[float, float], others: Sequence[tuple[float, float]]) -> int | None:
    """Index of the first of `others` at least as fast with strictly higher quality than `point`, else None."""
    x, y = point
    if x is None or y is None:
        return None
    for j, (xo, yo) in enumerate(others):
        if xo is not None and yo is not None and xo >= x and yo > y:
            return j
    return None


# ----------------------------------------------------------------------------------------------------------------
# Building the model and the methods


def build(config: BenchConfig):
    import torch

    if config.threads and (config.device or "cpu") == "cpu" and not torch.cuda.is_available():
        torch.set_num_threads(config.threads)
    if config.random_dit_xl:
        return random_dit_xl(config)
    from pipelines.build import GeneratorConfig, build_generator

    return build_generator(
        GeneratorConfig(
            model=config.model,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance,
            dtype=config.dtype,
            device=config.device,
        )
    )


# DiT-XL/2 at 256 px (facebook/DiT-XL-2-256's transformer config), randomly initialised: for timing on a GPU
# machine without the checkpoint. Its images are noise, so only the speed and count columns mean anything.
DIT_XL_2_256 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
)


def random_dit_xl(config: BenchConfig):
    import torch
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from pipelines.build import DTYPES
    from pipelines.dit import DitGenerator
    from pipelines.fetch import model_fingerprint
    from pipelines.tiny import LATENT_DIT_SCHEDULER_CONFIG

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(**DIT_XL_2_256).eval()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return DitGenerator(
        transformer,
        DDIMScheduler(**LATENT_DIT_SCHEDULER_CONFIG),
        num_classes=1000,
        model_id="random-init:DiT-XL-2-256",
        fingerprint=model_fingerprint(transformer),
        num_inference_steps=config.steps or 50,
        guidance_scale=4.0 if config.guidance is None else config.guidance,
        device=device,
        dtype=DTYPES[config.dtype],
    )


def requests_for(generator, count: int, seed: int = 0):
    from pipelines.base import Request
    from pipelines.calibration import CALIBRATION_PROMPTS

    if generator.architecture == "flux":
        prompts = CALIBRATION_PROMPTS
        return [Request(f"eval-{i}", seed + i, prompt=prompts[i % len(prompts)]) for i in range(count)]
    n = generator.num_classes
    stride = 1 if n <= 10 else 37  # ImageNet: spread the classes
    return [Request(f"eval-{i}", seed + i, class_label=(i * stride) % n) for i in range(count)]


# The DiT paper operating points have published FLUX counterparts; the copy-* points were tuned on the digits DiT.
FLUX_COUNTERPARTS = {"paper-dit-fast": "paper-flux-fast", "paper-dit-slow": "paper-flux-slow"}


def presets_for(names: Sequence[str], architecture: str) -> tuple[str, ...]:
    """The preset rows for `architecture`: on FLUX, each DiT paper preset becomes its FLUX counterpart and the
    digits-only copy-* presets are left out. Any other name is kept, so an unknown one fails at calibration."""
    if architecture != "flux":
        return tuple(names)
    swapped = (FLUX_COUNTERPARTS.get(name, name) for name in names)
    return tuple(dict.fromkeys(name for name in swapped if not name.startswith("copy-")))


def methods(generator, config: BenchConfig, say: Callable[[str], None]) -> list[Method]:
    from benchmarks import peers
    from invardiff.policy import InvarDiffPolicy, NoCache
    from invardiff.presets import get_preset, preset_names
    from pipelines.calibration import TauBundle, calibrate, calibration_requests, record_rates

    from benchmarks.forecast_presets import calibrate_forecast_preset, measure_forecast_evidence
    from invardiff.forecast import computed_steps_for
    from invardiff.presets import FORECAST_PRESETS

    steps = generator.num_inference_steps
    signature = generator.signature()
    rows = [Method("uncached", "uncached", NoCache())]
    presets = presets_for(config.presets or tuple(preset_names(generator.architecture)), generator.architecture)

    # Forecast presets: one measurement on the calibration runs, shared by every budget.
    forecast_presets = [name for name in presets if name in FORECAST_PRESETS]
    if forecast_presets:
        evidence = measure_forecast_evidence(generator, config.forecast_calibration_runs, say=say)
        for name in forecast_presets:
            plan = calibrate_forecast_preset(generator, name, evidence, held_out=0)
            label = f"InvarDiff {name} (forecast {plan.forecast['target']}, {plan.forecast_schedule.num_computed} computed)"
            rows.append(Method(label, "invardiff", InvarDiffPolicy(plan)))
    for speedup in config.uniform_speedups:
        for target in ("residual", "modules"):
            computed = computed_steps_for(steps, speedup)
            plan = peers.uniform_forecast_plan(signature, computed, target)
            rows.append(Method(f"uniform + forecast {target}, {computed} computed", "baseline", InvarDiffPolicy(plan)))

    # InvarDiff paper mode: phase 1 does not depend on the taus, so it is recorded once and shared by every bundle.
    cal_requests = calibration_requests(generator, runs=config.calibration_runs)
    say(f"calibration phase 1 on {len(cal_requests)} runs")
    phase1 = record_rates(generator, cal_requests)
    bundles = [
        (f"InvarDiff {name}", "invardiff", TauBundle.from_preset(generator.architecture, name))
        for name in presets
        if name not in FORECAST_PRESETS
    ]
    if generator.architecture == "dit" and config.tau_steps:
        base = get_preset("dit", "copy-balanced")  # the sweep varies tau_step only, at these module taus
        for tau in config.tau_steps:
            taus = {**base["taus"], "step": tau}
            bundles.append((f"InvarDiff tau_step={tau:g}", "invardiff-sweep", TauBundle(taus, base["nonskip_rate"])))
    seen: dict[tuple, Method] = {}
    for name, kind, bundle in bundles:
        key = (tuple(sorted(bundle.taus.items())), bundle.nonskip_rate)
        if key in seen:  # presets with equal taus calibrate to the same plan: one row, both names
            seen[key].name += f" (= {name.removeprefix('InvarDiff ')})"
            continue
        say(f"calibrating {name}")
        plan = calibrate(generator, bundle, cal_requests, phase1=phase1)
        rows.append(seen.setdefault(key, Method(name, kind, InvarDiffPolicy(plan))))

    arch = generator.architecture
    rows += [Method(p.name, "diffusers", p) for p in map(peers.first_block_cache, config.fbc_thresholds)]
    rows += [
        Method(p.name, "diffusers", p)
        for p in (
            peers.taylorseer(n, architecture=arch, warmup=w)
            for w in config.taylorseer_warmups
            for n in config.taylorseer_intervals
        )
    ]
    if config.mag_thresholds:
        say("MagCache ratios")
        if arch == "dit":
            ratios = peers.mag_ratios(generator, cal_requests)
        else:  # FLUX: its stack spans two block lists; use the ratios diffusers ships for FLUX.1-dev
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS as ratios
        rows += [
            Method(p.name, "diffusers", p)
            for p in (peers.mag_cache(t, ratios, steps) for t in config.mag_thresholds)
        ]
    if arch == "dit":
        rows += [Method(p.name, "diffusers", p) for p in map(peers.pyramid_attention_broadcast, config.pab_ranges)]
        rows.append(Method("FasterCache", "diffusers", skipped=peers.FASTERCACHE_UNSUPPORTED))
        missing = peers.cache_dit_unavailable()
        for threshold in config.dbcache_thresholds:
            policy = None if missing else peers.CacheDitDBCache(threshold, steps)
            name = policy.name if policy else f"cache-dit DBCache r={threshold:g}"
            rows.append(Method(name, "cache-dit", policy, skipped=missing))

    for k in config.step_intervals:
        plan = peers.interval_plan(signature, k, granularity="step")
        rows.append(Method(f"reuse step, compute every {k}", "baseline", InvarDiffPolicy(plan)))
    for k in config.fora_intervals:
        plan = peers.interval_plan(signature, k, granularity="module")
        rows.append(Method(f"FORA attn+ff, compute every {k}", "baseline", InvarDiffPolicy(plan)))
    for n in config.fewer_steps:
        if n < steps:
            rows.append(Method(f"DDIM {n} steps", "baseline", NoCache(), steps=n))
    from benchmarks.l2c_dicache import bench_methods

    rows += bench_methods(generator, config, say)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Running


@dataclass
class Run:
    seconds: float
    cpu_seconds: float  # this process's CPU time: what other tenants of a shared box disturb least
    images: np.ndarray
    final: Any
    counted: int
    policy_evals: int | None


def run_once(generator, method: Method, requests, counter) -> Run:
    import torch

    from invardiff._hookutils import cache_context

    transformer = generator.transformer
    policy = method.policy
    synchronize = torch.cuda.synchronize if generator.device.type == "cuda" else (lambda: None)
    default_steps = generator.num_inference_steps
    policy.attach(transformer)
    try:
        if method.steps:
            generator.num_inference_steps = method.steps
        policy.reset(transformer)
        counter.reset()
        synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        if generator.architecture == "dit":  # DiT's sampler sets no cache context; the stateful hooks need one
            with cache_context(transformer, "cond"):
                result = generator.generate(requests)
        else:
            result = generator.generate(requests)
        synchronize()
        # On CPU the sampler's own denoising time; on CUDA its clock stops before queued kernels finish, so the
        # whole synchronised call is timed (decoding included; the same for every method).
        seconds = result.denoise_seconds if generator.device.type != "cuda" else time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        stats = policy.stats(transformer)
        counted = counter.total()
    finally:
        generator.num_inference_steps = default_steps
        policy.reset(transformer)
        policy.detach(transformer)
    return Run(seconds, cpu_seconds, result.images, result.final, counted, stats.module_evals_computed)


def peak_memory(generator, method: Method, requests, counter) -> int:
    """Bytes of peak live tensor memory during one generation, above what was live when it started."""
    import torch

    if generator.device.type == "cuda":
        torch.cuda.synchronize(generator.device)
        base = torch.cuda.memory_allocated(generator.device)
        torch.cuda.reset_peak_memory_stats(generator.device)
        run_once(generator, method, requests, counter)
        return int(torch.cuda.max_memory_allocated(generator.device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_once(generator, method, requests, counter)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return int(peak)


def run_bench(config: BenchConfig, out: Path, *, command: str = "", say: Callable[[str], None] = print) -> dict:
    from benchmarks.peers import ModuleCounter
    from jobs.console import Progress

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = build(config)
    rows = methods(generator, config, say)
    counter = ModuleCounter().attach(generator.transformer)
    live = [m for m in rows if m.skipped is None]

    warmup = requests_for(generator, config.warmup_batch, seed=900_000)
    memory: dict[str, int] = {}
    errors: dict[str, str] = {}
    for method in live:
        say(f"warm-up + memory: {method.name}")
        try:
            memory[method.name] = peak_memory(generator, method, warmup, counter)
        except Exception as error:  # one broken peer must not sink the benchmark; the table says what broke
            errors[method.name] = f"error: {type(error).__name__}: {error}"
    live = [m for m in live if m.name not in errors]

    requests = requests_for(generator, config.images)
    rounds = [requests[i : i + config.batch_size] for i in range(0, len(requests), config.batch_size)]
    runs: dict[str, list[Run]] = {m.name: [] for m in live}
    progress = Progress(f"bench, {len(rounds)} rounds x {len(live)} methods", len(requests) * len(live)).start()
    for r, chunk in enumerate(rounds):
        order = live[r % len(live) :] + live[: r % len(live)]
        for method in order:
            runs[method.name].append(run_once(generator, method, chunk, counter))
            progress.advance(len(chunk))
    progress.close()

    table = summarise(generator, config, rows, runs, memory, errors)
    env = environment(generator, config, command, time.perf_counter() - started)
    result = {"config": asdict(config), "environment": env, "rows": table}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "table.md").write_text(markdown(result))
    plot(table, out / "pareto.png", title=f"{env['model']}: speed vs fidelity ({env['machine']})")
    say(f"wrote {out / 'table.md'}, {out / 'pareto.png'}, {out / 'results.json'} in {env['seconds']:.0f} s")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Metrics and the table


SPEED_AXES = ("wall_speedup", "cpu_speedup", "ideal_speedup")


def summarise(generator, config, rows, runs, memory, errors) -> list[dict]:
    from evaluation import fidelity

    digits = config.model == "digits" and not config.random_dit_xl
    reference = runs["uncached"]
    ref_images = np.concatenate([r.images for r in reference])
    ref_evals = sum(r.counted for r in reference)
    real_features = None
    labels = None
    if digits:
        from evaluation.digits_classifier import embed
        from pipelines.digits import load_digit_images

        from pipelines.base import to_uint8
        import torch

        real, _ = load_digit_images()
        real_features = embed(to_uint8(torch.as_tensor(real)))
        labels = [r.class_label for r in requests_for(generator, config.images)]

    table = []
    for method in rows:
        row: dict[str, Any] = {"method": method.name, "kind": method.kind}
        if method.skipped or method.name in errors:
            row["status"] = method.skipped or errors[method.name]
            table.append(row)
            continue
        mine = runs[method.name]
        images = np.concatenate([r.images for r in mine])
        ratios = [ref.seconds / run.seconds for ref, run in zip(reference, mine)]
        cpu_ratios = [ref.cpu_seconds / run.cpu_seconds for ref, run in zip(reference, mine)]
        evals = sum(r.counted for r in mine)
        policy_evals = [r.policy_evals for r in mine]
        identical = method.name == "uncached"
        row.update(
            status="ok",
            wall_speedup=float(statistics.median(ratios)),
            wall_speedup_min=float(min(ratios)),
            wall_speedup_max=float(max(ratios)),
            cpu_speedup=float(statistics.median(cpu_ratios)),
            seconds_per_image=float(sum(r.seconds for r in mine) / len(images)),
            module_evals=int(evals),
            module_evals_uncached=int(ref_evals),
            policy_module_evals=None if None in policy_evals else int(sum(policy_evals)),
            ideal_speedup=float(ref_evals / evals) if evals else math.inf,
            psnr=None if identical else float(np.mean(fidelity.psnr(images, ref_images))),
            ssim=None if identical else float(np.mean(fidelity.ssim(images, ref_images))),
            ms_ssim=None if identical else float(np.mean(fidelity.ms_ssim(images, ref_images))),
            peak_memory_mib=memory.get(method.name, 0) / 2**20,
            lpips=f"{NO_LOCAL_WEIGHTS} ({LPIPS_WHY})" if not config.lpips_weights else lpips_unavailable(),
            fid=f"{NO_LOCAL_WEIGHTS} ({FID_WHY})" if not config.fid_weights else fid_unavailable(),
        )
        if digits:
            from evaluation.digits_classifier import accuracy, embed, frechet_distance

            row["accuracy"] = accuracy(images, labels)
            with warnings.catch_warnings():  # fewer images than feature dimensions: a singular covariance, expected
                warnings.simplefilter("ignore")
                row["fd"] = frechet_distance(embed(images), real_features)
        table.append(row)

    invardiff = [r for r in table if r["kind"].startswith("invardiff") and r["status"] == "ok"]
    for row in table:
        if row["status"] != "ok" or row["kind"] in ("uncached",) or row["kind"].startswith("invardiff"):
            continue
        for axis in SPEED_AXES:
            winner = dominated_by((row[axis], row["psnr"]), [(r[axis], r["psnr"]) for r in invardiff])
            row[f"beaten_{axis}"] = invardiff[winner]["method"] if winner is not None else None
    return table


def lpips_unavailable() -> str:
    # Weights alone are not enough here: the lpips/torchmetrics backbones come through torchvision, which has no
    # CPU build on this index. Say so instead of quietly dropping the flag.
    return "skipped: --lpips-weights given, but no LPIPS implementation without torchvision is installed"


def fid_unavailable() -> str:
    return "skipped: --fid-weights given, but torch-fidelity/torchmetrics are not installed"


def environment(generator, config, command, seconds) -> dict:
    import diffusers
    import torch

    from pipelines.runner import device_description

    try:
        import cache_dit

        cache_dit_version = cache_dit.__version__
    except ImportError:
        cache_dit_version = "not installed"
    device, device_name = device_description(generator.device)
    import os

    return {
        "model": generator.model_id,
        "machine": f"{device_name}, {os.cpu_count()} cores" if device == "cpu" else device_name,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cache_dit": cache_dit_version,
        "steps": generator.num_inference_steps,
        "guidance_scale": generator.guidance_scale,
        "dtype": str(generator.transformer.dtype).removeprefix("torch."),
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": seconds,
    }


def _num(value, fmt: str, none: str = "—") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, fmt)


def markdown(result: dict) -> str:
    env, config, rows = result["environment"], result["config"], result["rows"]
    digits = any("accuracy" in r for r in rows)
    head = ["method", "wall speedup (median, min–max)", "CPU-time speedup", "ideal speedup", "attn+ff evals"]
    head += ["PSNR dB", "SSIM", "MS-SSIM"]
    head += ["accuracy", "FD"] if digits else []
    head += ["peak MiB", "dominated by InvarDiff (wall / CPU / ideal)"]
    lines = [
        f"Model `{env['model']}`, {env['steps']} DDIM steps, guidance {env['guidance_scale']}, {env['dtype']}; "
        f"{config['images']} images (seeds 0–{config['images'] - 1}, classes cycled) in rounds of "
        f"{config['batch_size']}; machine: {env['machine']}, torch {env['torch']} ({env['torch_threads']} thread(s)), "
        f"diffusers {env['diffusers']}, cache-dit {env['cache_dit']}; {env['date']}, {env['seconds']:.0f} s.",
        f"Command: `{env['command']}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']} |" + " |" * (len(head) - 2))
            continue
        wall = f"{r['wall_speedup']:.2f}× ({r['wall_speedup_min']:.2f}–{r['wall_speedup_max']:.2f})"
        cells = [
            r["method"],
            wall,
            f"{r['cpu_speedup']:.2f}×",
            f"{_num(r['ideal_speedup'], '.2f')}×",
            f"{r['module_evals']}/{r['module_evals_uncached']}",
            _num(r["psnr"], ".2f", "∞ (reference)"),
            _num(r["ssim"], ".4f", "1"),
            _num(r["ms_ssim"], ".4f", "1"),
        ]
        if digits:
            cells += [f"{r['accuracy']:.3f}", f"{r['fd']:.2f}" if config["images"] >= FD_MIN_IMAGES else "–"]
        cells.append(f"{r['peak_memory_mib']:.1f}")
        if "beaten_wall_speedup" in r:
            cells.append(" / ".join("yes" if r[f"beaten_{axis}"] else "**no**" for axis in SPEED_AXES))
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    ok = next(r for r in rows if r["status"] == "ok")
    lines += [
        "",
        f"LPIPS: {ok['lpips']}. FID: {ok['fid']}.",
        "Wall speedup: uncached / method denoising time, paired per round, median over rounds, warm-up discarded. "
        "CPU-time speedup: the same ratio of this process's CPU time (steadier than wall time on a shared box). "
        "Ideal speedup: attention + feed-forward evaluations counted at run time, uncached / method. "
        "PSNR/SSIM/MS-SSIM: against the uncached image with the same seed and class. "
        + ("Accuracy: digit classifier; FD: Fréchet distance to the 1797 real digits in its feature space "
           f"(shown from {FD_MIN_IMAGES} images: with fewer it mostly measures the sample size). " if digits else "")
        + ("Peak MiB: CUDA allocator peak above the start. " if env["device"] == "cuda"
           else f"Peak MiB: peak live tensor memory above the start, warm-up batch of {config['warmup_batch']}. ")
        + "Dominated: some InvarDiff row is at least as fast with higher PSNR.",
    ]
    return "\n".join(lines) + "\n"


PSNR_CAP = 50.0  # near-lossless rows (a threshold that never fires) would squash everything else; drawn at the cap


# A real speedup cannot beat the counted one by more than timer noise: attention and feed-forward are most of a
# step, and skipping them never makes the rest faster. A median whose rounds range over more than half its value
# says the machine was busy, not how fast the method is.
IDEAL_TOLERANCE = 1.05
# The Fréchet distance fits a 128-dimensional Gaussian (the digit classifier's hidden layer) to each image set:
# below twice that many images the covariance is rank-deficient and the number mostly measures the sample size.
FD_MIN_IMAGES = 256
MAX_RELATIVE_SPREAD = 0.5
KIND_NAMES = {"invardiff": "InvarDiff preset", "invardiff-sweep": "InvarDiff tau sweep", "diffusers": "diffusers cache",
              "cache-dit": "cache-dit", "baseline": "simple baseline", "l2c": "L2C", "dicache": "DiCache"}  # fmt: skip


def noise_reasons(row: dict, axis: str) -> list[str]:
    """Why a row's measured speedup on `axis` is noise rather than a result (empty when it is a result)."""
    if axis == "ideal_speedup":
        return []
    reasons = []
    if row[axis] > row["ideal_speedup"] * IDEAL_TOLERANCE:
        reasons.append("above the ideal")
    if axis == "wall_speedup" and row["wall_speedup"] > 0:
        spread = (row["wall_speedup_max"] - row["wall_speedup_min"]) / row["wall_speedup"]
        if spread > MAX_RELATIVE_SPREAD:
            reasons.append(f"rounds spread {spread:.0%}")
    return reasons


def _place_labels(ax, points: list[tuple[float, float]], texts: list[str], colors: list[str]) -> list:
    """Label each point without labels overlapping each other or leaving the axes: a label that would collide
    is tried to the right of its point, then to the left, moved up or down in steps of its own height until it
    fits, with a thin leader line back to its point. Returns the labels' boxes (display coordinates)."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = []
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))  # top to bottom
    for i in order:
        label = ax.annotate(texts[i], points[i], xytext=(4, 0), textcoords="offset points", fontsize=7,
                            color=colors[i], va="center",
                            arrowprops=dict(arrowstyle="-", lw=0.4, color="0.6", shrinkA=0, shrinkB=2))  # fmt: skip
        label.update_positions(renderer)
        height = Text.get_window_extent(label, renderer).height * 1.1 / ax.figure.dpi * 72  # points
        candidates = [(side, height * ((n + 1) // 2) * (-1 if n % 2 else 1)) for n in range(40) for side in (1, -1)]
        for side, shift in candidates:
            label.set_position((4 * side, shift))
            label.set_horizontalalignment("left" if side > 0 else "right")
            label.update_positions(renderer)  # an annotation resolves its offset only when asked (or drawn)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)
    return placed


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Speed vs fidelity on three speedup axes. Hollow markers: measurements flagged as noise (above the ideal
    speedup, or rounds too spread); they are labelled so and left out of the frontiers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ok = [r for r in rows if r["status"] == "ok" and r["psnr"] is not None]
    fig = Figure(figsize=(20, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    styles = {"invardiff": ("C0", "o"), "invardiff-sweep": ("C0", "s"), "diffusers": ("C1", "^"),
              "cache-dit": ("C2", "v"), "baseline": ("C7", "D"), "l2c": ("C4", "P"), "dicache": ("C5", "X")}  # fmt: skip
    labels = ("wall-clock speedup (median)", "CPU-time speedup (median)", "ideal speedup (counted evaluations)")
    annotations = []  # per axis: (points, texts, colors), placed once the layout is final
    for ax, axis, label in zip(axes, SPEED_AXES, labels):
        points, texts, colors = [], [], []
        for r in ok:
            color, marker = styles.get(r["kind"], ("k", "x"))
            capped = r["psnr"] > PSNR_CAP
            y = min(r["psnr"], PSNR_CAP)
            noise = noise_reasons(r, axis)
            ax.scatter(r[axis], y, marker="^" if capped else marker, s=42, edgecolors=color,
                       facecolors="none" if noise else color, linewidths=1.2)  # fmt: skip
            text = r["method"] + (f" ({r['psnr']:.0f} dB)" if capped else "")
            points.append((r[axis], y))
            texts.append(text + (f" — noise: {', '.join(noise)}" if noise else ""))
            colors.append("0.45" if noise else "0.1")
        for kinds, color, name in (
            (("invardiff", "invardiff-sweep"), "C0", "InvarDiff frontier"),
            (("diffusers", "cache-dit", "baseline", "l2c", "dicache"), "C3", "peers frontier"),
        ):
            group = [r for r in ok if r["kind"] in kinds and not noise_reasons(r, axis)]
            front = pareto_front([(r[axis], r["psnr"]) for r in group])
            ax.plot([group[i][axis] for i in front], [min(group[i]["psnr"], PSNR_CAP) for i in front],
                    color=color, lw=1.2, zorder=0)  # fmt: skip
        ax.margins(x=0.25, y=0.08)  # room for the labels
        annotations.append((points, texts, colors))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"PSNR to the uncached image (dB; above {PSNR_CAP:g} drawn at {PSNR_CAP:g} as ▲)")
    kinds = [k for k in styles if any(r["kind"] == k for r in ok)]
    handles = [Line2D([], [], ls="", marker=styles[k][1], color=styles[k][0], label=KIND_NAMES.get(k, k)) for k in kinds]
    handles += [
        Line2D([], [], ls="", marker="o", markerfacecolor="none", color="0.3", label="noise: not a result"),
        Line2D([], [], color="C0", label="InvarDiff frontier"),
        Line2D([], [], color="C3", label="peers frontier"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    # Labels are placed against the axes' final position on the page, which the layout fixes on a first draw;
    # the layout is then frozen so that saving does not move the axes under the labels.
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    for ax, (points, texts, colors) in zip(axes, annotations):
        _place_labels(ax, points, texts, colors)
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="smoke run: one point per method (<= 5 min on 2 CPUs)")
    parser.add_argument("--model", default="digits",
                        help="digits, tiny-dit, tiny-flux, or a DiT-XL/2 / FLUX checkpoint path/URI")
    parser.add_argument("--random-dit-xl", action="store_true", help="DiT-XL/2 256px architecture, random init")
    parser.add_argument("--images", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    parser.add_argument("--calibration-runs", type=int)
    parser.add_argument("--presets", nargs="+", help="InvarDiff presets to calibrate and run (default: the forecast "
                        "presets, copy-fast and paper-dit-fast)")
    parser.add_argument("--lpips-weights", help="local LPIPS backbone weights (LPIPS is skipped without)")
    parser.add_argument("--fid-weights", help="local Inception weights for FID (FID is skipped without)")
    args = parser.parse_args(argv)
    config = replace(
        QUICK if args.quick else FULL,
        model=args.model,
        random_dit_xl=args.random_dit_xl,
        **{
            k: v
            for k, v in dict(
                images=args.images, batch_size=args.batch_size, steps=args.steps, dtype=args.dtype,
                device=args.device, threads=args.threads, calibration_runs=args.calibration_runs,
                lpips_weights=args.lpips_weights, fid_weights=args.fid_weights,
                presets=tuple(args.presets) if args.presets else None,
            ).items()
            if v is not None
        },  # fmt: skip
    )
    command = "invardiff bench " + " ".join(sys.argv[1:] if argv is None else argv)
    return run_bench(config, args.out, command=command, say=lambda m: print(f"[bench] {m}", flush=True))


if __name__ == "__main__":
    main()
