"""Tiny DiT test models: seeded, in eval mode, and saved in the layout of facebook/DiT-XL-2-256."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported

import pytest
import torch

from pipelines.fetch import model_fingerprint
from pipelines.tiny import NUM_CLASSES, save_tiny_dit, tiny_dit


def test_pixel_dit_is_seeded_and_deterministic():
    model = tiny_dit(seed=0, layers=3)
    assert len(model.transformer_blocks) == 3 and model.config.in_channels == 1
    assert model_fingerprint(tiny_dit(seed=0, layers=3)) == model_fingerprint(model)

    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((16,), 500)
    labels = torch.arange(16) % (NUM_CLASSES + 1)  # index NUM_CLASSES is the learned null class
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=labels).sample
        again = model(x, timestep=t, class_labels=labels).sample
    # In training mode the class embedding drops each label with probability 0.1 (32 draws here: 97 % that one
    # drops); eval mode keeps calls deterministic.
    assert torch.equal(out, again)
    assert out.shape == (16, 1, 16, 16)
    with torch.no_grad():
        relabelled = model(x, timestep=t, class_labels=(labels + 1) % NUM_CLASSES).sample
    assert (relabelled - out).abs().max() > 1e-3  # the class conditions the output


def test_latent_dit_comes_with_a_matching_vae():
    transformer, vae = tiny_dit(seed=0, latent=True, with_vae=True)
    assert transformer.config.out_channels == 2 * transformer.config.in_channels  # learned variance, as DiT-XL-2
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean
    assert latents.shape[1:] == (transformer.config.in_channels, transformer.config.sample_size, 8)
    with pytest.raises(ValueError, match="no VAE"):
        tiny_dit(with_vae=True)


@pytest.mark.parametrize("latent", [False, True])
def test_saved_layout_loads_back(tmp_path, latent):
    from diffusers import DiTPipeline

    directory = save_tiny_dit(tmp_path / "tiny-dit", seed=2, layers=2, latent=latent)
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert len(index["id2label"]) == NUM_CLASSES
    assert (directory / "vae").is_dir() == latent

    pipeline = DiTPipeline.from_pretrained(directory, **({} if latent else {"vae": None}))
    assert model_fingerprint(pipeline.transformer) == model_fingerprint(tiny_dit(seed=2, layers=2, latent=latent))
    assert pipeline.labels["class 3"] == 3
    assert (pipeline.vae is not None) == latent
