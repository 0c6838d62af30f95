"""The caching methods InvarDiff is benchmarked against, each behind the `CachePolicy` shape
(`name`, `plan_id`, `attach`, `detach`, `reset`, `stats`) so the harness drives every method the same way.

Nothing here trusts a method's own bookkeeping for the speedup: `ModuleCounter` counts the attention and
feed-forward evaluations that really run, with plain torch pre-hooks on each cached module's first Linear. A
method that returns a cached output never reaches that Linear, whichever hook framework it wraps the module with.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from invardiff._hookutils import unwrap
from invardiff.adapters import get_adapter
from invardiff.runtime import CacheStats

# --------------------------------------------------------------------------------------------------------------
# Counting what runs.


class ModuleCounter:
    """Counts real evaluations per module family (calls, not rows: every method sees the same batch shape)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._handles: list[Any] = []

    def attach(self, transformer: torch.nn.Module) -> "ModuleCounter":
        """Attach before any cache whose hooks sit on a bare-Linear site (FLUX's proj_mlp): see `_CountedForward`."""
        transformer = unwrap(transformer)
        for site in get_adapter(transformer).cache_sites(transformer):
            linear = next(m for m in site.module.modules() if isinstance(m, torch.nn.Linear))
            for family in site.families:
                self.counts.setdefault(family, 0)
            if linear is site.module:
                self._handles.append(_CountedForward(linear, self._hook(site.families)))
            else:
                self._handles.append(linear.register_forward_pre_hook(self._hook(site.families)))
        return self

    def _hook(self, families: tuple[str, ...]) -> Callable:
        def count(module, args):
            for family in families:
                self.counts[family] += 1

        return count

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)

    def total(self) -> int:
        return sum(self.counts.values())


class _CountedForward:
    """Counts the calls that run a Linear's own forward. A site that is itself a Linear is where a cache hooks in,
    and a forward pre-hook fires before the cache's replaced forward, so it would count the calls the cache answers
    too; this wrapper sits beneath every hook registered after it and counts only real evaluations."""

    def __init__(self, linear: torch.nn.Linear, count: Callable) -> None:
        self._linear, self._count = linear, count
        self._had_forward, self._forward = "forward" in linear.__dict__, linear.forward
        self.active = True

        def counted(*args, **kwargs):
            if self.active:
                count(linear, args)
            return self._forward(*args, **kwargs)

        self._counted = counted
        linear.forward = counted

    def remove(self) -> None:
        self.active = False
        if self._linear.__dict__.get("forward") is self._counted:  # nothing wrapped it since: restore
            if self._had_forward:
                self._linear.forward = self._forward
            else:
                del self._linear.forward


class _CountedPolicy:
    """Stats from counted module evaluations, for methods that keep no comparable bookkeeping of their own."""

    plan_id = None

    def __init__(self) -> None:
        self._counter = ModuleCounter()
        self._full_per_call: dict[str, int] = {}

    def _attach_counter(self, transformer) -> None:
        self._counter.attach(transformer)
        self._full_per_call = get_adapter(unwrap(transformer)).layers(unwrap(transformer))

    def detach(self, transformer) -> None:
        self._counter.detach()

    def reset(self, transformer) -> None:
        self._counter.reset()

    def stats(self, transformer) -> CacheStats:
        counts = self._counter.counts
        per_family = {family: (counts.get(family, 0), 0) for family in self._full_per_call}
        computed = sum(counts.values())
        return CacheStats(module_evals_computed=computed, per_family=per_family)


# --------------------------------------------------------------------------------------------------------------
# diffusers' built-in cache hooks.


class DiffusersHookPolicy(_CountedPolicy):
    """One of diffusers' `apply_*` caches. DiT is no `CacheMixin`, so it has no `enable_cache`/`disable_cache`:
    hooks are applied and removed by name, and state is cleared with `reset_stateful_hooks` between generations
    (the harness also sets the cache context DiT's sampler never sets)."""

    def __init__(self, name: str, apply: Callable[[torch.nn.Module], None], hook_names: Sequence[str]) -> None:
        super().__init__()
        self.name = name
        self._apply = apply
        self._hook_names = tuple(hook_names)

    def attach(self, transformer) -> None:
        from diffusers.hooks import HookRegistry

        transformer = unwrap(transformer)
        self._apply(transformer)
        # New hooks on descendants stale the child-registry list that `cache_context` walks (diffusers #14037):
        # without this, a peer attached after another method's cache_context fails with "No cache context is set".
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        self._attach_counter(transformer)

    def detach(self, transformer) -> None:
        from diffusers.hooks import HookRegistry

        super().detach(transformer)
        registry = HookRegistry.check_if_exists_or_initialize(unwrap(transformer))
        for hook in self._hook_names:
            registry.remove_hook(hook, recurse=True)
        registry.invalidate_child_registries_cache()

    def reset(self, transformer) -> None:
        from diffusers.hooks import HookRegistry

        super().reset(transformer)
        HookRegistry.check_if_exists_or_initialize(unwrap(transformer)).reset_stateful_hooks(recurse=True)


