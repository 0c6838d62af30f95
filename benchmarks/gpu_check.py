"""The GPU check: one command that measures the GPU path end to end, on random weights of the real shapes.

    python -m benchmarks.gpu_check --out $OUT            # one H200, about 8 minutes (--budget-s 480)
    python -m benchmarks.gpu_check --smoke --out DIR     # the same code on shrunken models, CPU, seconds (CI)

Groups of rows, in the order they run (the budget skips what no longer fits, and says so):
* DiT-XL/2 256² (diffusers `DiTTransformer2DModel` at facebook/DiT-XL-2-256's config, random init), bf16, DDIM 50,
  CFG 4.0 batched, batch 8 then 32: uncached; InvarDiff paper mode with the published fast and slow step gates;
  our forecast plan (3x, calibrated here on a few runs); diffusers TaylorSeer, FirstBlockCache and MagCache.
* FLUX.1-dev-shaped (19 dual + 38 single blocks, width 3072, random init), 1024², 28 steps, batch 1: uncached,
  the published FLUX fast gate and books, our forecast plan. Transformer only: the prompt embeddings are random
  tensors of T5/CLIP's shapes (`FluxGenerator` without text encoders) and there is no VAE, so only speed counts.
* Both again under `torch.compile`, regionally, with dynamo's caches reset before each row so its compile counts
  are its own: uncached, every transformer block compiled (as diffusers' `compile_repeated_blocks`); InvarDiff,
  `invardiff.compile_blocks` (the blocks' and cache sites' computation compiled, the plan's decisions eager).

How it measures: per group, each method attaches once, runs one warm-up generation (discarded; it also gives the
peak memory and the cache bytes) and `--repeats` timed generations, CUDA-synchronised around each. The speedup is
the median uncached time over the method's median time, both taken in this process on the same batch and seeds.
The counted speedup is uncached / method module evaluations (the policy's `CacheStats`; for diffusers' caches the
evaluations counted under them by `benchmarks.peers.ModuleCounter`). Efficiency = speedup / counted speedup.
FLOPs: analytic, see `family_flops`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.bench import DIT_XL_2_256, PAPER_STEP_GATES

# ----------------------------------------------------------------------------------------------------------------
# What runs


# black-forest-labs/FLUX.1-dev's transformer config.
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# Shrunken for --smoke: the same classes, a handful of channels.
TINY_DIT = dict(DIT_XL_2_256, num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8)
TINY_FLUX = dict(FLUX_DEV, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))  # fmt: skip

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), in TFLOP/s, by a substring of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


@dataclass(frozen=True)
class CheckConfig:
    smoke: bool = False
    device: str = "cuda"
    dtype: str = "bfloat16"
    dit: dict = field(default_factory=lambda: dict(DIT_XL_2_256))
    dit_steps: int = 50
    dit_guidance: float = 4.0
    dit_batches: tuple[int, ...] = (8, 32)
    dit_calibration_runs: int = 4
    flux: dict = field(default_factory=lambda: dict(FLUX_DEV))
    flux_steps: int = 28
    flux_size: int = 1024
    flux_text_tokens: int = 512
    flux_calibration_runs: int = 1  # one FLUX.1-dev generation is seconds even on an H200; ten make a calibration
    repeats: int = 3
    forecast_speedup: float = 3.0
    compile_backend: str = "inductor"
    budget_s: float = 480.0


SMOKE = CheckConfig(
    smoke=True, device="cpu", dtype="float32", dit=TINY_DIT, dit_steps=6, dit_batches=(2,), dit_calibration_runs=1,
    flux=TINY_FLUX, flux_steps=5, flux_size=64, flux_text_tokens=8, flux_calibration_runs=1, repeats=1,
    # dynamo's capture, guards and recompile counters without inductor's codegen, which would take minutes on CPU
    compile_backend="eager",
)  # fmt: skip


@dataclass
class Row:
    name: str
    kind: str  # uncached | invardiff-paper | invardiff-forecast | diffusers
    policy: Any
    plan: Any = None  # InvarDiff rows: the plan, for the computed cache bytes
    note: str = ""


@dataclass
class Group:
    model: str
    generator: Any
    batch: int
    compiled: bool
    rows: list[Row]


# ----------------------------------------------------------------------------------------------------------------
# Building the models


def build_dit(config: CheckConfig):
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from pipelines.build import DTYPES
    from pipelines.dit import DitGenerator
    from pipelines.tiny import LATENT_DIT_SCHEDULER_CONFIG

    transformer = _random_init(lambda: DiTTransformer2DModel(**config.dit), config)
    return DitGenerator(
        transformer,
        DDIMScheduler(**LATENT_DIT_SCHEDULER_CONFIG),
        num_classes=config.dit["num_embeds_ada_norm"],
        model_id="random-init:DiT-XL-2-256" if not config.smoke else "random-init:tiny-dit",
        fingerprint=_config_fingerprint("dit", config.dit),
        num_inference_steps=config.dit_steps,
        guidance_scale=config.dit_guidance,
        device=config.device,
        dtype=DTYPES[config.dtype],
    )


def build_flux(config: CheckConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from pipelines.flux import FLUX_SCHEDULER_CONFIG, FluxGenerator

    transformer = _random_init(lambda: FluxTransformer2DModel(**config.flux), config)
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip
    return FluxGenerator(
        pipeline,
        num_inference_steps=config.flux_steps,
        height=config.flux_size,
        width=config.flux_size,
        max_sequence_length=config.flux_text_tokens,
        model_id="random-init:FLUX.1-dev-shaped" if not config.smoke else "random-init:tiny-flux",
        device=config.device,
        # Hashing 24 GB of random weights would cost a minute and identify nothing: the config and seed do.
        model_fingerprint=_config_fingerprint("flux", config.flux),
    )


def _random_init(make: Callable[[], torch.nn.Module], config: CheckConfig) -> torch.nn.Module:
    """A model built straight on the device in the target dtype: FLUX.1-dev in float32 on the host would be 48 GB
    and a minute of CPU init."""
    from pipelines.build import DTYPES

    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_default_dtype(DTYPES[config.dtype])
        try:
            with torch.device(config.device):
                model = make().eval()
        finally:
            torch.set_default_dtype(previous)
    # Buffers a constructor makes in float32 whatever the default (positional tables) follow the weights. Cast here
    # rather than with `model.to(dtype)`, which makes diffusers 0.42 warn about fp32-pinned modules it does not have.
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(DTYPES[config.dtype])
    return model


def _config_fingerprint(architecture: str, model_config: dict) -> str:
    import hashlib

    text = json.dumps({"architecture": architecture, "config": model_config, "seed": 0}, sort_keys=True, default=list)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Plans


def published_gate(name: str, num_steps: int) -> tuple[np.ndarray, str]:
    """The published step gate (method doc §4.6) at `num_steps`: itself when the lengths match, else sampled at the
    same relative positions (smoke runs use few steps), with a note saying which."""
    bits = np.array([c == "1" for c in PAPER_STEP_GATES[name]])
    if len(bits) == num_steps:
        return bits, f"published {name} step gate"
    index = np.minimum((np.arange(num_steps) * len(bits)) // num_steps, len(bits) - 1)
    return bits[index], f"published {name} step gate resampled from {len(bits)} to {num_steps} steps"


# FLUX fast (method doc §4.6): outside the gated rows, every dual and single module is reused in rows 23-26 (of 28),
# and nowhere else; that is the 75 % module-reuse share per family the shipped JSON has (17 gated + 4 of 28).
FLUX_FAST_REUSED_ROWS = (23, 24, 25, 26)


def paper_plan(generator, name: str):
    """InvarDiff paper mode from a published step gate. Module books: the published FLUX fast book is fully
    described by §4.6 and is rebuilt; for DiT §4.6 gives only shares and partial rows, so its books compute every
    module on every non-gated step (the row's note says so)."""
    from invardiff.plan import Plan
    from invardiff.presets import get_preset

    signature = generator.signature()
    steps = signature.num_inference_steps
    gate, note = published_gate(name, steps)
    modules = {family: np.repeat(gate[:, None], n, axis=1) for family, n in signature.layers.items()}
    if name == "flux-fast" and steps == len(PAPER_STEP_GATES[name]):
        for family in modules:
            modules[family][list(FLUX_FAST_REUSED_ROWS)] = True
        note += "; module books as published (rows 23-26 reuse every module)"
    else:
        note += "; module books: compute every module on non-gated steps (published books not available)"
    preset = get_preset(signature.architecture, f"paper-{name}")
    plan = Plan.from_books(
        signature, (gate, modules), taus=preset["taus"], nonskip_rate=preset["nonskip_rate"],
        calibration={"method": "published-step-gate", "source": f"method-invardiff.md §4.6 {name}", "note": note},
    )  # fmt: skip
    return plan, note


def forecast_plan(generator, config: CheckConfig, runs: int, say: Callable[[str], None]):
    """Our forecast plan, calibrated here on `runs` seeds (no held-out check: the timing does not need it)."""
    from pipelines.calibration import calibration_requests
    from pipelines.forecast_calibration import ForecastTarget, calibrate_forecast

    requests = calibration_requests(generator, runs=runs)
    started = time.perf_counter()
    plan = calibrate_forecast(
        generator, ForecastTarget(speedup=config.forecast_speedup), requests, held_out=0, batch_size=len(requests)
    )
    seconds = time.perf_counter() - started
    say(f"forecast plan {plan.plan_id}: {plan.forecast['target']}, orders {plan.forecast['orders']} ({seconds:.1f} s)")
    computed = plan.forecast_schedule.num_computed
    note = (f"forecast {plan.forecast['target']}, {computed}/{plan.num_steps} steps computed, calibrated here on "
            f"{runs} run(s) in {seconds:.1f} s")  # fmt: skip
    return plan, note


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs


def family_flops(architecture: str, model_config: dict, image_tokens: int, text_tokens: int = 0) -> dict[str, float]:
    """FLOPs of one evaluation of each module family, per sample: linear layers and attention matmuls, 2 FLOPs per
    multiply-add. Embeddings, norms and adaLN modulation are not counted (under 2 % at these sizes); FLUX's single
    block `proj_out` (concat(attn, mlp) -> D) is booked with `single_mlp`. For DiT-XL/2 at 256² the sum is 236.8
    GFLOP, i.e. 118.4 G multiply-adds: the DiT paper's 118.6 "Gflops" (fvcore counts multiply-adds, and the
    embeddings and adaLN this leaves out)."""
    d = model_config["num_attention_heads"] * model_config["attention_head_dim"]
    if architecture == "dit":
        n = image_tokens
        return {"attn": 8 * n * d * d + 4 * n * n * d, "ff": 16 * n * d * d}
    n = image_tokens + text_tokens
    return {
        "attn": 8 * image_tokens * d * d + 4 * n * n * d,  # q, k, v, out of the image stream; the joint attention
        "context_attn": 8 * text_tokens * d * d,  # q, k, v, out of the text stream (same call)
        "ff": 16 * image_tokens * d * d,
        "context_ff": 16 * text_tokens * d * d,
        "single_attn": 6 * n * d * d + 4 * n * n * d,
        "single_mlp": 8 * n * d * d + 10 * n * d * d,  # proj_mlp (D -> 4D) + proj_out (5D -> D)
    }


def dit_tokens(model_config: dict) -> int:
    return (model_config["sample_size"] // model_config["patch_size"]) ** 2


def flux_image_tokens(size: int) -> int:
    return (size // 16) ** 2  # VAE /8, then 2x2 latent packing


def model_flops(group: Group) -> tuple[dict[str, float], int]:
    """(FLOPs per evaluation per sample, samples per transformer call) for a group's model and batch."""
    generator = group.generator
    if generator.architecture == "dit":
        config = dict(generator.transformer.config)
        samples = group.batch * (2 if generator.uses_cfg else 1)
        return family_flops("dit", config, dit_tokens(config)), samples
    config = dict(generator.transformer.config)
    tokens = flux_image_tokens(generator.height)
    return family_flops("flux", config, tokens, generator.max_sequence_length), group.batch


# ----------------------------------------------------------------------------------------------------------------
# Cache bytes: from the plan and the shapes, and as held


def site_bytes(generator, batch: int) -> tuple[list[int], int]:
    """(bytes of each cache site's output, in the runtime's site order; bytes of H) for one transformer call."""
    from invardiff.adapters import get_adapter

    transformer = generator.transformer
    config = transformer.config
    element = torch.empty((), dtype=transformer.dtype).element_size()
    d = config.num_attention_heads * config.attention_head_dim
    if generator.architecture == "dit":
        rows = batch * (2 if generator.uses_cfg else 1)
        h = rows * dit_tokens(dict(config)) * d * element
        return [h for _ in get_adapter(transformer).cache_sites(transformer)], h
    image, text = flux_image_tokens(generator.height), generator.max_sequence_length
    per_family = {
        ("attn", "context_attn"): (image + text) * d,  # the image and the text stream's outputs, one tuple
        ("ff",): image * d,
        ("context_ff",): text * d,
        ("single_attn",): (image + text) * d,
        ("single_mlp",): (image + text) * 4 * d,  # proj_mlp's output, 4x wide (FluxSingleTransformerBlock)
    }
    sizes = [per_family[site.families] * batch * element for site in get_adapter(transformer).cache_sites(transformer)]
    return sizes, batch * image * d * element


def computed_cache_bytes(generator, plan, batch: int) -> int:
    """The most bytes the plan keeps between two steps, from the runtime's own schedule and the output shapes:
    paper mode holds H and each kept slot; forecast mode holds the last value and its difference per tracked
    tensor once two steps have computed."""
    from invardiff.adapters import get_adapter
    from invardiff.runtime import build_schedule

    transformer = generator.transformer
    schedule = build_schedule(plan, get_adapter(transformer), transformer)
    sizes, h = site_bytes(generator, batch)
    peak = 0
    computed = [0] * len(sizes)  # per site: evaluations so far (forecast tracking)
    steps_computed = 0
    for k in range(schedule.num_steps - 1):  # after the last step the context is reset: nothing is held
        held = 0
        if schedule.track_residual:
            steps_computed += not schedule.gated[k]
            held += h * min(steps_computed, 2)
        elif schedule.keep_h[k]:
            held += h
        for i, site in enumerate(schedule.sites):
            if site.track:
                computed[i] += not schedule.gated[k] and not site.reuse[k]
                held += sizes[i] * min(computed[i], 2)
            elif site.keep[k]:
                held += sizes[i]
        peak = max(peak, held)
    return peak


def published_plan_cache_bytes(config: CheckConfig) -> list[dict]:
    """Cache bytes per image of the published paper plans at the full check's shapes (DiT-XL/2 256², CFG batched;
    FLUX.1-dev 1024²), in `config.dtype`, from shapes alone: the models are built on the meta device (no weights,
    no device needed) and `computed_cache_bytes` walks the runtime's schedule. The device run then shows the same
    figure next to what the cache contexts held and the allocator's peak."""
    full = replace(CheckConfig(), dtype=config.dtype, device="meta")
    figures = []
    for build, names in ((build_dit, ("dit-fast", "dit-slow")), (build_flux, ("flux-fast",))):
        generator = build(full)
        for name in names:
            plan, note = paper_plan(generator, name)
            figures.append({
                "model": generator.model_id.replace("random-init:", ""), "plan": f"InvarDiff paper {name}",
                "dtype": full.dtype, "cache_bytes_per_image": computed_cache_bytes(generator, plan, 1), "note": note,
            })  # fmt: skip
    return figures


class HeldBytes:
    """The most bytes InvarDiff's cache contexts hold between steps (`invardiff_cache_contents` after each call)."""

    def __init__(self, transformer) -> None:
        from invardiff._hookutils import unwrap

        self.peak = 0
        self._handle = unwrap(transformer).register_forward_hook(self._after_call)
        self._transformer = transformer

    def _after_call(self, module, args, output) -> None:
        from invardiff import invardiff_cache_contents

        held = sum(c["bytes"] for c in invardiff_cache_contents(self._transformer).values())
        self.peak = max(self.peak, held)

    def close(self) -> None:
        self._handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# Compilation


class CompileRecord:
    """Dynamo's frame and graph counters over a span, and whether it gave up on a frame (recompile limit hit:
    that code runs eagerly from then on)."""

    def __init__(self) -> None:
        self.limit_hits: list[str] = []
        self._handler = _LimitHandler(self.limit_hits)

    def __enter__(self) -> "CompileRecord":
        from torch._dynamo.utils import counters

        self._start = self._snapshot(counters)
        logging.getLogger("torch._dynamo").addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        from torch._dynamo.utils import counters

        logging.getLogger("torch._dynamo").removeHandler(self._handler)
        end = self._snapshot(counters)
        self.frames, self.graphs, self.graph_breaks = (end[i] - self._start[i] for i in range(3))

    @staticmethod
    def _snapshot(counters) -> tuple[int, int, int]:
        return (counters["frames"]["total"], counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))


class _LimitHandler(logging.Handler):
    def __init__(self, hits: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.hits = hits

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message:
            self.hits.append(message.splitlines()[0])


def compile_regions(transformer, row: Row, backend: str) -> str:
    """Uncached rows: every block compiled whole. InvarDiff rows (plan attached): `invardiff.compile_blocks`, the
    computation compiled and the plan's per-step decisions left eager, so nothing recompiles from step to step."""
    if row.plan is not None:
        from invardiff import compile_blocks as compile_under_plan

        compile_under_plan(transformer, backend=backend)
        return "invardiff.compile_blocks"
    compile_blocks(transformer, backend)
    return "block.compile()"


def compile_blocks(transformer, backend: str) -> int:
    """Regional compilation: `block.compile()` on every transformer block, what diffusers' `compile_repeated_blocks`
    does (DiT declares no `_repeated_blocks`, so the blocks are named here). Returns how many were compiled."""
    from invardiff._hookutils import unwrap

    transformer = unwrap(transformer)
    blocks = list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def uncompile_blocks(transformer) -> None:
    from invardiff._hookutils import unwrap

    for module in unwrap(transformer).modules():
        module._compiled_call_impl = None


# ----------------------------------------------------------------------------------------------------------------
# Running a group


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds


def generate(generator, requests):
    from invardiff._hookutils import cache_context

    if generator.architecture == "dit":  # our DiT loop sets no cache context; diffusers' stateful hooks need one
        with cache_context(generator.transformer, "cond"):
            return generator.generate(requests)
    return generator.generate(requests)


def timed(generator, requests) -> float:
    synchronize = torch.cuda.synchronize if generator.device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    generate(generator, requests)
    synchronize()
    return time.perf_counter() - started


def run_row(group: Group, row: Row, requests, repeats: int, backend: str) -> dict:
    """Attach, warm up (memory, cache bytes, counts, compiles), time `repeats` generations, detach."""
    generator = group.generator
    transformer = generator.transformer
    cuda = generator.device.type == "cuda"
    record: dict[str, Any] = {}
    row.policy.attach(transformer)
    if group.compiled:
        torch._dynamo.reset()  # this row's compiles are its own, and a frame one row gave up on is not given up here
        record["compiled_regions"] = compile_regions(transformer, row, backend)
    held = HeldBytes(transformer) if row.plan is not None else None
    try:
        row.policy.reset(transformer)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with CompileRecord() as warm:
            record["warmup_s"] = timed(generator, requests)
        stats = row.policy.stats(transformer)
        record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else None
        if held is not None:
            record["cache_bytes_measured"] = held.peak
            held.close()
            held = None
        times = []
        with CompileRecord() as steady:
            for _ in range(repeats):
                row.policy.reset(transformer)
                times.append(timed(generator, requests))
    finally:
        if held is not None:
            held.close()
        row.policy.reset(transformer)
        row.policy.detach(transformer)
        if group.compiled:
            uncompile_blocks(transformer)
    record["seconds"] = times
    record["module_evals_computed"] = int(stats.module_evals_computed)
    record["per_family_computed"] = {f: int(c) for f, (c, _) in stats.per_family.items()}
    if group.compiled:
        record["compile"] = {
            "regions": record.pop("compiled_regions"),
            "warmup_frames_compiled": warm.frames,
            "warmup_graphs": warm.graphs,
            "graph_breaks": warm.graph_breaks + steady.graph_breaks,
            "recompiles_timed": steady.frames,  # a static plan compiles during the warm-up and never again
            "fell_back_to_eager": bool(warm.limit_hits or steady.limit_hits),
            "limit_hits": warm.limit_hits + steady.limit_hits,
        }
    return record


def summarise(group: Group, row: Row, record: dict, baseline: dict, peak_tflops: float | None) -> dict:
    median = statistics.median(record["seconds"])
    base = statistics.median(baseline["seconds"])
    speedup = base / median
    counted = baseline["module_evals_computed"] / max(record["module_evals_computed"], 1)
    per_eval, samples = model_flops(group)
    flops = sum(per_eval[f] * n * samples for f, n in record["per_family_computed"].items())
    tflops = flops / median / 1e12
    out = {
        "model": group.model,
        "batch": group.batch,
        "compiled": group.compiled,
        "method": row.name,
        "kind": row.kind,
        "note": row.note,
        "ms_per_image": 1e3 * median / group.batch,
        "images_per_s": group.batch / median,
        "speedup": speedup,
        "counted_speedup": counted,
        "efficiency": speedup / counted,
        "seconds": record["seconds"],
        "warmup_s": record["warmup_s"],
        "module_evals_computed": record["module_evals_computed"],
        "tflop_per_batch": flops / 1e12,
        "achieved_tflops": tflops,
        "fraction_of_bf16_peak": tflops / peak_tflops if peak_tflops else None,
        "peak_memory_bytes": record["peak_memory_bytes"],
        "peak_memory_over_uncached_bytes": (
            record["peak_memory_bytes"] - baseline["peak_memory_bytes"] if record["peak_memory_bytes"] is not None else None
        ),
    }
    if row.plan is not None:
        out["cache_bytes_per_image_computed"] = computed_cache_bytes(group.generator, row.plan, group.batch) / group.batch
        out["cache_bytes_per_image_measured"] = record["cache_bytes_measured"] / group.batch
    if "compile" in record:
        out["compile"] = record["compile"]
    return out


def run_group(group: Group, config: CheckConfig, budget: Budget, say) -> tuple[list[dict], list[dict]]:
    """Rows and skips of one group. The uncached row runs first: it is every other row's reference, and its time
    estimates theirs for the budget (a compiled row adds its warm-up, whose compile the estimate cannot know)."""
    from benchmarks.bench import requests_for

    requests = requests_for(group.generator, group.batch)
    rows, skipped = [], []
    baseline = None
    label = f"{group.model} batch {group.batch}{' compiled' if group.compiled else ''}"
    for row in group.rows:
        runs = config.repeats + 1
        estimate = (statistics.median(baseline["seconds"]) * runs if baseline else 0.0) + (
            baseline["warmup_s"] if baseline and group.compiled else 0.0
        )
        reason = None if budget.allows(estimate) else f"time budget ({budget.seconds:.0f} s)"
        if reason is None:
            say(f"{label}: {row.name}")
            try:
                record = run_row(group, row, requests, config.repeats, config.compile_backend)
            except Exception as error:  # one device run must bring back every other row; the table names the failure
                reason = f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                if group.generator.device.type == "cuda":
                    torch.cuda.empty_cache()
        if reason is not None:
            skipped.append({"group": label, "method": row.name, "reason": reason})
            if baseline is None:  # without the reference no row of the group means anything
                skipped += [{"group": label, "method": r.name, "reason": "its uncached reference was not run"}
                            for r in group.rows[1:]]  # fmt: skip
                break
            continue
        baseline = baseline or record
        rows.append(summarise(group, row, record, baseline, peak_bf16_tflops(group.generator.device)))
    return rows, skipped


# ----------------------------------------------------------------------------------------------------------------
# The check


def peak_bf16_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def dit_rows(generator, config: CheckConfig, say) -> tuple[list[Row], list[Row]]:
    """(eager rows, compiled rows) for DiT; the compiled set is uncached and the InvarDiff plans."""
    from benchmarks import peers
    from invardiff.policy import InvarDiffPolicy, NoCache
    from pipelines.calibration import calibration_requests

    rows = [Row("uncached", "uncached", NoCache())]
    for name in ("dit-fast", "dit-slow"):
        plan, note = paper_plan(generator, name)
        rows.append(Row(f"InvarDiff paper {name.removeprefix('dit-')}", "invardiff-paper", InvarDiffPolicy(plan), plan, note))
    plan, note = forecast_plan(generator, config, config.dit_calibration_runs, say)
    rows.append(Row(f"InvarDiff forecast {config.forecast_speedup:g}x", "invardiff-forecast", InvarDiffPolicy(plan), plan, note))
    compiled = list(rows)  # diffusers' caches decide per step from tensor values: they are not compiled here
    ratios = peers.mag_ratios(generator, calibration_requests(generator, runs=config.dit_calibration_runs))
    steps = generator.num_inference_steps
    for policy in (peers.taylorseer(3, architecture="dit"), peers.first_block_cache(0.1), peers.mag_cache(0.12, ratios, steps)):
        rows.append(Row(policy.name, "diffusers", policy))
    rows[-1].note = f"magnitude ratios from {config.dit_calibration_runs} uncached runs here"
    return rows, compiled


def flux_rows(generator, config: CheckConfig, say) -> list[Row]:
    from invardiff.policy import InvarDiffPolicy, NoCache

    plan, note = paper_plan(generator, "flux-fast")
    rows = [Row("uncached", "uncached", NoCache()), Row("InvarDiff paper fast", "invardiff-paper", InvarDiffPolicy(plan), plan, note)]
    plan, note = forecast_plan(generator, config, config.flux_calibration_runs, say)
    rows.append(Row(f"InvarDiff forecast {config.forecast_speedup:g}x", "invardiff-forecast", InvarDiffPolicy(plan), plan, note))
    return rows


def png_encoding_on_host(config: CheckConfig) -> list[dict]:
    """What a GPU actor's PNG encoding costs on this machine's CPUs (pipelines/png.py on 256x256 RGB, DiT-XL/2's
    image size): per image on one thread and on the threads a GPU actor encodes on, which jobs/generate.py
    sized from an estimate (GPU_ACTOR_MAX_CPUS)."""
    from benchmarks.png_encoding import measure, realistic_images
    from jobs.generate import GPU_ACTOR_MAX_CPUS
    from pipelines.png import encode_pngs

    size, images, min_cpu_s = (32, 8, 0.05) if config.smoke else (256, 32, 1.0)
    batch = realistic_images(images, size, size, 3)
    figures = []
    for threads in sorted({1, GPU_ACTOR_MAX_CPUS}):
        m = measure(lambda b, t=threads: encode_pngs(b, threads=t), batch, min_cpu_s)
        figures.append({"image": f"{size}x{size} RGB", "threads": threads, "wall_ms_per_image": m["wall_us"] / 1e3,
                        "cpu_ms_per_image": m["cpu_us"] / 1e3, "bytes_per_image": m["bytes"]})
    return figures


def run_check(config: CheckConfig, out: Path, *, command: str = "", say: Callable[[str], None] = print) -> dict:
    budget = Budget(config.budget_s)
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:  # timestamped: the device run's log is all a later session sees of its pace
        say(f"[{budget.elapsed():4.0f} s] {message}")

    results: list[dict] = []
    skipped: list[dict] = []
    notes: list[str] = []
    host = {"png_encoding": png_encoding_on_host(config)}  # seconds of CPU, before the device work

    def run(groups: list[Group]) -> None:
        for group in groups:
            rows, skips = run_group(group, config, budget, log)
            results.extend(rows)
            skipped.extend(skips)
            write(out, report(config, command, budget, results, skipped, notes, host))  # a killed run keeps what it did

    # Order: what the targets need first (DiT batch 8, FLUX), then DiT batch 32, then the compiled rows, whose
    # compile time is the least predictable. Both models stay on the device (1.4 + 24 GB in bf16).
    cache_figures = published_plan_cache_bytes(config)
    notes.extend(
        f"cache bytes per image from shapes, {f['model']} {f['plan']} ({f['dtype']}): {f['cache_bytes_per_image']:,}"
        for f in cache_figures
    )
    dit = build_dit(config)
    dit_eager, dit_compiled = dit_rows(dit, config, log)
    run([Group(dit.model_id, dit, config.dit_batches[0], False, dit_eager)])
    flux = build_flux(config) if budget.allows(0.0) else None
    if flux is None:
        notes.append("FLUX not built: the time budget was spent")
    else:
        flux_eager = flux_rows(flux, config, log)
        run([Group(flux.model_id, flux, 1, False, flux_eager)])
    run([Group(dit.model_id, dit, b, False, dit_eager) for b in config.dit_batches[1:]])
    run([Group(dit.model_id, dit, config.dit_batches[0], True, dit_compiled)])
    if flux is not None:
        run([Group(flux.model_id, flux, 1, True, flux_eager)])

    result = report(config, command, budget, results, skipped, notes, host)
    write(out, result)
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {budget.elapsed():.0f} s")
    return result


def report(config: CheckConfig, command: str, budget: Budget, results, skipped, notes, host) -> dict:
    return {
        "format": "invardiff-gpu-check/1",
        "config": asdict(config),
        "environment": environment(config, command, budget.elapsed()),
        "flops": "analytic per-evaluation FLOPs of each module family (benchmarks.gpu_check.family_flops: linear layers "
        "and attention matmuls, 2 FLOPs per multiply-add) x the evaluations that ran; DiT-XL/2 256² is 236.8 GFLOP "
        "per sample per forward (the DiT paper's 118.6 Gflops counts multiply-adds)",
        "rows": results,
        "host": host,
        "skipped": skipped,
        "notes": notes + NOTES,
    }


def write(out: Path, result: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(result))


NOTES = [
    "Random weights at the real configs: speed, memory and counts are real; images are noise, so no fidelity.",
    "FLUX rows are transformer only: random prompt embeddings of T5 (512 tokens) and CLIP shapes, no text encoders, "
    "no VAE decode.",
    "DiT InvarDiff paper rows use the published step gates; their module books compute every module on non-gated "
    "steps (the published DiT books are not available). FLUX fast uses the published gate and books.",
    "Compiled rows: uncached, every transformer block compiled (block.compile(), as diffusers' "
    "compile_repeated_blocks); InvarDiff, invardiff.compile_blocks (computation compiled, plan decisions eager); "
    "dynamo reset before each row; recompiles_timed counts compiles during the timed runs, after the warm-up.",
]


def environment(config: CheckConfig, command: str, seconds: float) -> dict:
    import diffusers

    device = torch.device(config.device)
    return {
        "command": command,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "bf16_peak_tflops": peak_bf16_tflops(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "seconds": seconds,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# GPU check on {env['device']}",
        "",
        f"`{env['command']}` · torch {env['torch']} · diffusers {env['diffusers']} · {env['seconds']:.0f} s",
        "",
        "| model | batch | compiled | method | ms/image | images/s | speedup | counted | efficiency | TFLOP/s | of peak"
        " | peak mem GiB | cache B/image computed | measured | recompiles (timed) | eager fallback |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c = r.get("compile", {})
        mem = r["peak_memory_bytes"] / 2**30 if r["peak_memory_bytes"] is not None else None
        lines.append(
            f"| {r['model']} | {r['batch']} | {'yes' if r['compiled'] else 'no'} | {r['method']} | {r['ms_per_image']:.2f}"
            f" | {r['images_per_s']:.2f} | {r['speedup']:.2f}x | {r['counted_speedup']:.2f}x | {r['efficiency']:.2f}"
            f" | {r['achieved_tflops']:.3g} | {_fmt(r['fraction_of_bf16_peak'], '.0%')} | {_fmt(mem, '.1f')}"
            f" | {_fmt(r.get('cache_bytes_per_image_computed'), ',.0f')} | {_fmt(r.get('cache_bytes_per_image_measured'), ',.0f')}"
            f" | {c.get('recompiles_timed', '—')} | {c.get('fell_back_to_eager', '—')} |"
        )
    lines += ["", f"FLOPs: {result['flops']}.", ""]
    lines += [f"- PNG encoding on the host, {e['image']}, {e['threads']} thread(s): {e['wall_ms_per_image']:.2f} ms per "
              f"image wall, {e['cpu_ms_per_image']:.2f} ms CPU, {e['bytes_per_image']:,.0f} bytes"
              for e in result.get("host", {}).get("png_encoding", [])]
    lines += [f"- {r['model']} {r['method']}: {r['note']}" for r in result["rows"] if r["note"] and not r["compiled"]]
    if result["skipped"]:
        lines += ["", "Not run:"] + [f"- {s['group']}: {s['method']} ({s['reason']})" for s in result["skipped"]]
    lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--smoke", action="store_true", help="shrunken models on CPU, for CI")
    parser.add_argument("--budget-s", type=float, default=None, help="hard time budget; rows that no longer fit are skipped")
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per row")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("give --out or set $OUT")
    config = SMOKE if args.smoke else CheckConfig()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the full check needs a GPU (--smoke runs on CPU)")
    overrides = {k: v for k, v in (("budget_s", args.budget_s), ("repeats", args.repeats)) if v is not None}
    config = replace(config, **overrides)
    if config.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    command = " ".join(["python -m benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    return run_check(config, Path(args.out), command=command)


if __name__ == "__main__":
    main()
