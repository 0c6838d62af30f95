"""What the runtime and the recorder need to know about one transformer architecture.

An adapter names the cacheable module families (the plan's `modules` keys), the submodule that computes each of
them, the block stack that a gated step skips, the module whose output enters that stack, and how to read the
step feature H from the last block. Everything architecture-specific lives here, so the hooks in
`invardiff.runtime` and `invardiff.recorder` stay generic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


class UnsupportedModelError(TypeError):
    """The transformer is not one InvarDiff has an adapter for, or is configured in a way the adapter cannot hook."""


@dataclass(frozen=True)
class CacheSite:
    """One hooked submodule whose pre-gate output can be reused.

    Most sites hold one family. FLUX's joint attention module computes the image and the text stream in one call,
    so that site holds both `attn` and `context_attn`: the call is skipped only when both books say reuse, and the
    recorder reads each family from its own element of the returned tuple (`output_index`).
    """

    name: str  # path inside the transformer, e.g. "transformer_blocks.3.attn"
    module: torch.nn.Module
    layer: int
    families: tuple[str, ...]
    output_index: tuple[int | None, ...]  # per family: element of a tuple output, or None for a plain tensor

    def family_outputs(self, output: Any) -> tuple[torch.Tensor, ...]:
        """The per-family tensors of this site's output, in `families` order."""
        return tuple(output if index is None else output[index] for index in self.output_index)


@dataclass(frozen=True)
class BlockSite:
    name: str
    module: torch.nn.Module


def argument(name: str, position: int, args: tuple, kwargs: dict) -> Any:
    """A forward argument that callers pass either by keyword or by position (gradient checkpointing passes
    positionally, the plain loops of the 0.42 models mostly by keyword)."""
    if name in kwargs:
        return kwargs[name]
    return args[position]


class TransformerAdapter:
    """Base class. Subclasses set `architecture`, `model_class_name` and `families` (plan order = forward order)
    and implement the rest."""

    architecture: str = ""
    model_class_name: str = ""
    families: tuple[str, ...] = ()

    def matches(self, transformer: torch.nn.Module) -> bool:
        raise NotImplementedError

    def check_supported(self, transformer: torch.nn.Module) -> None:
        """Raise `UnsupportedModelError` when the model is configured in a way the hooks would silently mishandle."""

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """Raise `UnsupportedModelError` for transformer-call arguments a plan cannot be applied to."""

    def layers(self, transformer: torch.nn.Module) -> dict[str, int]:
        """{family: number of layers} in `families` order."""
        counts = {family: 0 for family in self.families}
        for site in self.cache_sites(transformer):
            for family in site.families:
                counts[family] += 1
        return counts

    def cache_sites(self, transformer: torch.nn.Module) -> list[CacheSite]:
        """Every cacheable submodule, in forward order."""
        raise NotImplementedError

    def blocks(self, transformer: torch.nn.Module) -> list[BlockSite]:
        """The step-gated block stack, in forward order. Its last block's output carries H."""
        raise NotImplementedError

    def stack_input(self, transformer: torch.nn.Module) -> BlockSite:
        """The module whose output is the image stream entering the block stack (the patch embedding). On a gated
        step it is not run and returns H from the last computed step instead, which then flows through the
        (passed-through) blocks to the final norm/projection."""
        raise NotImplementedError

    def block_passthrough(self, args: tuple, kwargs: dict) -> Any:
        """What a block returns on a gated step: its inputs, unchanged, in the shape of its normal output."""
        raise NotImplementedError

    def step_feature(self, last_block_output: Any) -> torch.Tensor:
        """H: the image-stream hidden states leaving the last block."""
        raise NotImplementedError