def first_block_cache(threshold: float) -> DiffusersHookPolicy:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

    return DiffusersHookPolicy(
        f"FirstBlockCache {threshold:g}",
        lambda t: apply_first_block_cache(t, FirstBlockCacheConfig(threshold=threshold)),
        (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
    )


# TaylorSeer's default identifiers name `attn`, not DiT's `attn1`; cache both pre-gate branches, as InvarDiff does.
DIT_TAYLORSEER_IDENTIFIERS = [r"^transformer_blocks\.\d+\.attn1", r"^transformer_blocks\.\d+\.ff"]


# diffusers' default warm-up: steps 0..2 always compute. The smallest it allows is 1 (step 0 must compute: a
# prediction needs at least one computed value).
TAYLORSEER_DEFAULT_WARMUP = 3
TAYLORSEER_MIN_WARMUP = 1


def taylorseer(
    interval: int, order: int = 1, architecture: str = "dit", warmup: int = TAYLORSEER_DEFAULT_WARMUP
) -> DiffusersHookPolicy:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    config = TaylorSeerCacheConfig(
        cache_interval=interval,
        max_order=order,
        disable_cache_before_step=warmup,
        # fp32 factors: the default bf16 would charge TaylorSeer a rounding error the fp32 model does not make.
        taylor_factors_dtype=torch.float32,
        cache_identifiers=DIT_TAYLORSEER_IDENTIFIERS if architecture == "dit" else None,
    )
    return DiffusersHookPolicy(
        f"TaylorSeer N={interval} O={order} W={warmup}",
        lambda t: apply_taylorseer_cache(t, config),
        (_TAYLORSEER_CACHE_HOOK,),
    )


def mag_cache(threshold: float, mag_ratios: Sequence[float], num_steps: int, max_skip_steps: int = 3):
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

    config = MagCacheConfig(
        threshold=threshold,
        max_skip_steps=max_skip_steps,
        num_inference_steps=num_steps,
        mag_ratios=list(mag_ratios),
    )
    return DiffusersHookPolicy(
        f"MagCache {threshold:g} K={max_skip_steps}",
        lambda t: apply_mag_cache(t, config),
        (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK),
    )


class _TimestepProbe:
    """PAB asks for the current timestep through a callback; DiT's sampler passes it to the transformer only."""

    def __init__(self) -> None:
        self.timestep = 0
        self._handle = None

    def attach(self, transformer) -> None:
        self._handle = unwrap(transformer).register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        timestep = kwargs.get("timestep")
        if timestep is not None:
            self.timestep = int(timestep.flatten()[0]) if torch.is_tensor(timestep) else int(timestep)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def pyramid_attention_broadcast(skip_range: int, timestep_range: tuple[int, int] = (100, 800)) -> DiffusersHookPolicy:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    probe = _TimestepProbe()

    def apply(transformer):
        probe.attach(transformer)
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=timestep_range,
            current_timestep_callback=lambda: probe.timestep,
        )
        apply_pyramid_attention_broadcast(transformer, config)

    policy = DiffusersHookPolicy(
        f"PAB attn every {skip_range}, t in {timestep_range}", apply, (_PYRAMID_ATTENTION_BROADCAST_HOOK,)
    )
    detach = policy.detach
    policy.detach = lambda t: (probe.detach(), detach(t))  # type: ignore[method-assign]
    return policy


# FasterCache's denoiser hook splits [uncond, cond] halves of keyword inputs; our DiT sampler batches [cond, uncond]
# and passes the latents positionally, so it would approximate the conditional branch from the wrong half.
FASTERCACHE_UNSUPPORTED = (
    "not run: FasterCache assumes the batch is [uncond, cond] and that inputs arrive as keywords; our DiT sampler "
    "batches [cond, uncond] with positional latents (its attention reuse alone is PAB, which is in the table)"
)


# --------------------------------------------------------------------------------------------------------------
# cache-dit.


def cache_dit_unavailable() -> str | None:
    # cache-dit logs every enable/disable at info/warning; the harness toggles it once per batch.
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    try:
        import cache_dit  # noqa: F401
    except ImportError as error:
        return f"not run: cache-dit is not installed ({error}); `pip install -e '.[bench]'`"
    return None


