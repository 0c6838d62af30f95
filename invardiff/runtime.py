"""Hooks that execute an InvarDiff plan on a diffusers transformer (method §6: step gate first, then layer-wise).

Four kinds of small hooks, all registered through diffusers' `HookRegistry` and all replacing `forward`
(`new_forward`), because a forward hook that swaps the output does not save the compute:

* `InvarDiffStepHook` on the transformer: picks the cache context, reads the step index, decides whether the step
  is gated, runs the model, then counts the step. Per context the step counter wraps after `T` calls.
* `InvarDiffStackInputHook` on the patch embedding: on a gated step returns H from the last computed step instead
  of embedding the latent, so the reused H reaches the final norm/projection, which still runs with the current
  step's conditioning.
* `InvarDiffBlockHook` on every block of the step-gated stack: on a gated step returns its inputs unchanged; the
  last block stores H when a later step reuses it.
* `InvarDiffModuleHook` on every cacheable module: returns its slot when the plan says reuse, else computes and
  writes through when a later row reuses the value.

Forecast-mode plans (`invardiff.forecast`) fill a gated step by extrapolating from the last two computed steps
instead of copying the last one. With `target: residual` the stack input hook embeds the latent as usual and
adds the forecast residual `H - E` to it (the blocks pass through as on a paper-gated step); with
`target: modules` the blocks run and every cache site returns its forecast output. Each forecast is
`last + g * (last - previous)` of that row's own tensors with a per-step scalar `g` taken from the plan, so it is
batch-invariant and deterministic. Memory: two tensors per forecast value (the last value and its difference
to the one before), as TaylorSeer's order 1 keeps.

`invardiff.compile.compile_blocks` compiles what the block and module hooks compute (`_ComputingHook.compute`)
and leaves their decisions eager, so a static plan compiles once per shape instead of once per step.

Everything the hooks decide at run time is precomputed from the plan at `apply_invardiff` time into lists of
Python bools and floats, so the hot path makes no host-device syncs and no data-dependent branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState

from ._hookutils import (
    ContextStepHook,
    cache_context,
    check_books,
    register_hook,
    remove_hooks,
    unwrap,
)
from .adapters import CacheSite, TransformerAdapter, get_adapter

_STEP_HOOK = "invardiff_step"
_STACK_INPUT_HOOK = "invardiff_stack_input"
_BLOCK_HOOK = "invardiff_block"
_MODULE_HOOK = "invardiff_module"
HOOK_NAMES = (_STEP_HOOK, _STACK_INPUT_HOOK, _BLOCK_HOOK, _MODULE_HOOK)

__all__ = [
    "CacheStats",
    "apply_invardiff",
    "cache_context",
    "invardiff_cache_contents",
    "invardiff_stats",
    "remove_invardiff",
    "reset_invardiff",
]


@dataclass
class CacheStats:
    """What ran, accumulated since the last reset over all cache contexts (contracts.md)."""

    steps_total: int = 0
    steps_computed: int = 0
    module_evals_total: int = 0
    module_evals_computed: int = 0
    per_family: dict[str, tuple[int, int]] = field(default_factory=dict)  # family -> (computed, total)


# ----------------------------------------------------------------------------------------------------------------
# The plan, compiled into per-step decisions.


@dataclass(frozen=True)
class SiteSchedule:
    """Per step, for one cache site: whether it returns its slot, and whether the slot holds a value afterwards.
    In a modules-target forecast plan, `forecast[k]` is the gain g of a forecast step (None elsewhere) and
    `track` says the site keeps its last value and difference for forecasting."""

    reuse: list[bool]
    keep: list[bool]
    forecast: list[float | None] | None = None
    track: bool = False


@dataclass(frozen=True)
class Schedule:
    num_steps: int
    gated: list[bool]  # the step's blocks are skipped or forecast: counts as not computed
    keep_h: list[bool]  # H must be held after this step (the next step is gated)
    sites: list[SiteSchedule]
    layers: dict[str, int]
    computed_per_step: dict[str, list[int]]  # family -> module evaluations that run at each step
    skip_blocks: list[bool]  # every block passes through (paper gate, residual forecast)
    residual_gain: list[float | None]  # residual forecast: g per gated step, None elsewhere
    track_residual: bool = False


def _forecast_gains(plan: Any, num_steps: int) -> list[float | None] | None:
    from .forecast import forecast_gain

    schedule = plan.forecast_schedule
    if schedule.num_steps != num_steps:
        raise ValueError(f"plan {plan.plan_id}: forecast orders cover {schedule.num_steps} steps, the plan {num_steps}")
    return [None if schedule.compute[k] else forecast_gain(schedule, k) for k in range(num_steps)]


def build_schedule(plan: Any, adapter: TransformerAdapter, transformer: torch.nn.Module) -> Schedule:
    layers = adapter.layers(transformer)
    step_gate, books = check_books(plan.step_gate, plan.modules, layers, what=f"plan {getattr(plan, 'plan_id', '?')}")
    num_steps = len(step_gate)
    if getattr(plan, "mode", "paper") == "forecast":
        return _build_forecast_schedule(plan, adapter, transformer, books, layers)
    # Step 0 always computes: there is no H to reuse yet. With step 0 computed, every gated step has an H, because
    # H is kept from the last computed step for as long as the following steps are gated.
    gated = [bool(step_gate[k]) and k > 0 for k in range(num_steps)]
    reached = [k for k in range(num_steps) if not gated[k]]
    keep_h = [k + 1 < num_steps and gated[k + 1] for k in range(num_steps)]

    sites = []
    computed_per_step = {family: [0] * num_steps for family in layers}
    for site in adapter.cache_sites(transformer):
        # A joint module (FLUX attention) is skipped only when every family it computes says reuse.
        wants_reuse = [all(books[family][site.layer][k] for family in site.families) for k in range(num_steps)]
        reuse = [False] * num_steps
        have_value = False
        for k in reached:
            reuse[k] = wants_reuse[k] and have_value  # a reuse before any computed value falls back to compute
            have_value = True
        # Keep the value after a reached step only if the next reached step reuses it; a gated step in between
        # does not touch the slot, so what is held after it is what was held after the last reached step.
        keep = [False] * num_steps
        for index, k in enumerate(reached):
            next_step = reached[index + 1] if index + 1 < len(reached) else None
            held = next_step is not None and reuse[next_step]
            end = next_step if next_step is not None else num_steps
            for j in range(k, end):
                keep[j] = held
        sites.append(SiteSchedule(reuse=reuse, keep=keep))
        for k in reached:
            if not reuse[k]:
                for family in site.families:
                    computed_per_step[family][k] += 1
    return Schedule(
        num_steps, gated, keep_h, sites, layers, computed_per_step, skip_blocks=gated, residual_gain=[None] * num_steps
    )


def _build_forecast_schedule(plan: Any, adapter, transformer, books, layers) -> Schedule:
    """Forecast mode: the plan's orders decide the gated steps; the books decide reuse on computed steps.

    A site's forecast extrapolates from the last two steps at which *that site* computed, so a module the books
    reuse on a computed step is forecast from its own history, not from the step's.
    """
    num_steps = plan.num_steps
    gains = _forecast_gains(plan, num_steps)
    gated = [g is not None for g in gains]
    target = plan.forecast["target"]
    computed_per_step = {family: [0] * num_steps for family in layers}
    sites = []
    for site in adapter.cache_sites(transformer):
        wants_reuse = [all(books[family][site.layer][k] for family in site.families) for k in range(num_steps)]
        reuse, forecast = [False] * num_steps, [None] * num_steps
        computed_at: list[int] = []
        for k in range(num_steps):
            if gated[k]:
                if target == "modules":
                    forecast[k] = _site_gain(computed_at, k, order=0 if gains[k] == 0.0 else 1)
                continue
            reuse[k] = wants_reuse[k] and bool(computed_at)
            if not reuse[k]:
                computed_at.append(k)
                for family in site.families:
                    computed_per_step[family][k] += 1
        # Paper-style copies need the value held from one computed step to the next; forecasts track it always.
        keep = [any(reuse[j] for j in range(k + 1, num_steps)) for k in range(num_steps)]
        sites.append(SiteSchedule(reuse=reuse, keep=keep, forecast=forecast, track=target == "modules"))
    skip_blocks = gated if target == "residual" else [False] * num_steps
    residual_gain = gains if target == "residual" else [None] * num_steps
    return Schedule(
        num_steps,
        gated,
        [False] * num_steps,
        sites,
        layers,
        computed_per_step,
        skip_blocks=skip_blocks,
        residual_gain=residual_gain,
        track_residual=target == "residual",
    )


def _site_gain(computed_at: list[int], k: int, order: int) -> float:
    if order == 0 or len(computed_at) < 2:
        return 0.0
    a, b = computed_at[-2], computed_at[-1]
    return (k - b) / (b - a)


def _extrapolate(last: Any, diff: Any, gain: float) -> Any:
    """last + gain * diff, elementwise per row; tuples (FLUX joint attention) element by element."""
    if gain == 0.0 or last is None:
        return last
    if isinstance(last, tuple):
        return tuple(_extrapolate(x, d, gain) for x, d in zip(last, diff))
    return torch.add(last, diff, alpha=gain)


def _difference(new: Any, old: Any) -> Any:
    if isinstance(new, tuple):
        return tuple(_difference(x, o) for x, o in zip(new, old))
    return None if new is None else new - old


# ----------------------------------------------------------------------------------------------------------------
# State.


class InvarDiffState(BaseState):
    """One cache context's state: where it is in the plan and the tensors later steps reuse."""

    def __init__(self) -> None:
        self.step = 0
        self.slots: dict[int, Any] = {}  # cache-site index -> its last computed output (a tensor or a tuple)
        self.h_last: torch.Tensor | None = None
        # Forecast mode: per site (or for the residual, key -1) the difference of the last two computed values.
        self.diffs: dict[int, Any] = {}
        self.e_now: torch.Tensor | None = None  # the stack input of the step in flight (residual target)

    def reset(self) -> None:
        self.step = 0
        self.slots.clear()
        self.h_last = None
        self.diffs.clear()
        self.e_now = None


