"""InvarDiff feature caching for diffusers diffusion transformers (DiT, FLUX).

    import invardiff
    plan = invardiff.calibrate(pipe, class_labels, num_inference_steps=50, preset="fast")   # or target_speedup=3
    invardiff.enable(pipe, plan)      # every later pipe(...) call runs under the plan, checked against it
    invardiff.disable(pipe)

The public names below are loaded on first use (PEP 562): `import invardiff.plan` (the plan object, pure numpy)
and the CLI stay free of torch/diffusers imports, which cost several seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "enable": "api",
    "disable": "api",
    "calibrate": "api",
    "compile_blocks": "compile",
    "pipeline_signature": "api",
    "PlanCallMismatch": "api",
    "Plan": "plan",
    "PlanError": "plan",
    "PlanMismatchError": "plan",
    "PipelineSignature": "plan",
    "ForecastTarget": "tuning",
    "CachePolicy": "policy",
    "DiCachePolicy": "policies.dicache",
    "L2CPolicy": "policies.l2c",
    "L2CRouter": "policies.l2c",
    "make_policy": "policies",
    "InvarDiffPolicy": "policy",
    "NoCache": "policy",
    "RateRecorder": "recorder",
    "CacheStats": "runtime",
    "apply_invardiff": "runtime",
    "cache_context": "runtime",
    "invardiff_cache_contents": "runtime",
    "invardiff_stats": "runtime",
    "remove_invardiff": "runtime",
    "reset_invardiff": "runtime",
    "UnsupportedModelError": "adapters",
    "get_adapter": "adapters",
    "layers": "adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .api import PlanCallMismatch, calibrate, disable, enable, pipeline_signature
    from .compile import compile_blocks
    from .plan import PipelineSignature, Plan, PlanError, PlanMismatchError
    from .tuning import ForecastTarget
    from .adapters import UnsupportedModelError, get_adapter, layers
    from .policies import make_policy
    from .policies.dicache import DiCachePolicy
    from .policies.l2c import L2CPolicy, L2CRouter
    from .policy import CachePolicy, InvarDiffPolicy, NoCache
    from .recorder import RateRecorder
    from .runtime import (
        CacheStats,
        apply_invardiff,
        cache_context,
        invardiff_cache_contents,
        invardiff_stats,
        remove_invardiff,
        reset_invardiff,
    )
