"""Cache policies: what the pipelines attach to a transformer for one batch (contracts.md, "Cache policies").

A policy attaches once, is reset before every generation, and reports what ran since the last reset as
`CacheStats`, so uncached and cached rows of the output table count evaluations the same way.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ._hookutils import register_hook, remove_hooks, unwrap
from .adapters import get_adapter
from .runtime import CacheStats, apply_invardiff, invardiff_stats, remove_invardiff, reset_invardiff

__all__ = ["CachePolicy", "InvarDiffPolicy", "NoCache"]

_CALL_COUNTER_HOOK = "invardiff_nocache_calls"


@runtime_checkable
class CachePolicy(Protocol):
    name: str
    plan_id: str | None

    def attach(self, transformer: torch.nn.Module) -> None: ...

    def detach(self, transformer: torch.nn.Module) -> None: ...

    def reset(self, transformer: torch.nn.Module) -> None: ...

    def stats(self, transformer: torch.nn.Module) -> CacheStats: ...


class _CallCounterHook(ModelHook):
    """Counts completed top-level transformer calls. Deliberately not stateful: diffusers' end-of-pipeline
    `reset_stateful_hooks` must not zero it before the caller reads the stats."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.calls += 1
        return output


class NoCache:
    """Full computation. Its stats count the evaluations that ran: every step, every layer of every family."""

    name = "none"
    plan_id = None

    def attach(self, transformer: torch.nn.Module) -> None:
        transformer = unwrap(transformer)
        self._layers = get_adapter(transformer).layers(transformer)
        register_hook(transformer, _CallCounterHook(), _CALL_COUNTER_HOOK)

    def detach(self, transformer: torch.nn.Module) -> None:
        remove_hooks(unwrap(transformer), (_CALL_COUNTER_HOOK,))

    def _counter(self, transformer: torch.nn.Module) -> _CallCounterHook:
        registry = HookRegistry.check_if_exists_or_initialize(unwrap(transformer))
        hook = registry.get_hook(_CALL_COUNTER_HOOK)
        if hook is None:
            raise ValueError("NoCache is not attached to this transformer")
        return hook

    def reset(self, transformer: torch.nn.Module) -> None:
        self._counter(transformer).calls = 0

    def stats(self, transformer: torch.nn.Module) -> CacheStats:
        steps = self._counter(transformer).calls
        per_family = {family: (steps * n, steps * n) for family, n in self._layers.items()}
        evals = sum(computed for computed, _ in per_family.values())
        return CacheStats(
            steps_total=steps,
            steps_computed=steps,
            module_evals_total=evals,
            module_evals_computed=evals,
            per_family=per_family,
        )


class InvarDiffPolicy:
    """Execute a calibrated InvarDiff plan (anything with `step_gate`, `modules`, `plan_id`)."""

    name = "invardiff"

    def __init__(self, plan: Any) -> None:
        self.plan = plan
        self.plan_id = plan.plan_id

    def attach(self, transformer: torch.nn.Module) -> None:
        apply_invardiff(transformer, self.plan)

    def detach(self, transformer: torch.nn.Module) -> None:
        remove_invardiff(transformer)

    def reset(self, transformer: torch.nn.Module) -> None:
        reset_invardiff(transformer)

    def stats(self, transformer: torch.nn.Module) -> CacheStats:
        return invardiff_stats(transformer)
