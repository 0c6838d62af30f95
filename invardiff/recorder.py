"""Hooks that measure InvarDiff's change rates online during uncached calibration runs (method §3.2 and §5).

Every step, each cacheable module's pre-gate output and the step feature H is compared with an anchor tensor of
the same stream; only the per-run L1 sums are kept, never the trajectories. For every stream the recorder runs the
phase-2 bookkeeping of §5:

    k = 0:   anchor <- Z[0]
    k = 1:   dprev <- |Z[1] - anchor|_1;  anchor <- Z[1]
    k >= 2:  rho[k-1] = |Z[k] - anchor|_1 / dprev
             if P1[k-1] is False:  refresh, in_run <- False
             elif not in_run:      refresh, in_run <- True     (first reused step of a run)
             else:                 keep anchor and dprev frozen
    refresh := dprev <- |Z[k] - anchor|_1;  anchor <- Z[k]

With no provisional plan every row is False and this is exactly phase 1: rho[k-1] = d[k] / d[k-1]. Rows 0 and T-1
are 1 (placeholders). `|x|_1` is sum |x + eps| over all elements of one run, with eps = 1e-8 added before the abs.

A batch holds R calibration runs. With batched CFG (`cfg_batched=True`) rows i and i+R are the conditional and
unconditional halves of run i and their sums are added. Calls under different cache contexts (separate-call CFG)
keep separate anchors and add their sums into the same runs, so both layouts give the same numbers. Rates are
num/den with both parts summed this way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState

from ._hookutils import ContextStepHook, check_books, register_hook, remove_hooks, unwrap
from .adapters import CacheSite, get_adapter

_RECORDER_STEP_HOOK = "invardiff_recorder_step"
_RECORDER_SITE_HOOK = "invardiff_recorder_site"
_RECORDER_H_HOOK = "invardiff_recorder_h"
RECORDER_HOOK_NAMES = (_RECORDER_STEP_HOOK, _RECORDER_SITE_HOOK, _RECORDER_H_HOOK)
STEP = "step"

# Elements per chunk of the fp32 difference: bounds the temporary memory of one L1 sum (a FLUX 1024² single-block
# MLP output is 56M elements per sample).
_CHUNK_ELEMENTS = 1 << 24

__all__ = ["RateRecorder", "l1_per_sample"]


def l1_per_sample(z: torch.Tensor, anchor: torch.Tensor, eps: float) -> torch.Tensor:
    """sum |z - anchor + eps| over every element of each sample: float64[B], on z's device, no host sync.

    The difference is taken in fp32 (chunked along dim 1), the sums accumulate in fp64.
    """
    batch = z.shape[0]
    total = torch.zeros(batch, dtype=torch.float64, device=z.device)
    if z.ndim == 1:
        return total + ((z.float() - anchor.float()) + eps).abs().double()
    per_index = max(1, z[0].numel() // max(1, z.shape[1])) * batch
    chunk = max(1, _CHUNK_ELEMENTS // per_index)
    for start in range(0, z.shape[1], chunk):
        diff = z[:, start : start + chunk].float() - anchor[:, start : start + chunk].float()
        total += (diff + eps).abs().flatten(1).sum(dim=1, dtype=torch.float64)
    return total


class _StreamState:
    __slots__ = ("anchor", "dprev", "in_run")

    def __init__(self, anchor: torch.Tensor) -> None:
        self.anchor = anchor
        self.dprev: torch.Tensor | None = None
        self.in_run = False


class RecorderState(BaseState):
    """One cache context's recording state: the step index and one anchor per stream."""

    def __init__(self) -> None:
        self.step = 0
        self.streams: dict[tuple[str, int], _StreamState] = {}

    def reset(self) -> None:
        self.step = 0
        self.streams.clear()


