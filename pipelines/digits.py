"""The embedded default model: a small class-conditional DiT trained on scikit-learn's digits.

Everything that defines the model lives here, so the training recipe (``jobs/train_digits.py``),
the sampler and the tests agree on one architecture, one noise schedule and one pixel encoding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NUM_CLASSES = 10
# diffusers' LabelEmbedding appends the learned "no class" row after the real classes.
NULL_CLASS = NUM_CLASSES
IMAGE_SIZE = 16

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "digits-dit"

# 8 blocks so that per-layer caching decisions have room to differ; 128 wide keeps a 30-minute CPU budget.
TRANSFORMER_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=8,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_num_groups=32,
)

# The cosine schedule keeps more signal at mid noise levels than the linear one, which matters at 16 px.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    timestep_spacing="trailing",
    set_alpha_to_one=False,
)


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 images in [-1, 1] of shape (N, 1, 16, 16), with their labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (images * 2.0 - 1.0).clamp(-1.0, 1.0).numpy(), digits.target.astype(np.int64)


def to_digit_features(images: np.ndarray) -> np.ndarray:
    """Map images in [-1, 1] of shape (N, 1, H, W) back to scikit-learn's 8x8, 0..16 digit features."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images, dtype=torch.float32)
    x = F.adaptive_avg_pool2d((x + 1.0) / 2.0, (8, 8))
    return (x.clamp(0.0, 1.0) * 16.0).reshape(len(x), -1).numpy()
