"""Pieces shared by the runtime, policy and recorder hooks: per-context state, the step hook that owns it, hook
registration, plan-book checks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context

DEFAULT_CONTEXT = "default"


class ContextStateManager(StateManager):
    """A diffusers `StateManager` that keeps one state per cache-context name and falls back to a single
    `"default"` state when no context is set.

    Subclassing `StateManager` matters: `diffusers.hooks.hooks._set_cache_context` (what `cache_context(...)`
    calls) finds the managers to update by `isinstance(attr, StateManager)` on every stateful hook. The base class
    raises when no context is set; DiT has no `cache_context` at all, so its sampler usually sets none.
    """

    def context_name(self) -> str:
        return self._context.name if self._context is not None else DEFAULT_CONTEXT

    def get_state(self):
        name = self.context_name()
        state = self._state_cache.get(name)
        if state is None:
            state = self._state_cache[name] = self._state_cls(*self._init_args, **self._init_kwargs)
        return state

    def states(self) -> dict[str, Any]:
        """{context name: state} for the contexts seen since the last reset."""
        return dict(self._state_cache)

    def clear_states(self) -> None:
        """Drop every context's state but keep the current context: the caller may still be inside a
        `cache_context(...)` block (the base `reset` also clears the context, which is right for diffusers'
        end-of-pipeline reset but not for our own reset after an exception)."""
        for state in self._state_cache.values():
            state.reset()
        self._state_cache.clear()


class ContextStepHook(ModelHook):
    """The transformer-level hook of a caching runtime: it owns one state per cache context and sets the
    runtime's `active` state, which the runtime's other hooks read, for the duration of one transformer call.

    `runtime` is any object with an `active` attribute; `state_cls` a `BaseState` with a `step` counter and a
    `reset()` that frees what it holds.
    """

    _is_stateful = True

    def __init__(self, runtime: Any, state_cls: type) -> None:
        super().__init__()
        self.runtime = runtime
        # A StateManager attribute on a stateful hook is what `cache_context(...)` updates.
        self.state_manager = ContextStateManager(state_cls)

    def run_call(self, state: Any, *args, **kwargs):
        """The original forward with `state` active. A call that raises leaves half-written state behind, which
        no later call may read, so every context is cleared before the error propagates."""
        self.runtime.active = state
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        except BaseException:
            self.clear()
            raise
        finally:
            self.runtime.active = None

    @staticmethod
    def advance(state: Any, num_steps: int) -> None:
        """Count a finished call; after `num_steps` the context's generation is over: free what it holds and
        start again at step 0."""
        state.step += 1
        if state.step == num_steps:
            state.reset()

    def clear(self) -> None:
        """Drop every context's state (the caller may still be inside a `cache_context(...)` block)."""
        self.runtime.active = None
        self.state_manager.clear_states()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # Called by diffusers' `reset_stateful_hooks`, e.g. from `pipeline.maybe_free_model_hooks()` at the end of
        # every FluxPipeline call. Frees the states; whatever the runtime counts stays for the caller to read.
        self.runtime.active = None
        self.state_manager.reset()
        return module


def unwrap(transformer: torch.nn.Module) -> torch.nn.Module:
    """The module hooks belong on: the original model under a `torch.compile` wrapper."""
    return getattr(transformer, "_orig_mod", transformer)


def register_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def remove_hooks(transformer: torch.nn.Module, names: tuple[str, ...]) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in names:
        registry.remove_hook(name, recurse=True)
    # Removing hooks from descendants stales the child-registry list that `cache_context` walks (diffusers #14037).
    registry.invalidate_child_registries_cache()


@contextmanager
def cache_context(transformer: torch.nn.Module, name: str, **kwargs) -> Iterator[None]:
    """`transformer.cache_context(name, ...)` for any transformer, including ones without diffusers' `CacheMixin`
    (DiTTransformer2DModel in 0.42 has no `cache_context`). Calls inside the block count steps and keep cache slots
    under `name`, separately from every other context."""
    transformer = unwrap(transformer)
    if hasattr(transformer, "cache_context"):
        with transformer.cache_context(name, **kwargs):
            yield
        return
    _set_cache_context(transformer, CacheContext(name, **kwargs))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)


def check_books(step_gate: Any, modules: Mapping[str, Any], layers: Mapping[str, int], what: str):
    """Validate a step gate and module books against a model's families and layer counts.

    Returns (step_gate as a list of bools, {family: per-layer lists of bools, indexed [layer][step]}): plain Python
    bools, so the hot path indexes lists instead of touching numpy scalars or tensors.
    """
    step_gate = np.asarray(step_gate)
    if step_gate.dtype != np.bool_ or step_gate.ndim != 1 or step_gate.shape[0] == 0:
        raise ValueError(
            f"{what}: step_gate must be a non-empty 1-D bool array, got {step_gate.dtype}{step_gate.shape}"
        )
    num_steps = step_gate.shape[0]
    missing = [family for family in layers if family not in modules]
    extra = [family for family in modules if family not in layers]
    if missing or extra:
        raise ValueError(
            f"{what}: module families do not match the model (expected {list(layers)}; missing {missing}, "
            f"unexpected {extra})"
        )
    books = {}
    for family, num_layers in layers.items():
        book = np.asarray(modules[family])
        if book.dtype != np.bool_ or book.shape != (num_steps, num_layers):
            raise ValueError(
                f"{what}: modules[{family!r}] must be bool[{num_steps}, {num_layers}], got {book.dtype}{book.shape}"
            )
        books[family] = book.T.tolist()
    return step_gate.tolist(), books
