"""Named tau bundles per architecture (method spec §4.5).

A preset is ``{"nonskip_rate": float, "taus": {"step": float, family: float, ...}}`` with the family
names of docs/contracts.md. The ``paper-*`` presets are the published operating points, kept verbatim
for reproduction (paper DiT ``msa``/``mlp`` are our ``attn``/``ff``). ``fast``/``balanced``/``quality``
are our defaults; they start at paper points and are meant to be retuned on our models.
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
        "fast": _dit(0.0, 0.63, 0.22, 0.22),
        "balanced": _dit(0.0, 0.61, 0.20, 0.20),
        # Fewer gated steps: the step gate carries most of the speedup and most of the drift.
        "quality": _dit(0.0, 0.50, 0.15, 0.15),
    },
    "flux": {
        # FLUX.1-dev 1024², 28 steps, guidance 3.5, 5 calibration prompts; README speedups 3.3/2.9/2.6/2.5x.
        "paper-flux-fast": _flux(0.10, 0.70, 0.68, 0.68, 0.68, 0.68, 0.68),
        "paper-flux-medium-1": _flux(0.10, 0.70, 0.68, 0.0, 0.0, 0.68, 0.0),
        "paper-flux-medium-2": _flux(0.15, 0.70, 0.68, 0.0, 0.0, 0.70, 0.0),
        "paper-flux-slow": _flux(0.22, 0.72, 0.68, 0.66, 0.0, 0.68, 0.62),
        "fast": _flux(0.10, 0.70, 0.68, 0.68, 0.68, 0.68, 0.68),
        "balanced": _flux(0.10, 0.70, 0.68, 0.0, 0.0, 0.68, 0.0),
        # Medium-2 rather than Slow: it reuses no feed-forward (blemishes) and no single-block MLP (moiré),
        # the two families the authors' comments blame for visible artefacts, and warms up longer.
        "quality": _flux(0.15, 0.70, 0.68, 0.0, 0.0, 0.70, 0.0),
    },
}


def preset_names(architecture: str) -> list[str]:
    """The preset names available for ``architecture``."""
    return list(_presets_for(architecture))


def get_preset(architecture: str, name: str) -> dict[str, Any]:
    """A copy of preset ``name`` for ``architecture``: ``{"nonskip_rate": float, "taus": {...}}``."""
    presets = _presets_for(architecture)
    if name not in presets:
        raise ValueError(f"no {architecture!r} preset named {name!r}; valid names: {', '.join(presets)}")
    return copy.deepcopy(presets[name])


def _presets_for(architecture: str) -> dict[str, dict[str, Any]]:
    if architecture not in PRESETS:
        raise ValueError(f"no presets for architecture {architecture!r}; valid architectures: {', '.join(PRESETS)}")
    return PRESETS[architecture]
