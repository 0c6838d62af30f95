"""DiCache (arXiv 2508.17356): an online shallow-layer probe decides, step by step, whether the rest of the block
stack runs; a skipped stack is replaced by a residual extrapolated from the last two computed steps.

Per step (method-l2c-dicache.md §2.2-§2.5), with h0 the image stream entering block 0, hm the output of the first
`probe_depth` blocks and hL the output of the last block:

* The probe blocks always run. e = relL1(hm, hm of the previous step) is added to an accumulator A (the previous
  probe output is kept on every step, skipped or not).
* A < threshold: skip the remaining blocks, and set hL = h0 + R_hat with
  R_hat = R_new + (gamma - 1) (R_new - R_old) and gamma = mean|q - q_old| / mean|q_new - q_old| clipped to
  `gamma_clip`, where R = hL - h0 and q = hm - h0 of the two most recent computed steps (the anchors) and q of
  the current step ("dynamic cache trajectory alignment"). With one anchor R_hat = R_new.
* Otherwise: run the remaining blocks from hm (the probe is not recomputed), push (R, q) as the newest anchor and
  reset A to 0.
* The first floor(warmup_ratio * T) steps always compute (A held at 0); `last_step_full` also computes the last.

Batches. `batch_mode="row"` (default) makes every batch row its own stream: its own accumulator, probe history,
anchors and gamma, all statistics reduced over that row only, so a row's image does not depend on its batchmates
(with batched CFG, the conditional and unconditional rows of a sample are two independent streams, as Wan keeps
two states). Rows that must compute run the remaining blocks as a sub-batch (the rows are gathered, run and
scattered back); rows that skip run nothing past the probe. `batch_mode="global"` is the reference code: one
relL1 and one gamma over the whole batch tensor, one decision for all rows.

Deviations from the reference code, on purpose: an epsilon in both denominators, and a non-finite gamma falls back
to plain reuse of R_new (the reference divides 0/0 into NaN). Statistics are computed in float32.

Hooks (diffusers `HookRegistry`, forward replaced as in `invardiff.runtime`): the transformer (step counting and
the cache context), the patch embedding (records h0), every block (probe, skip, sub-batch, final substitution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState

from .._hookutils import ContextStepHook, register_hook, remove_hooks, unwrap
from ..adapters import TransformerAdapter, get_adapter
from ..runtime import CacheStats

__all__ = ["DiCachePolicy", "aligned_residual", "alignment_gain", "relative_l1"]

_STEP_HOOK = "dicache_step"
_STACK_INPUT_HOOK = "dicache_stack_input"
_BLOCK_HOOK = "dicache_block"
HOOK_NAMES = (_STEP_HOOK, _STACK_INPUT_HOOK, _BLOCK_HOOK)
BATCH_MODES = ("row", "global")
EPS = 1e-8


# ----------------------------------------------------------------------------------------------------------------
# The math, as pure functions. `per_row`: reduce over everything but dim 0 (one value per row), else over the
# whole tensor (one value, the reference's batch-global statistics), returned with one entry per stream.


def _mean_abs(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    x = x.float().abs()
    return x.flatten(1).mean(dim=1) if per_row else x.mean().reshape(1)


def relative_l1(a: torch.Tensor, b: torch.Tensor, per_row: bool) -> torch.Tensor:
    """mean|a - b| / mean|b|."""
    return _mean_abs(a.float() - b.float(), per_row) / (_mean_abs(b, per_row) + EPS)


def alignment_gain(
    q: torch.Tensor, q_old: torch.Tensor, q_new: torch.Tensor, clip: tuple[float, float], per_row: bool
) -> torch.Tensor:
    """gamma = mean|q - q_old| / mean|q_new - q_old|, clipped; 1 (plain reuse of R_new) where it is not finite."""
    gamma = _mean_abs(q.float() - q_old.float(), per_row) / (_mean_abs(q_new.float() - q_old.float(), per_row) + EPS)
    gamma = torch.where(torch.isfinite(gamma), gamma, torch.ones_like(gamma))
    return gamma.clamp(*clip)


def aligned_residual(r_old: torch.Tensor, r_new: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """R_old + gamma (R_new - R_old), written as R_new + (gamma - 1)(R_new - R_old) so gamma = 1 is R_new
    exactly. `gamma` has one entry per row, or a single entry for the whole batch."""
    scale = (gamma - 1.0).reshape(-1, *([1] * (r_new.dim() - 1))).to(r_new.dtype)
    return r_new + scale * (r_new - r_old)


# ----------------------------------------------------------------------------------------------------------------
# Configuration and state.


@dataclass(frozen=True)
class DiCacheConfig:
    threshold: float
    num_steps: int
    probe_depth: int = 1
    warmup_ratio: float = 0.2
    gamma_clip: tuple[float, float] = (1.0, 1.5)
    batch_mode: str = "row"
    last_step_full: bool = False

    def __post_init__(self) -> None:
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {self.batch_mode!r}")
        if self.num_steps < 1 or self.probe_depth < 1:
            raise ValueError("num_steps and probe_depth must be >= 1")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")

    @property
    def warmup_steps(self) -> int:
        # Steps 0 .. floor(ratio * T) - 1 (HunyuanVideo's 0-9 of 50; the FLUX script's inclusive test runs one more).
        return math.floor(self.warmup_ratio * self.num_steps)

    def forced(self, step: int) -> bool:
        return step < self.warmup_steps or (self.last_step_full and step == self.num_steps - 1)


class DiCacheState(BaseState):
    """One cache context's streams. Tensors are full-batch (rows, tokens, hidden); per-stream scalars are lists
    with one entry per stream (rows in row mode, one in global mode)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.rows: int | None = None
        self.accumulated: list[float] = []
        self.probe_prev: torch.Tensor | None = None
        self.anchors: list[int] = []  # per stream: how many of (old, new) hold a computed step, 0..2
        self.r_old: torch.Tensor | None = None
        self.r_new: torch.Tensor | None = None
        self.q_old: torch.Tensor | None = None
        self.q_new: torch.Tensor | None = None
        # The call in flight.
        self.h0: torch.Tensor | None = None
        self.q_now: torch.Tensor | None = None
        self.compute_mask: list[bool] = []  # per row: runs the tail
        self.compute_rows: torch.Tensor | None = None  # the same, as row indices
        self.all_compute = True
        self.any_compute = True


