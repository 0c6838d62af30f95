"""diffusers `DiTTransformer2DModel` (0.42): a stack of `BasicTransformerBlock`s with ada_norm_zero.

Per block, `attn1` and `ff` return their outputs before the block multiplies them by `gate_msa` / `gate_mlp`, so
hooking those two modules caches exactly the pre-gate outputs of the method (§2), and a reused output still gets
the current step's gate. The final layer calls `transformer_blocks[0].norm1.emb(...)` directly, not block 0's
forward, so the current step's conditioning is still computed when every block is skipped.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import BlockSite, CacheSite, TransformerAdapter, UnsupportedModelError, argument


class DiTAdapter(TransformerAdapter):
    architecture = "dit"
    model_class_name = "DiTTransformer2DModel"
    families = ("attn", "ff")

    def matches(self, transformer: torch.nn.Module) -> bool:
        from diffusers import DiTTransformer2DModel

        return isinstance(transformer, DiTTransformer2DModel)

    def check_supported(self, transformer: torch.nn.Module) -> None:
        for index, block in enumerate(transformer.transformer_blocks):
            if block.norm_type != "ada_norm_zero":
                raise UnsupportedModelError(
                    f"transformer_blocks.{index} uses norm_type={block.norm_type!r}; InvarDiff's DiT adapter needs "
                    "'ada_norm_zero' (attn1/ff outputs are pre-gate only there)."
                )
            if block.attn2 is not None:
                raise UnsupportedModelError(
                    f"transformer_blocks.{index} has cross-attention, which has no plan family."
                )
            if block._chunk_size is not None:
                # Chunked feed-forward calls `ff` once per chunk, which would desynchronise the per-step slots.
                raise UnsupportedModelError(
                    f"transformer_blocks.{index} has feed-forward chunking enabled; "
                    "disable it before applying InvarDiff."
                )

    def cache_sites(self, transformer: torch.nn.Module) -> list[CacheSite]:
        sites = []
        for layer, block in enumerate(transformer.transformer_blocks):
            sites.append(CacheSite(f"transformer_blocks.{layer}.attn1", block.attn1, layer, ("attn",), (None,)))
            sites.append(CacheSite(f"transformer_blocks.{layer}.ff", block.ff, layer, ("ff",), (None,)))
        return sites

    def blocks(self, transformer: torch.nn.Module) -> list[BlockSite]:
        return [BlockSite(f"transformer_blocks.{i}", block) for i, block in enumerate(transformer.transformer_blocks)]

    def stack_input(self, transformer: torch.nn.Module) -> BlockSite:
        # PatchEmbed: conv patchify + positional embedding, (B, C, H, W) -> (B, N, D), the shape of H.
        return BlockSite("pos_embed", transformer.pos_embed)

    def block_passthrough(self, args: tuple, kwargs: dict) -> Any:
        return argument("hidden_states", 0, args, kwargs)

    def step_feature(self, last_block_output: Any) -> torch.Tensor:
        return last_block_output
