"""Per-architecture knowledge for the InvarDiff hooks: which submodules are cached, which blocks a gated step
skips, and where the step feature H is read."""

from __future__ import annotations

import torch

from .base import BlockSite, CacheSite, TransformerAdapter, UnsupportedModelError
from .dit import DiTAdapter
from .flux import FluxAdapter

ADAPTERS: tuple[TransformerAdapter, ...] = (DiTAdapter(), FluxAdapter())


def _unwrap(transformer: torch.nn.Module) -> torch.nn.Module:
    # torch.compile wraps the model in an OptimizedModule; the hooks belong on the original.
    return getattr(transformer, "_orig_mod", transformer)


def get_adapter(transformer: torch.nn.Module) -> TransformerAdapter:
    """The adapter for `transformer`'s class; `UnsupportedModelError` for anything else."""
    transformer = _unwrap(transformer)
    for adapter in ADAPTERS:
        if adapter.matches(transformer):
            adapter.check_supported(transformer)
            return adapter
    supported = ", ".join(f"{a.model_class_name} ({a.architecture})" for a in ADAPTERS)
    raise UnsupportedModelError(f"InvarDiff has no adapter for {type(transformer).__name__}; supported: {supported}.")


def layers(transformer: torch.nn.Module) -> dict[str, int]:
    """{family: number of layers} for `transformer`, in plan order."""
    transformer = _unwrap(transformer)
    return get_adapter(transformer).layers(transformer)


__all__ = [
    "ADAPTERS",
    "BlockSite",
    "CacheSite",
    "DiTAdapter",
    "FluxAdapter",
    "TransformerAdapter",
    "UnsupportedModelError",
    "get_adapter",
    "layers",
]
