"""A name for a model's weights, so a plan can say which weights it was calibrated on."""

from __future__ import annotations

import hashlib

import torch


def module_fingerprint(module: torch.nn.Module) -> str:
    """``sha256:`` of every state-dict entry in name order: name, dtype, shape and all bytes. Any changed weight,
    dtype or shape changes it. Cost: one read of all weights (tens of seconds for a 12B-parameter model)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # Viewing as bytes works for every dtype, bfloat16 included, which numpy cannot represent.
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"