@dataclass
class _Counter:
    """What ran since the last reset, in call units: a block run on r of B rows counts r / B of an evaluation."""

    steps_total: int = 0
    steps_computed: float = 0.0
    computed: dict[str, float] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Hooks.


class _Runtime:
    def __init__(self, config: DiCacheConfig, adapter: TransformerAdapter, transformer: torch.nn.Module) -> None:
        self.config = config
        self.adapter = adapter
        self.blocks = adapter.blocks(transformer)
        if config.probe_depth >= len(self.blocks):
            raise ValueError(f"probe_depth {config.probe_depth} leaves no block to skip ({len(self.blocks)} blocks)")
        self.layers = adapter.layers(transformer)
        # Which module families each block holds, to turn rows run per block into module evaluations.
        block_of = {block.name: index for index, block in enumerate(self.blocks)}
        self.block_families: list[list[str]] = [[] for _ in self.blocks]
        for site in adapter.cache_sites(transformer):
            self.block_families[block_of[site.name.rsplit(".", 1)[0]]].extend(site.families)
        self.active: DiCacheState | None = None
        self.rows_run: list[int] = [0] * len(self.blocks)  # of the call in flight
        self.trace: dict[str, list[list[bool]]] = {}  # context -> per call, per row: did the tail run
        self.reset_stats()

    @property
    def per_row(self) -> bool:
        return self.config.batch_mode == "row"

    def reset_stats(self) -> None:
        self.counter = _Counter(computed=dict.fromkeys(self.layers, 0.0), total=dict.fromkeys(self.layers, 0))
        self.trace.clear()