class _StatsCounter:
    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.reset()

    def reset(self) -> None:
        self.steps_total = 0
        self.steps_computed = 0
        self.computed = {family: 0 for family in self.schedule.layers}
        self.total = {family: 0 for family in self.schedule.layers}

    def add_step(self, step: int) -> None:
        self.steps_total += 1
        self.steps_computed += not self.schedule.gated[step]
        for family, num_layers in self.schedule.layers.items():
            self.computed[family] += self.schedule.computed_per_step[family][step]
            self.total[family] += num_layers

    def snapshot(self) -> CacheStats:
        return CacheStats(
            steps_total=self.steps_total,
            steps_computed=self.steps_computed,
            module_evals_total=sum(self.total.values()),
            module_evals_computed=sum(self.computed.values()),
            per_family={family: (self.computed[family], self.total[family]) for family in self.schedule.layers},
        )


class InvarDiffRuntime:
    """What all hooks of one applied plan share: the schedule, the stats, and the state of the call in flight."""

    def __init__(
        self,
        schedule: Schedule,
        adapter: TransformerAdapter,
        sites: list[CacheSite],
        plan_id: str | None,
        check_first_call=None,
    ):
        self.schedule = schedule
        self.adapter = adapter
        # Called with a generation's first transformer call (args, kwargs): raises when the call does not match the
        # plan (resolution, guidance), before anything runs. Shapes only, so it costs no host-device sync.
        self.check_first_call = check_first_call
        self.sites = sites
        self.plan_id = plan_id
        self.stats = _StatsCounter(schedule)
        self.active: InvarDiffState | None = None  # set only while a transformer call runs
        self.gated = False  # the blocks of the call in flight pass through


