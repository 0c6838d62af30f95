"""Measure what each forecast candidate would cost, on deterministic uncached runs (method-forecast.md, step 2).

At every denoising step ``k`` the hooked transformer first runs as usual (the true trajectory is never changed),
capturing the value a gated step would replace: the block stack's residual ``H - E`` (``target="residual"``) or
every cache site's output (``target="modules"``). It then re-runs the same call once per candidate
(``invardiff.forecast.candidates``), with the forecast from earlier captured steps injected, the rest of the
model live on the true input, and adds the squared error of the guided model output into ``copy_error`` /
``linear_error``. Errors are summed over rows (runs), so chunks pool by addition. For a sampler step that is
linear in the model output (DDIM with eta 0, flow-matching Euler) the error of ``x_{k+1}`` is that error times
``(d x_{k+1} / d output)**2``, a per-step scalar the caller applies (``pipelines.forecast_calibration``).

    with ForecastErrorRecorder(transformer, num_steps=T, target="modules", max_gap=3,
                               guidance_scale=1.5, cfg_batched=True) as recorder:
        run the sampler once (R runs in one batch)
    copy_error, linear_error = recorder.errors()

The forecast arithmetic is the runtime's own (`last + g * (last - previous)`), so what calibration measures is
what the plan will execute.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from ._hookutils import register_hook, remove_hooks, unwrap
from .adapters import get_adapter
from .forecast import candidates, empty_errors
from .runtime import _difference, _extrapolate

_STEP_HOOK = "invardiff_forecast_step"
_STACK_INPUT_HOOK = "invardiff_forecast_stack_input"
_BLOCK_HOOK = "invardiff_forecast_block"
_SITE_HOOK = "invardiff_forecast_site"
HOOK_NAMES = (_STEP_HOOK, _STACK_INPUT_HOOK, _BLOCK_HOOK, _SITE_HOOK)
TARGETS = ("residual", "modules")

__all__ = ["ForecastErrorRecorder"]


def _model_output(output: Any) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


class ForecastErrorRecorder:
    """Record candidate forecast errors over one generation (``num_steps`` transformer calls).

    ``guidance_scale`` / ``cfg_batched``: with batched classifier-free guidance the output's first half is the
    conditional branch and the error is taken on the guided combination, as the sampler sees it.
    ``output_channels``: only the first channels enter the sampler (DiT-XL/2 also predicts a variance).
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        *,
        num_steps: int,
        target: str,
        max_gap: int = 3,
        guidance_scale: float = 1.0,
        cfg_batched: bool = False,
        output_channels: int | None = None,
        on_step=None,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        self.transformer = unwrap(transformer)
        self.adapter = get_adapter(self.transformer)
        self.sites = self.adapter.cache_sites(self.transformer)
        self.num_steps = num_steps
        self.target = target
        self.max_gap = max_gap
        self.guidance_scale = float(guidance_scale)
        self.cfg_batched = cfg_batched
        self.output_channels = output_channels
        self.on_step = on_step  # called with the number of steps recorded so far, for progress lines
        self.copy_error, self.linear_error = empty_errors(num_steps, max_gap)
        self.step = 0
        # What the hooks do in the call in flight: "capture" the true values, or "inject" a forecast.
        self.phase: str | None = None
        self.captured: dict[int, Any] = {}  # site index (or -1 for the residual) -> value of this step
        self.injected: dict[int, Any] = {}
        self.embedded: torch.Tensor | None = None
        self.history: dict[int, dict[int, Any]] = {}  # step -> captured values, a window of recent steps
        self._attached = False

    # ---- attach / detach

    def __enter__(self) -> ForecastErrorRecorder:
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        try:
            if self.target == "modules":
                for index, site in enumerate(self.sites):
                    register_hook(site.module, _SiteHook(self, index), _SITE_HOOK)
            else:
                blocks = self.adapter.blocks(self.transformer)
                for index, block in enumerate(blocks):
                    register_hook(block.module, _BlockHook(self, is_last=index == len(blocks) - 1), _BLOCK_HOOK)
                register_hook(self.adapter.stack_input(self.transformer).module, _StackInputHook(self), _STACK_INPUT_HOOK)
            registry.register_hook(_StepHook(self), _STEP_HOOK)
        except BaseException:
            remove_hooks(self.transformer, HOOK_NAMES)
            raise
        registry.invalidate_child_registries_cache()
        self._attached = True
        return self

    def __exit__(self, *exc_info) -> None:
        remove_hooks(self.transformer, HOOK_NAMES)
        self._attached = False
        self.history.clear()

    def errors(self) -> tuple[np.ndarray, np.ndarray]:
        """(copy_error (T, G), linear_error (T, G, G)), summed over the rows of the recorded generation."""
        if self.step != self.num_steps:
            raise RuntimeError(f"recorded {self.step} of {self.num_steps} steps; run one whole generation first")
        return self.copy_error.copy(), self.linear_error.copy()

    # ---- the step

    def _run_step(self, forward, args, kwargs):
        k = self.step
        if k >= self.num_steps:
            raise RuntimeError(f"ForecastErrorRecorder: more than {self.num_steps} transformer calls")
        self.phase, self.captured = "capture", {}
        try:
            output = forward(*args, **kwargs)
            truth = self._guided(output)
            for j, b, i, a in candidates(k, self.max_gap):
                self.injected = self._forecast(k, b, a)
                self.phase = "inject"
                error = self._squared_error(self._guided(forward(*args, **kwargs)), truth)
                if i is None:
                    self.copy_error[k, j] += error
                else:
                    self.linear_error[k, j, i] += error
        finally:
            self.phase, self.injected, self.embedded = None, {}, None
        self.history[k] = self.captured
        # Candidates reach back at most 2 (max_gap + 1) steps.
        self.history.pop(k - 2 * (self.max_gap + 1), None)
        self.step = k + 1
        if self.on_step is not None:
            self.on_step(self.step)
        return output

    def _forecast(self, k: int, b: int, a: int | None) -> dict[int, Any]:
        last = self.history[b]
        if a is None:
            return dict(last)
        previous, gain = self.history[a], (k - b) / (b - a)
        return {key: _extrapolate(value, _difference(value, previous[key]), gain) for key, value in last.items()}

    def _guided(self, output: Any) -> torch.Tensor:
        out = _model_output(output)
        if self.output_channels is not None:
            out = out[:, : self.output_channels]
        out = out.double()
        if self.cfg_batched:
            cond, uncond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out

    @staticmethod
    def _squared_error(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((x - y) ** 2).sum())