class RateRecorder:
    """Measure per-run change rates of every stream while the sampler runs uncached.

        with RateRecorder(transformer, num_steps=T, provisional=None, cfg_batched=False) as rec:
            run the sampler once (R runs in one batch; with batched CFG the batch is 2R)
        rates = rec.rates()   # {"step": float64[R, T], family: float64[R, T, L]}

    `provisional`: None for phase 1, or the phase-1 plan as `(step_gate, modules)` or any object with those
    attributes (bool[T] and {family: bool[T, L]}) for phase 2. A recorder records one generation: T calls per
    cache context. It never changes what the model computes.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        num_steps: int,
        provisional: Any = None,
        cfg_batched: bool = False,
        runs_per_batch: int | None = None,
        eps: float = 1e-8,
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        self.transformer = unwrap(transformer)
        self.adapter = get_adapter(self.transformer)
        self.layers = self.adapter.layers(self.transformer)
        self.num_steps = num_steps
        self.cfg_batched = cfg_batched
        self.runs_per_batch = runs_per_batch
        self.eps = eps
        self._provisional = self._provisional_rows(provisional)
        self._num: dict[str, torch.Tensor] = {}  # stream group -> float64[R, T, L]: sum of |Z[k] - anchor|_1
        self._den: dict[str, torch.Tensor] = {}  # stream group -> float64[R, T, L]: sum of dprev
        self._calls: dict[str, int] = {}  # cache context -> transformer calls recorded
        self._failure: str | None = None
        self.active: RecorderState | None = None
        self._attached = False

    def _provisional_rows(self, provisional: Any) -> dict[str, list[list[bool]]]:
        """{group: [layer][step] bools}, the phase-1 decision each stream's bookkeeping reads."""
        if provisional is None:
            rows = {family: [[False] * self.num_steps for _ in range(n)] for family, n in self.layers.items()}
            rows[STEP] = [[False] * self.num_steps]
            return rows
        if isinstance(provisional, tuple):
            step_gate, modules = provisional
        else:
            step_gate, modules = provisional.step_gate, provisional.modules
        step_rows, books = check_books(step_gate, modules, self.layers, what="provisional plan")
        if len(step_rows) != self.num_steps:
            raise ValueError(f"provisional plan has {len(step_rows)} steps, the recorder {self.num_steps}")
        books[STEP] = [step_rows]
        return books

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def attach(self) -> "RateRecorder":
        if self._attached:
            raise ValueError("RateRecorder is already attached")
        try:
            for site in self.adapter.cache_sites(self.transformer):
                register_hook(site.module, _RecorderSiteHook(self, site), _RECORDER_SITE_HOOK)
            last_block = self.adapter.blocks(self.transformer)[-1]
            register_hook(last_block.module, _RecorderStepFeatureHook(self), _RECORDER_H_HOOK)
            register_hook(self.transformer, _RecorderStepHook(self), _RECORDER_STEP_HOOK)
        except BaseException:
            remove_hooks(self.transformer, RECORDER_HOOK_NAMES)
            raise
        # Hooks on descendants stale the child-registry list that `cache_context` walks (diffusers #14037).
        self.transformer._diffusers_hook.invalidate_child_registries_cache()
        self._attached = True
        return self

    def detach(self) -> None:
        remove_hooks(self.transformer, RECORDER_HOOK_NAMES)
        self.active = None
        self._attached = False

    def __enter__(self) -> "RateRecorder":
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    # -- bookkeeping (called from the hooks) ------------------------------------------------------------------------

    def _begin_call(self, context: str) -> None:
        """Refuse a call after a failed one or past the end of the context's generation."""
        if self._failure is not None:
            raise RuntimeError(f"RateRecorder: an earlier call failed ({self._failure}); start a new recorder.")
        if self._calls.get(context, 0) >= self.num_steps:
            raise RuntimeError(
                f"RateRecorder records one generation per cache context; context {context!r} already ran "
                f"{self.num_steps} steps. Use one recorder per calibration batch."
            )

    def _end_call(self, context: str) -> None:
        self._calls[context] = self._calls.get(context, 0) + 1

    def _fail(self, error: BaseException) -> None:
        self._failure = f"{type(error).__name__}: {error}"

    def _check_batch(self, batch: int) -> None:
        groups = 2 if self.cfg_batched else 1
        if batch % groups:
            raise ValueError(f"RateRecorder: batch {batch} is not a whole number of CFG pairs")
        if self.runs_per_batch is None:
            self.runs_per_batch = batch // groups
        elif batch != groups * self.runs_per_batch:
            raise ValueError(f"RateRecorder: expected {self.runs_per_batch} runs per batch, got a batch of {batch}")

    def _runs_of(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Per-sample sums -> per-run sums: rows i and i+R (the CFG halves of run i) add up."""
        groups = 2 if self.cfg_batched else 1
        return per_sample.view(groups, self.runs_per_batch).sum(dim=0)

    def _book(self, group: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if group not in self._num:
            shape = (self.runs_per_batch, self.num_steps, len(self._provisional[group]))
            self._num[group] = torch.zeros(shape, dtype=torch.float64, device=device)
            self._den[group] = torch.zeros(shape, dtype=torch.float64, device=device)
        return self._num[group], self._den[group]

    def observe(self, state: RecorderState, group: str, layer: int, z: torch.Tensor) -> None:
        """Feed one stream's output at the current step into the §5 bookkeeping."""
        z = z.detach()
        self._check_batch(z.shape[0])
        key = (group, layer)
        step = state.step
        stream = state.streams.get(key)
        if step == 0 or stream is None:
            if step != 0:
                raise RuntimeError(f"RateRecorder: stream {key} first seen at step {step}")
            state.streams[key] = _StreamState(z)
            return
        distance = self._runs_of(l1_per_sample(z, stream.anchor, self.eps))
        if step == 1:
            stream.dprev, stream.anchor = distance, z
            return
        num, den = self._book(group, z.device)
        row = step - 1
        num[:, row, layer] += distance
        den[:, row, layer] += stream.dprev
        if not self._provisional[group][layer][row]:
            stream.dprev, stream.anchor, stream.in_run = distance, z, False
        elif not stream.in_run:
            stream.dprev, stream.anchor, stream.in_run = distance, z, True
        # else: 2nd, 3rd ... reused step of a run: anchor and dprev stay frozen.

    # -- result ----------------------------------------------------------------------------------------------------

    def rates(self) -> dict[str, np.ndarray]:
        """{"step": float64[R, T], family: float64[R, T, L]} for the recorded generation."""
        if self._failure is not None:
            raise RuntimeError(f"RateRecorder: a recorded call failed ({self._failure}); the rates are incomplete.")
        incomplete = {name: calls for name, calls in self._calls.items() if calls != self.num_steps}
        if incomplete or not self._calls:
            raise RuntimeError(
                f"RateRecorder: expected {self.num_steps} transformer calls per cache context, recorded "
                f"{self._calls or 'none'}."
            )
        result = {}
        for group in (STEP, *self.layers):
            if group in self._num:
                num, den = self._num[group].cpu().numpy(), self._den[group].cpu().numpy()
                with np.errstate(divide="ignore", invalid="ignore"):
                    rho = num / den
            else:  # T < 3: no interior rows
                rho = np.ones((self.runs_per_batch, self.num_steps, len(self._provisional[group])))
            rho[:, 0] = 1.0
            rho[:, -1] = 1.0
            result[group] = rho[:, :, 0] if group == STEP else rho
        return result


class _RecorderStepHook(ContextStepHook):
    """Runs each transformer call with its context's `RecorderState` active for the site hooks; after the last
    step the context's anchors are dropped. A failed call also marks the recorder failed: its rates would be
    incomplete."""

    def __init__(self, recorder: RateRecorder) -> None:
        super().__init__(recorder, RecorderState)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        recorder = self.runtime
        state = self.state_manager.get_state()
        context = self.state_manager.context_name()
        recorder._begin_call(context)
        try:
            output = self.run_call(state, *args, **kwargs)  # a failed call clears every context's anchors
        except BaseException as error:
            recorder._fail(error)
            raise
        recorder._end_call(context)
        self.advance(state, recorder.num_steps)
        return output


class _RecorderSiteHook(ModelHook):
    def __init__(self, recorder: RateRecorder, site: CacheSite) -> None:
        super().__init__()
        self.recorder = recorder
        self.site = site

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        state = self.recorder.active
        if state is not None:
            for family, tensor in zip(self.site.families, self.site.family_outputs(output)):
                self.recorder.observe(state, family, self.site.layer, tensor)
        return output


class _RecorderStepFeatureHook(ModelHook):
    def __init__(self, recorder: RateRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        state = self.recorder.active
        if state is not None:
            self.recorder.observe(state, STEP, 0, self.recorder.adapter.step_feature(output))
        return output
