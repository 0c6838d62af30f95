"""Named operating points: forecast targets (the product defaults) and the paper's tau bundles.

Forecast presets (``FORECAST_PRESETS``, any architecture) name a counted speedup; calibration places the
computed steps by calibrated forecast error to reach it (``invardiff.forecast``, method-forecast.md):

    preset     target   measured on the digits DiT (held-out seeds, BENCHMARKS.md section 3)
    quality    2.0x
    balanced   2.5x
    fast       3.0x
    turbo      4.0x

Paper presets (``PRESETS``) are ``{"nonskip_rate": float, "taus": {"step": float, family: float, ...}}`` with
the family names of docs/contracts.md, run in ``paper`` mode (the InvarDiff method exactly). The ``paper-*``
ones are the published operating points, kept verbatim for reproduction (paper DiT ``msa``/``mlp`` are our
``attn``/``ff``). The ``copy-*`` DiT bundles are the best paper-mode points measured on the digits DiT before
forecasting existed (BENCHMARKS.md section 3 keeps their table); they remain for comparison.
"""

from __future__ import annotations

import copy
from typing import Any


def _dit(nonskip_rate: float, step: float, attn: float, ff: float) -> dict[str, Any]:
    return {"nonskip_rate": nonskip_rate, "taus": {"step": step, "attn": attn, "ff": ff}}


def _flux(
    nonskip_rate: float, step: float, attn: float, ff: float, context_ff: float, single_attn: float, single_mlp: float
) -> dict[str, Any]:
    # context_attn shares the attn tau (the README's tau_dual-attn); each still gets its own quantile mask.
    taus = {"step": step, "attn": attn, "context_attn": attn, "ff": ff, "context_ff": context_ff,
            "single_attn": single_attn, "single_mlp": single_mlp}  # fmt: skip
    return {"nonskip_rate": nonskip_rate, "taus": taus}


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dit": {
        # DiT-XL/2 256², DDIM-50, CFG 4.0, 16 calibration runs; README speedups 2.8x and 2.5x.
        "paper-dit-fast": _dit(0.0, 0.63, 0.22, 0.22),
        "paper-dit-slow": _dit(0.0, 0.61, 0.20, 0.20),
        # Paper mode on the digits DiT (2.59x / 2.37x / 1.63x ideal; BENCHMARKS.md section 3).
        "copy-fast": _dit(0.0, 0.30, 0.85, 0.85),
        "copy-balanced": _dit(0.0, 0.30, 0.70, 0.70),
        # No step gate: every step recomputes H, so nothing drifts across steps; lowest error of the sweep.
        "copy-quality": _dit(0.0, 0.0, 0.40, 0.40),
    },
    "flux": {
        # FLUX.1-dev 1024², 28 steps, guidance 3.5, 5 calibration prompts; README speedups 3.3/2.9/2.6/2.5x.
        "paper-flux-fast": _flux(0.10, 0.70, 0.68, 0.68, 0.68, 0.68, 0.68),
        "paper-flux-medium-1": _flux(0.10, 0.70, 0.68, 0.0, 0.0, 0.68, 0.0),
        "paper-flux-medium-2": _flux(0.15, 0.70, 0.68, 0.0, 0.0, 0.70, 0.0),
        "paper-flux-slow": _flux(0.22, 0.72, 0.68, 0.66, 0.0, 0.68, 0.62),
    },
}

# Counted speedup per forecast preset: steps / computed steps (every cached module skipped on a gated step).
FORECAST_PRESETS: dict[str, float] = {"quality": 2.0, "balanced": 2.5, "fast": 3.0, "turbo": 4.0}
DEFAULT_PRESET = "balanced"


def is_forecast_preset(name: str) -> bool:
    return name in FORECAST_PRESETS


def preset_names(architecture: str) -> list[str]:
    """The preset names available for ``architecture``: forecast targets first, then the paper-mode bundles."""
    return [*FORECAST_PRESETS, *_presets_for(architecture)]


def get_preset(architecture: str, name: str) -> dict[str, Any]:
    """A copy of preset ``name`` for ``architecture``: ``{"target_speedup": float}`` for a forecast preset,
    ``{"nonskip_rate": float, "taus": {...}}`` for a paper-mode one."""
    presets = _presets_for(architecture)
    if name in FORECAST_PRESETS:
        return {"target_speedup": FORECAST_PRESETS[name]}
    if name not in presets:
        names = ", ".join(preset_names(architecture))
        raise ValueError(f"no {architecture!r} preset named {name!r}; valid names: {names}")
    return copy.deepcopy(presets[name])


def _presets_for(architecture: str) -> dict[str, dict[str, Any]]:
    if architecture not in PRESETS:
        raise ValueError(f"no presets for architecture {architecture!r}; valid architectures: {', '.join(PRESETS)}")
    return PRESETS[architecture]