class _StepHook(ModelHook):
    def __init__(self, recorder: ForecastErrorRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.recorder._run_step(self.fn_ref.original_forward, args, kwargs)


class _SiteHook(ModelHook):
    def __init__(self, recorder: ForecastErrorRecorder, index: int) -> None:
        super().__init__()
        self.recorder = recorder
        self.index = index

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        recorder = self.recorder
        if recorder.phase == "inject":
            return recorder.injected[self.index]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if recorder.phase == "capture":
            recorder.captured[self.index] = output
        return output


class _StackInputHook(ModelHook):
    def __init__(self, recorder: ForecastErrorRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        recorder = self.recorder
        embedded = self.fn_ref.original_forward(*args, **kwargs)
        if recorder.phase == "inject":
            return recorder.injected[-1] + embedded
        recorder.embedded = embedded
        return embedded


class _BlockHook(ModelHook):
    def __init__(self, recorder: ForecastErrorRecorder, is_last: bool) -> None:
        super().__init__()
        self.recorder = recorder
        self.is_last = is_last

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        recorder = self.recorder
        if recorder.phase == "inject":
            return recorder.adapter.block_passthrough(args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_last and recorder.phase == "capture":
            recorder.captured[-1] = recorder.adapter.step_feature(output) - recorder.embedded
        return output
