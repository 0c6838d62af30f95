"""diffusers `FluxTransformer2DModel` (0.42): dual-stream `FluxTransformerBlock`s, then single-stream
`FluxSingleTransformerBlock`s. Both block types take `(hidden_states, encoder_hidden_states, temb, ...)` and
return `(encoder_hidden_states, hidden_states)`.

Families (contracts.md):
* `attn` + `context_attn`: the dual block's joint `attn` module, which returns `(image, text)` outputs (plus an
  IP-Adapter output when one is loaded) before the block applies `gate_msa` / `c_gate_msa`. It is one call, so it
  is skipped only when both books say reuse (method §4.4, AND rule) and then both streams come from the slot.
* `ff` / `context_ff`: the dual block's `ff` / `ff_context`, pre-gate.
* `single_attn` / `single_mlp`: the single block's `attn` and `proj_mlp`. The block still runs `act_mlp`,
  `proj_out` and its gate on reused values.
H is the image stream leaving the last block of the stack (the last single block when there is one).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import BlockSite, CacheSite, TransformerAdapter, UnsupportedModelError, argument


class FluxAdapter(TransformerAdapter):
    architecture = "flux"
    model_class_name = "FluxTransformer2DModel"
    families = ("attn", "context_attn", "ff", "context_ff", "single_attn", "single_mlp")

    def matches(self, transformer: torch.nn.Module) -> bool:
        from diffusers import FluxTransformer2DModel

        return isinstance(transformer, FluxTransformer2DModel)

    def check_supported(self, transformer: torch.nn.Module) -> None:
        if len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks) == 0:
            raise UnsupportedModelError("FluxTransformer2DModel without blocks has nothing to cache.")

    def check_call(self, args: tuple, kwargs: dict) -> None:
        # ControlNet residuals are added after every block of the forward loop; on a gated step they would be added
        # to the reused H, and the recorded H would miss the last residual. Refuse rather than run something else.
        controlnet = ("controlnet_block_samples", "controlnet_single_block_samples")
        if any(kwargs.get(name) is not None for name in controlnet):
            raise UnsupportedModelError("InvarDiff does not support FLUX ControlNet residuals.")

    def cache_sites(self, transformer: torch.nn.Module) -> list[CacheSite]:
        sites = []
        for layer, block in enumerate(transformer.transformer_blocks):
            prefix = f"transformer_blocks.{layer}"
            sites.append(CacheSite(f"{prefix}.attn", block.attn, layer, ("attn", "context_attn"), (0, 1)))
            sites.append(CacheSite(f"{prefix}.ff", block.ff, layer, ("ff",), (None,)))
            sites.append(CacheSite(f"{prefix}.ff_context", block.ff_context, layer, ("context_ff",), (None,)))
        for layer, block in enumerate(transformer.single_transformer_blocks):
            prefix = f"single_transformer_blocks.{layer}"
            sites.append(CacheSite(f"{prefix}.attn", block.attn, layer, ("single_attn",), (None,)))
            sites.append(CacheSite(f"{prefix}.proj_mlp", block.proj_mlp, layer, ("single_mlp",), (None,)))
        return sites

    def blocks(self, transformer: torch.nn.Module) -> list[BlockSite]:
        dual = [BlockSite(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
        single = [
            BlockSite(f"single_transformer_blocks.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)
        ]
        return dual + single

    def stack_input(self, transformer: torch.nn.Module) -> BlockSite:
        # x_embedder: (B, N_img, in_channels) -> (B, N_img, D), the shape of H. The text embedder still runs on a
        # gated step (its output passes through the skipped blocks unused); it is one small linear layer.
        return BlockSite("x_embedder", transformer.x_embedder)

    def block_passthrough(self, args: tuple, kwargs: dict) -> Any:
        hidden_states = argument("hidden_states", 0, args, kwargs)
        encoder_hidden_states = argument("encoder_hidden_states", 1, args, kwargs)
        return encoder_hidden_states, hidden_states

    def step_feature(self, last_block_output: Any) -> torch.Tensor:
        return last_block_output[1]
