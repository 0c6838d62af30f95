"""The embedded default model: it draws the digits asked for, deterministically, independent of batching."""

import json

import numpy as np
import pytest
import torch

from evaluation.digits_classifier import predict_digits
from pipelines import digits
from pipelines.base import Request
from pipelines.build import GeneratorConfig, build_generator

# A row's final sample may differ across batch compositions only by float rounding in batched matmuls. Measured
# on this project's CPU machines: at most 1.02e-5 after 50 guided DDIM steps, alone vs in batches of 5 and 17, with
# 1 and 2 threads (BENCHMARKS.md §1). 5e-5 leaves room for other BLAS kernels and is still 1/300 of a uint8 level;
# a batchmate leaking into a row (shared noise, a wrong CFG half) moves it by orders of magnitude more.
BATCH_INVARIANCE_ATOL = 5e-5


@pytest.fixture(scope="module")
def generator():
    return build_generator(GeneratorConfig(model="digits", device="cpu"))


def test_uncached_samples_are_the_requested_digits(generator):
    requests = [Request(id=f"r{i}", seed=1000 + i, class_label=i % 10) for i in range(100)]
    result = generator.generate(requests)
    predicted = predict_digits(result.images)
    labels = np.array([r.class_label for r in requests])
    accuracy = float(np.mean(predicted == labels))
    assert accuracy >= 0.90, f"only {accuracy:.0%} of 100 samples classified as the requested digit"


def test_same_seed_same_image(generator):
    a = generator.generate([Request("a", 7, class_label=3)])
    b = generator.generate([Request("a", 7, class_label=3)])
    assert torch.equal(a.final, b.final)


def test_row_does_not_depend_on_its_batch(generator):
    alone = generator.generate([Request("x", 42, class_label=5)]).final[0]
    others = [Request(f"o{i}", 100 + i, class_label=i) for i in range(4)]
    in_batch = generator.generate(others[:2] + [Request("x", 42, class_label=5)] + others[2:]).final[2]
    assert torch.allclose(alone, in_batch, atol=BATCH_INVARIANCE_ATOL, rtol=0)


def test_bad_class_label_is_refused(generator):
    with pytest.raises(ValueError, match="row 'bad': class_label must be an integer in \\[0, 9\\]"):
        generator.generate([Request("bad", 1, class_label=10)])


def test_committed_weights_match_the_recipe():
    config = json.loads((digits.WEIGHTS_DIR / "config.json").read_text())
    for key, value in digits.TRANSFORMER_CONFIG.items():
        assert config[key] == value, key
    record = json.loads((digits.WEIGHTS_DIR / "training.json").read_text())
    assert record["transformer_config"] == digits.TRANSFORMER_CONFIG
    assert record["class_dropout"] > 0  # guidance needs a learned null class


def test_training_recipe_is_seeded(tmp_path):
    from safetensors.torch import load_file

    from jobs.train_digits import train

    for name in ("a", "b"):
        train(tmp_path / name, steps=2, batch_size=8, warmup=1, log_every=1)
    a = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = train(tmp_path / "c", steps=2, batch_size=8, warmup=1, log_every=1, seed=1)
    assert c["seed"] == 1
    w = load_file(tmp_path / "c" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], w[k]) for k in a)
