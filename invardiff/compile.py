"""`torch.compile` under an InvarDiff plan: compile what computes, decide in Python.

    invardiff.enable(pipe, plan)
    invardiff.compile_blocks(pipe)                  # after enable; again after every re-enable
    images = pipe(...).images                       # compiles on the first call, never again for this shape

Compiling the whole transformer does not work with a cache: the hooks read the step index and the plan's per-step
decisions, and dynamo specialises on those Python values, so every step is a new guard failure and a recompile
until dynamo's recompile limit (8) sends the rest of the run back to eager. This is regional compilation, as
diffusers' `compile_repeated_blocks`, split at the cache's decisions:

* each block's own computation (what its InvarDiff block hook runs on a computed step) is one compiled region;
* each cache site's own computation (attention, feed-forward, ...) is another;
* every decision (gate the block, reuse or forecast the site, keep the slot) and every counter runs eagerly
  between them: a site module's hooked forward is excluded from tracing (`torch.compiler.disable`), so the block's
  graph breaks there and resumes after it.

Blocks of one class share their code, so the regions compile once per distinct input shape and dtype, for every
block and every step. Inputs are made contiguous before they enter a region, because the patch embedding's output
is a transposed view and guards include strides; without it the first block would compile twice.
"""

from __future__ import annotations

from typing import Any

import torch

from ._hookutils import unwrap

__all__ = ["compile_blocks"]

_BLOCK_HOOK = "invardiff_block"
_MODULE_HOOK = "invardiff_module"


def compile_blocks(transformer: torch.nn.Module, **compile_kwargs: Any) -> int:
    """Compile the computing regions of `transformer` (or a pipeline's) under the InvarDiff plan applied to it.

    `compile_kwargs` go to `torch.compile` (`backend`, `mode`, `options`); `dynamic` defaults to False, so each
    distinct shape gets its own static graph. Removing InvarDiff (`invardiff.disable`, `remove_invardiff`) drops the
    compiled regions with the hooks. Returns the number of regions.
    """
    from .runtime import _step_hook

    transformer = unwrap(getattr(transformer, "transformer", transformer))
    if compile_kwargs.get("fullgraph"):
        raise ValueError("compile_blocks: fullgraph=True is impossible, the graph breaks at every cache decision")
    _step_hook(transformer)  # raises when no plan is applied: there would be no decisions to keep out
    compile_kwargs.setdefault("dynamic", False)
    regions = 0
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in (_BLOCK_HOOK, _MODULE_HOOK):
            hook = registry.get_hook(name)
            if hook is None:
                continue
            if hook.compiled_forward is not None:
                raise ValueError("compile_blocks: already compiled; it compiles once per applied plan")
            hook.compiled_forward = _ContiguousInputs(torch.compile(hook.fn_ref.original_forward, **compile_kwargs))
            if name == _MODULE_HOOK:
                # `module.forward` is the registry's hooked forward; the registry restores the original on removal.
                module.forward = torch.compiler.disable(module.forward)
            regions += 1
    return regions


class _ContiguousInputs:
    """Calls `fn` with every tensor argument made contiguous (a no-op for the ones that already are)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*_contiguous(args), **{name: _contiguous(value) for name, value in kwargs.items()})


def _contiguous(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, (tuple, list)):
        return type(value)(_contiguous(v) for v in value)
    return value