class DiCacheStepHook(ContextStepHook):
    def __init__(self, runtime: _Runtime) -> None:
        super().__init__(runtime, DiCacheState)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime = self.runtime
        runtime.adapter.check_call(args, kwargs)
        state = self.state_manager.get_state()
        runtime.rows_run = [0] * len(runtime.blocks)
        output = self.run_call(state, *args, **kwargs)  # a failed call clears the half-updated anchors
        self._count(state)
        state.h0 = state.q_now = state.compute_rows = None
        self.advance(state, runtime.config.num_steps)
        return output

    def _count(self, state: DiCacheState) -> None:
        runtime, counter = self.runtime, self.runtime.counter
        rows = state.rows or 1
        counter.steps_total += 1
        counter.steps_computed += runtime.rows_run[-1] / rows
        for family, count in runtime.layers.items():
            counter.total[family] += count
        for block, families in enumerate(runtime.block_families):
            for family in families:
                counter.computed[family] += runtime.rows_run[block] / rows
        runtime.trace.setdefault(self.state_manager.context_name(), []).append(list(state.compute_mask))


class DiCacheStackInputHook(ModelHook):
    """Records h0, the image stream entering block 0."""

    def __init__(self, runtime: _Runtime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.runtime.active is not None:
            self.runtime.active.h0 = output
        return output


class DiCacheBlockHook(ModelHook):
    def __init__(self, runtime: _Runtime, index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.index = index
        self.is_probe_end = index == runtime.config.probe_depth - 1
        self.is_tail = index >= runtime.config.probe_depth
        self.is_last = index == len(runtime.blocks) - 1

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime, state = self.runtime, self.runtime.active
        if state is None:  # called outside a transformer call
            return self.fn_ref.original_forward(*args, **kwargs)
        if not self.is_tail:
            output = self.fn_ref.original_forward(*args, **kwargs)
            runtime.rows_run[self.index] = _rows(runtime.adapter.step_feature(output))
            if self.is_probe_end:
                decide(runtime, state, runtime.adapter.step_feature(output))
            return output
        output = self._run_tail(module, state, args, kwargs)
        if self.is_last:
            output = finish(runtime, state, output)
        return output

    def _run_tail(self, module, state: DiCacheState, args, kwargs):
        runtime = self.runtime
        if state.all_compute:
            runtime.rows_run[self.index] = state.rows
            return self.fn_ref.original_forward(*args, **kwargs)
        passthrough = runtime.adapter.block_passthrough(args, kwargs)
        if not state.any_compute:
            return passthrough
        # Sub-batch: only the rows that compute this step run the block; the others carry their inputs through.
        rows = state.compute_rows
        runtime.rows_run[self.index] = len(rows)
        sub_args = tuple(_select_rows(a, rows, state.rows) for a in args)
        sub_kwargs = {k: _select_rows(v, rows, state.rows) for k, v in kwargs.items()}
        computed = self.fn_ref.original_forward(*sub_args, **sub_kwargs)
        return _scatter_rows(passthrough, computed, rows)


def _rows(tensor: torch.Tensor) -> int:
    return int(tensor.shape[0])


def _select_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Rows `rows` of every batched tensor argument. In the DiT and FLUX block signatures every tensor argument is
    batched along dim 0 (hidden states, text states, temb, timestep, class labels); rotary embeddings arrive as a
    tuple and attention kwargs as a dict, and are shared by all rows."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    return value


def _scatter_rows(full: Any, part: Any, rows: torch.Tensor) -> Any:
    if isinstance(full, tuple):
        return tuple(_scatter_rows(f, p, rows) for f, p in zip(full, part))
    if full is None:
        return None
    return full.index_copy(0, rows, part.to(full.dtype))


def _replace_stream(output: Any, hidden: torch.Tensor) -> Any:
    """A block output with its image stream replaced: DiT blocks return the stream, FLUX blocks
    (encoder_hidden_states, hidden_states) (the adapters' `step_feature` reads the same element)."""
    return (output[0], hidden) if isinstance(output, tuple) else hidden


# ----------------------------------------------------------------------------------------------------------------
# The decisions.


def decide(runtime: _Runtime, state: DiCacheState, probe: torch.Tensor) -> None:
    """At the end of the probe: update every stream's accumulator and pick the rows that run the tail."""
    config = runtime.config
    per_row = runtime.per_row
    rows = _rows(probe)
    if state.h0 is None:
        raise RuntimeError("DiCache: the stack input was not recorded before the probe finished")
    if state.rows is None:
        streams = rows if per_row else 1
        state.rows, state.accumulated, state.anchors = rows, [0.0] * streams, [0] * streams
    elif state.rows != rows:
        raise RuntimeError(f"DiCache: the batch changed from {state.rows} to {rows} rows within one generation")
    state.q_now = probe - state.h0

    forced = config.forced(state.step) or state.probe_prev is None
    errors = [0.0] * len(state.accumulated) if forced else relative_l1(probe, state.probe_prev, per_row).tolist()
    compute = []
    for stream, error in enumerate(errors):
        if forced or state.anchors[stream] == 0:
            compute.append(True)
            state.accumulated[stream] = 0.0
            continue
        state.accumulated[stream] += error
        if state.accumulated[stream] < config.threshold:
            compute.append(False)
        else:
            compute.append(True)
            state.accumulated[stream] = 0.0
    state.probe_prev = probe

    if not per_row:
        compute = compute * rows
    state.compute_mask = compute
    state.all_compute, state.any_compute = all(compute), any(compute)
    state.compute_rows = torch.tensor([r for r in range(rows) if compute[r]], dtype=torch.long, device=probe.device)


def finish(runtime: _Runtime, state: DiCacheState, output: Any) -> Any:
    """After the last block: computed rows become the newest anchor; skipped rows get h0 + aligned residual."""
    hidden = runtime.adapter.step_feature(output)
    rows = state.compute_rows
    if state.any_compute:
        push_anchor(runtime, state, hidden - state.h0, rows)
    if state.all_compute:
        return output
    skip = _complement(rows, state.rows)
    estimate = state.h0 + estimated_residual(runtime, state, skip)
    return _replace_stream(output, hidden.index_copy(0, skip, estimate.index_select(0, skip)))


def _complement(rows: torch.Tensor, batch: int) -> torch.Tensor:
    keep = torch.ones(batch, dtype=torch.bool, device=rows.device)
    keep[rows] = False
    return keep.nonzero().flatten()


def push_anchor(runtime: _Runtime, state: DiCacheState, residual: torch.Tensor, rows: torch.Tensor) -> None:
    """(R, q) of the rows that computed become their newest anchor; the previous newest becomes the oldest."""
    q = state.q_now
    if state.r_new is None:  # first computed step: every row computes there (nothing to skip with yet)
        state.r_old, state.q_old = residual.clone(), q.clone()
        state.r_new, state.q_new = residual.clone(), q.clone()
    else:
        state.r_old = state.r_old.index_copy(0, rows, state.r_new.index_select(0, rows))
        state.q_old = state.q_old.index_copy(0, rows, state.q_new.index_select(0, rows))
        state.r_new = state.r_new.index_copy(0, rows, residual.index_select(0, rows))
        state.q_new = state.q_new.index_copy(0, rows, q.index_select(0, rows))
    streams = rows.tolist() if runtime.per_row else [0]
    for stream in streams:
        state.anchors[stream] = min(2, state.anchors[stream] + 1)


def estimated_residual(runtime: _Runtime, state: DiCacheState, skip: torch.Tensor) -> torch.Tensor:
    """R_hat for every row (only the `skip` rows are used): trajectory-aligned where a stream has two anchors."""
    per_row = runtime.per_row
    gamma = alignment_gain(state.q_now, state.q_old, state.q_new, runtime.config.gamma_clip, per_row)
    two_anchors = torch.tensor([n >= 2 for n in state.anchors], device=gamma.device)
    gamma = torch.where(two_anchors, gamma, torch.ones_like(gamma))  # one anchor: plain reuse of R_new
    return aligned_residual(state.r_old, state.r_new, gamma)


# ----------------------------------------------------------------------------------------------------------------
# The policy.


class DiCachePolicy:
    """DiCache behind the `CachePolicy` interface. `num_steps` is the sampler's step count (the warm-up is a share
    of it, and the state starts over after that many calls per cache context)."""

    name = "dicache"
    plan_id = None

    def __init__(
        self,
        threshold: float,
        num_steps: int,
        *,
        probe_depth: int = 1,
        warmup_ratio: float = 0.2,
        gamma_clip: tuple[float, float] = (1.0, 1.5),
        batch_mode: str = "row",
        last_step_full: bool | None = None,
    ) -> None:
        self._options = dict(
            threshold=float(threshold), num_steps=int(num_steps), probe_depth=probe_depth,
            warmup_ratio=warmup_ratio, gamma_clip=tuple(gamma_clip), batch_mode=batch_mode,
        )
        self._last_step_full = last_step_full
        DiCacheConfig(**self._options)  # validate now, not at attach time
        self.config: DiCacheConfig | None = None

    def attach(self, transformer: torch.nn.Module) -> None:
        transformer = unwrap(transformer)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        if registry.get_hook(_STEP_HOOK) is not None:
            raise ValueError("DiCache is already attached to this transformer; detach it first")
        adapter = get_adapter(transformer)
        # The FLUX script forces its last step to compute; the HunyuanVideo and Wan scripts do not (§2.3).
        last_full = adapter.architecture == "flux" if self._last_step_full is None else self._last_step_full
        self.config = DiCacheConfig(**self._options, last_step_full=last_full)
        runtime = _Runtime(self.config, adapter, transformer)
        try:
            register_hook(adapter.stack_input(transformer).module, DiCacheStackInputHook(runtime), _STACK_INPUT_HOOK)
            for index, block in enumerate(runtime.blocks):
                register_hook(block.module, DiCacheBlockHook(runtime, index), _BLOCK_HOOK)
            registry.register_hook(DiCacheStepHook(runtime), _STEP_HOOK)
        except BaseException:
            remove_hooks(transformer, HOOK_NAMES)
            raise
        registry.invalidate_child_registries_cache()  # diffusers #14037

    def detach(self, transformer: torch.nn.Module) -> None:
        remove_hooks(unwrap(transformer), HOOK_NAMES)

    def _hook(self, transformer: torch.nn.Module) -> DiCacheStepHook:
        registry = getattr(unwrap(transformer), "_diffusers_hook", None)
        hook = registry.get_hook(_STEP_HOOK) if registry is not None else None
        if hook is None:
            raise ValueError("DiCache is not attached to this transformer")
        return hook

    def reset(self, transformer: torch.nn.Module) -> None:
        hook = self._hook(transformer)
        hook.clear()
        hook.runtime.reset_stats()

    def stats(self, transformer: torch.nn.Module) -> CacheStats:
        """What ran since the last reset. A block run on r of B rows counts r / B of its module evaluations;
        totals are rounded to integers here (exact when every call runs whole batches, as in global mode)."""
        counter = self._hook(transformer).runtime.counter
        per_family = {f: (round(counter.computed[f]), counter.total[f]) for f in counter.total}
        return CacheStats(
            steps_total=counter.steps_total,
            steps_computed=round(counter.steps_computed),
            module_evals_total=sum(counter.total.values()),
            module_evals_computed=round(sum(counter.computed.values())),
            per_family=per_family,
        )

    def decisions(self, transformer: torch.nn.Module) -> dict[str, list[list[bool]]]:
        """Since the last reset, per cache context: for every call, per row, whether the tail ran."""
        return {name: [list(r) for r in calls] for name, calls in self._hook(transformer).runtime.trace.items()}