class CacheDitDBCache(_CountedPolicy):
    """cache-dit's DBCache on a bare DiT transformer (its own DiT adapter needs a `DiTPipeline`).
    `refresh_context` between generations: its context otherwise carries the last residuals into the next batch."""

    def __init__(self, threshold: float, num_steps: int, fn: int = 1, bn: int = 0, warmup: int = 4) -> None:
        super().__init__()
        self.name = f"cache-dit DBCache F{fn}B{bn} W{warmup} r={threshold:g}"
        self.num_steps = num_steps
        self._config = dict(
            Fn_compute_blocks=fn,
            Bn_compute_blocks=bn,
            residual_diff_threshold=threshold,
            max_warmup_steps=warmup,
            num_inference_steps=num_steps,
            enable_separate_cfg=False,  # CFG is batched into one call per step
        )
        self._adapter = None

    def attach(self, transformer) -> None:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        transformer = unwrap(transformer)
        self._adapter = BlockAdapter(
            transformer=transformer,
            blocks=transformer.transformer_blocks,
            forward_pattern=ForwardPattern.Pattern_3,
            patch_functor=DiTPatchFunctor(),
            check_forward_pattern=True,
        )
        cache_dit.enable_cache(self._adapter, cache_config=DBCacheConfig(**self._config))
        self._attach_counter(transformer)

    def detach(self, transformer) -> None:
        import cache_dit

        super().detach(transformer)
        cache_dit.disable_cache(self._adapter)
        self._adapter = None

    def reset(self, transformer) -> None:
        import cache_dit

        super().reset(transformer)
        cache_dit.refresh_context(unwrap(transformer), num_inference_steps=self.num_steps)


# --------------------------------------------------------------------------------------------------------------
# Simple baselines as static plans, executed by the InvarDiff runtime.


def interval_plan(signature, interval: int, *, granularity: str = "step"):
    """Compute every `interval`-th step (0, k, 2k, ...) and reuse in between.

    granularity "step": the step gate reuses the whole block stack's output H (InvarDiff's step reuse, fixed).
    granularity "module": every attention and feed-forward output is reused, the rest of each block runs (FORA).
    """
    from invardiff.plan import Plan

    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    steps = signature.num_inference_steps
    reuse = np.arange(steps) % interval != 0
    if granularity == "step":
        step_gate, modules = reuse, {f: np.zeros((steps, n), bool) for f, n in signature.layers.items()}
    elif granularity == "module":
        step_gate = np.zeros(steps, bool)
        modules = {f: np.repeat(reuse[:, None], n, axis=1) for f, n in signature.layers.items()}
    else:
        raise ValueError(f"granularity must be 'step' or 'module', got {granularity!r}")
    zero = {"step": 0.0, **dict.fromkeys(signature.layers, 0.0)}
    return Plan.from_books(
        signature,
        (step_gate, modules),
        taus=zero,
        nonskip_rate=0.0,
        calibration={"method": f"fixed-interval-{granularity}", "interval": interval},
    )


def uniform_forecast_plan(signature, num_computed: int, target: str):
    """The "uniform spacing + first-order forecast" baseline: computed steps evenly spaced from step 0, every gated
    step forecast linearly from the last two (copied where only one exists). A calibrated schedule must beat it."""
    from invardiff.forecast import uniform_schedule
    from invardiff.plan import Plan

    schedule = uniform_schedule(signature.num_inference_steps, num_computed)
    return Plan.from_forecast(
        signature, schedule, target=target, calibration={"method": "uniform-forecast", "computed_steps": num_computed}
    )


# --------------------------------------------------------------------------------------------------------------
# MagCache ratios for a checkpoint it ships none for.


@torch.no_grad()
def mag_ratios(generator, requests) -> list[float]:
    """Per-step residual-magnitude ratios of uncached runs, by the formula of diffusers' MagCache calibrate mode:
    residual = last block output - first block input; ratio[k] = mean over tokens of |res_k| / |res_{k-1}|,
    ratio[0] = 1. (Calibrate mode prints the list and drops it; recomputing it here is the same arithmetic.)"""
    transformer = unwrap(generator.transformer)
    blocks = transformer.transformer_blocks
    residuals: list[torch.Tensor] = []
    block_input: list[torch.Tensor] = []

    def first(module, args, kwargs):
        block_input[:] = [kwargs.get("hidden_states", args[0] if args else None)]

    def last(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        residuals.append((out - block_input[0]).float())

    handles = [
        blocks[0].register_forward_pre_hook(first, with_kwargs=True),
        blocks[-1].register_forward_hook(last, with_kwargs=True),
    ]
    try:
        generator.generate(requests)
    finally:
        for handle in handles:
            handle.remove()
    ratios = [1.0]
    for prev, curr in zip(residuals, residuals[1:]):
        ratios.append(float((curr.norm(dim=-1) / (prev.norm(dim=-1) + 1e-8)).mean()))
    return ratios