# ----------------------------------------------------------------------------------------------------------------
# Hooks.


class InvarDiffStepHook(ContextStepHook):
    def __init__(self, runtime: InvarDiffRuntime) -> None:
        super().__init__(runtime, InvarDiffState)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime = self.runtime
        runtime.adapter.check_call(args, kwargs)
        state = self.state_manager.get_state()
        step = state.step
        if step == 0 and runtime.check_first_call is not None:
            runtime.check_first_call(args, kwargs)
        gated = runtime.schedule.skip_blocks[step]
        if gated and runtime.schedule.residual_gain[step] is None and state.h_last is None:
            self.clear()
            raise RuntimeError(f"InvarDiff: step {step} is gated but no H is cached; the cache state is out of step.")
        runtime.gated = gated
        output = self.run_call(state, *args, **kwargs)
        if gated and not runtime.schedule.keep_h[step] and not runtime.schedule.track_residual:
            state.h_last = None
        runtime.stats.add_step(step)
        self.advance(state, runtime.schedule.num_steps)
        return output


class InvarDiffStackInputHook(ModelHook):
    def __init__(self, runtime: InvarDiffRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime = self.runtime
        state = runtime.active
        if state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        gain = runtime.schedule.residual_gain[state.step]
        if runtime.gated and gain is None:
            return state.h_last  # paper gate: H of the last computed step, embedding not even run
        embedded = self.fn_ref.original_forward(*args, **kwargs)
        if gain is not None:  # residual forecast: E_k + r_b + g (r_b - r_a)
            return _extrapolate(state.h_last, state.diffs.get(-1), gain) + embedded
        if runtime.schedule.track_residual:
            state.e_now = embedded
        return embedded


class _ComputingHook(ModelHook):
    """A hook whose computing path `invardiff.compile.compile_blocks` may swap for a compiled one: the decision
    around it stays in Python, outside any compiled region, so dynamo never guards on the step."""

    def __init__(self) -> None:
        super().__init__()
        self.compiled_forward = None

    def compute(self, *args, **kwargs):
        forward = self.compiled_forward if self.compiled_forward is not None else self.fn_ref.original_forward
        return forward(*args, **kwargs)


class InvarDiffBlockHook(_ComputingHook):
    def __init__(self, runtime: InvarDiffRuntime, is_last: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.is_last = is_last

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime = self.runtime
        state = runtime.active
        if state is None:  # called outside a transformer call
            return self.compute(*args, **kwargs)
        if runtime.gated:
            return runtime.adapter.block_passthrough(args, kwargs)
        output = self.compute(*args, **kwargs)
        if self.is_last:
            if runtime.schedule.track_residual:
                # h_last holds the residual r = H - E here, diffs[-1] its change since the previous computed step
                residual = runtime.adapter.step_feature(output) - state.e_now
                if state.h_last is not None:
                    state.diffs[-1] = residual - state.h_last
                state.h_last, state.e_now = residual, None
            else:
                keep = runtime.schedule.keep_h[state.step]
                state.h_last = runtime.adapter.step_feature(output) if keep else None
        return output


class InvarDiffModuleHook(_ComputingHook):
    def __init__(self, runtime: InvarDiffRuntime, site_index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.site_index = site_index
        self.schedule = runtime.schedule.sites[site_index]

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.runtime.active
        if state is None:  # called outside a transformer call
            return self.compute(*args, **kwargs)
        step = state.step
        schedule = self.schedule
        if schedule.track:
            return self._forecast_or_track(state, step, args, kwargs)
        if schedule.reuse[step]:
            output = state.slots.get(self.site_index)
            if output is None:
                name = self.runtime.sites[self.site_index].name
                raise RuntimeError(f"InvarDiff: {name} should reuse at step {step} but holds no output.")
        else:
            output = self.compute(*args, **kwargs)
        if schedule.keep[step]:
            state.slots[self.site_index] = output
        else:
            state.slots.pop(self.site_index, None)
        return output

    def _forecast_or_track(self, state: InvarDiffState, step: int, args, kwargs):
        """Modules-target forecast plans: forecast on gated steps, copy where the books reuse, else compute and
        remember the value and its change for later forecasts."""
        index, schedule = self.site_index, self.schedule
        last = state.slots.get(index)
        gain = schedule.forecast[step]
        if gain is not None or schedule.reuse[step]:
            if last is None:
                name = self.runtime.sites[index].name
                raise RuntimeError(f"InvarDiff: {name} should forecast at step {step} but holds no output.")
            return last if gain is None else _extrapolate(last, state.diffs.get(index), gain)
        output = self.compute(*args, **kwargs)
        if last is not None:
            state.diffs[index] = _difference(output, last)
        state.slots[index] = output
        return output


# ----------------------------------------------------------------------------------------------------------------
# Public API.


def apply_invardiff(transformer: torch.nn.Module, plan: Any, *, check_first_call=None) -> None:
    """Execute `plan` on every subsequent call of `transformer`.

    `plan` needs `step_gate` (bool[T], True = reuse H), `modules` ({family: bool[T, L]}, True = reuse) and
    `plan_id`; a forecast-mode `invardiff.plan.Plan` adds `mode` and `forecast`. Row k of the plan drives the k-th
    call in each cache context; after T calls the context starts over. `check_first_call(args, kwargs)` runs on the
    first call of every generation and may raise to refuse it (`invardiff.enable` uses it).
    """
    transformer = unwrap(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(_STEP_HOOK) is not None:
        raise ValueError("InvarDiff is already applied to this transformer; call remove_invardiff first.")
    adapter = get_adapter(transformer)
    schedule = build_schedule(plan, adapter, transformer)
    sites = adapter.cache_sites(transformer)
    runtime = InvarDiffRuntime(schedule, adapter, sites, getattr(plan, "plan_id", None), check_first_call)
    try:
        for index, site in enumerate(sites):
            register_hook(site.module, InvarDiffModuleHook(runtime, index), _MODULE_HOOK)
        blocks = adapter.blocks(transformer)
        for index, block in enumerate(blocks):
            register_hook(block.module, InvarDiffBlockHook(runtime, is_last=index == len(blocks) - 1), _BLOCK_HOOK)
        register_hook(adapter.stack_input(transformer).module, InvarDiffStackInputHook(runtime), _STACK_INPUT_HOOK)
        registry.register_hook(InvarDiffStepHook(runtime), _STEP_HOOK)
    except BaseException:
        remove_hooks(transformer, HOOK_NAMES)
        raise
    # New hooks on descendants stale the child-registry list that `cache_context` walks (diffusers #14037).
    registry.invalidate_child_registries_cache()


def remove_invardiff(transformer: torch.nn.Module) -> None:
    """Detach every InvarDiff hook and drop the cache; the model computes exactly as before. No-op if not applied."""
    remove_hooks(unwrap(transformer), HOOK_NAMES)


def _step_hook(transformer: torch.nn.Module) -> InvarDiffStepHook:
    transformer = unwrap(transformer)
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(_STEP_HOOK) if registry is not None else None
    if hook is None:
        raise ValueError("InvarDiff is not applied to this transformer; call apply_invardiff first.")
    return hook


def reset_invardiff(transformer: torch.nn.Module) -> None:
    """Drop every cache context's slots and step counter and zero the stats. Call before each generation."""
    hook = _step_hook(transformer)
    hook.clear()
    hook.runtime.stats.reset()


def invardiff_stats(transformer: torch.nn.Module) -> CacheStats:
    """Steps and module evaluations run since the last `reset_invardiff` (sum over cache contexts)."""
    return _step_hook(transformer).runtime.stats.snapshot()


def invardiff_cache_contents(transformer: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """What each cache context holds right now: {context: {"step", "slots" (site names), "holds_h", "bytes"}}.
    For inspection and memory accounting; not for the hot path."""
    hook = _step_hook(transformer)
    sites = hook.runtime.sites
    contents = {}
    for name, state in hook.state_manager.states().items():
        tensors = [state.h_last] if state.h_last is not None else []
        for value in [*state.slots.values(), *state.diffs.values()]:
            tensors.extend(value if isinstance(value, (tuple, list)) else [value])
        contents[name] = {
            "step": state.step,
            "slots": tuple(sites[index].name for index in sorted(state.slots)),
            "holds_h": state.h_last is not None,
            "bytes": sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)),
        }
    return contents

