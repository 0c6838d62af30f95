"""The FLUX generator on a tiny offline pipeline: determinism, batch invariance, guidance modes, signature, loading."""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers or transformers are imported

import numpy as np
import pytest
import torch

from pipelines.base import Request
from pipelines.fetch import model_fingerprint
from pipelines.flux import FluxGenerator, flux_layer_counts, load_flux_pipeline, tiny_flux_pipeline

# 32x32 images are 16x16 latents, 64 image tokens; 16 text tokens. A generation takes tens of milliseconds.
SETTINGS = dict(num_inference_steps=4, height=32, width=32, max_sequence_length=16)

# CPU float32: the same row alone and inside a batch of 3 to 8 differs by at most 7.2e-7 in final latents of
# magnitude ~4 (about 1.5 ulp), measured over batch sizes, positions and both guidance modes. 2e-6 keeps a 3x
# margin for other CPUs' kernels. Pixels may flip one level where a value sits on a rounding boundary.
BATCH_INVARIANCE_ATOL = 2e-6


@pytest.fixture(scope="module")
def pipeline():
    return tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def generator(pipeline):
    return FluxGenerator(pipeline, **SETTINGS)


@pytest.fixture(scope="module")
def saved_pipeline(pipeline, tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "tiny-flux"
    pipeline.save_pretrained(directory)
    return directory


CAT = Request("cat", seed=1, prompt="a red cat")


def test_tiny_pipeline_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    first = tiny_flux_pipeline(seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    assert model_fingerprint(first.transformer) == model_fingerprint(tiny_flux_pipeline(seed=0).transformer)
    assert model_fingerprint(first.transformer) != model_fingerprint(tiny_flux_pipeline(seed=1).transformer)
    assert tiny_flux_pipeline(seed=0, dtype=torch.bfloat16).transformer.dtype == torch.bfloat16


def test_generate_is_deterministic_per_seed(generator):
    result = generator.generate([CAT])
    assert result.images.dtype == np.uint8 and result.images.shape == (1, 32, 32, 3)
    assert result.final.shape == (1, 4, 16, 16)  # unpacked latents, 4 VAE channels at half the image size
    assert 0 < result.denoise_seconds < result.seconds
    assert result.images.std() > 5  # a random model still draws something, not a flat image

    again = generator.generate([CAT])
    assert np.array_equal(again.images, result.images)
    assert torch.equal(again.final, result.final)
    other_seed = generator.generate([dataclasses.replace(CAT, seed=2)])
    assert (other_seed.final - result.final).abs().max() > 1.0
    # A random model listens to its prompt only weakly, but far above float noise.
    other_prompt = generator.generate([dataclasses.replace(CAT, prompt="a blue dog")])
    assert (other_prompt.final - result.final).abs().max() > 1e-2


def test_a_row_does_not_depend_on_its_batch(generator):
    alone = generator.generate([CAT])
    batch = [Request("dogs", 7, prompt="dogs 2"), CAT, Request("empty", 3, prompt="")]
    together = generator.generate(batch)
    assert together.images.shape == (3, 32, 32, 3)
    torch.testing.assert_close(together.final[1], alone.final[0], atol=BATCH_INVARIANCE_ATOL, rtol=0)
    assert np.abs(together.images[1].astype(int) - alone.images[0]).max() <= 1
    # The other rows are really different images, so the batch did mix conditions.
    assert (together.final[0] - together.final[1]).abs().max() > 1.0


class _CacheContextRecorder:
    """A stateful diffusers hook that records the cache context of every transformer call, the way caching hooks
    (and InvarDiff's runtime) see it."""

    def __init__(self, transformer):
        from diffusers.hooks import HookRegistry, ModelHook
        from diffusers.hooks.hooks import BaseState, StateManager

        class Recorder(ModelHook):
            _is_stateful = True

            def __init__(self):
                super().__init__()
                self.state_manager = StateManager(BaseState)
                self.names = []

            def reset_state(self, module):
                self.state_manager.reset()
                return module

            def pre_forward(self, module, *args, **kwargs):
                self.names.append(self.state_manager.context.name)
                return args, kwargs

        self.hook = Recorder()
        self.registry = HookRegistry.check_if_exists_or_initialize(transformer)
        self.registry.register_hook(self.hook, "test_cache_context_recorder")

    def __enter__(self):
        return self.hook.names

    def __exit__(self, *exc):
        self.registry.remove_hook("test_cache_context_recorder")


def test_true_cfg_makes_separate_cond_and_uncond_calls(pipeline, generator):
    cfg = FluxGenerator(pipeline, true_cfg_scale=4.0, **SETTINGS)
    with _CacheContextRecorder(pipeline.transformer) as contexts:
        distilled = generator.generate([CAT, Request("dogs", 7, prompt="dogs 2")])
    assert contexts == ["cond"] * SETTINGS["num_inference_steps"]
    with _CacheContextRecorder(pipeline.transformer) as contexts:
        guided = cfg.generate([CAT, Request("dogs", 7, prompt="dogs 2")])
    assert contexts == ["cond", "uncond"] * SETTINGS["num_inference_steps"]
    assert (guided.final - distilled.final).abs().max() > 1e-2


def test_signature(pipeline, generator):
    from invardiff.plan import PipelineSignature

    fields = generator.signature_fields()
    assert set(fields) == {f.name for f in dataclasses.fields(PipelineSignature)}
    assert fields == {
        "architecture": "flux",
        "model_id": "tiny-flux-seed0",
        "model_fingerprint": model_fingerprint(pipeline.transformer),
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "num_inference_steps": 4,
        "height": 32,
        "width": 32,
        "guidance_mode": "distilled",
        "guidance_scale": 3.5,
        "dtype": "float32",
        "layers": {"attn": 2, "context_attn": 2, "ff": 2, "context_ff": 2, "single_attn": 2, "single_mlp": 2},
    }
    assert generator.signature() == PipelineSignature(**fields)

    cfg = FluxGenerator(pipeline, true_cfg_scale=5.0, model_fingerprint="sha256:given", **SETTINGS)
    fields = cfg.signature_fields()
    assert (fields["guidance_mode"], fields["guidance_scale"]) == ("cfg-separate", 5.0)
    assert fields["model_fingerprint"] == "sha256:given"  # e.g. a checkpoint directory's, computed by the caller


def test_rejects_sizes_the_pipeline_would_round(pipeline):
    with pytest.raises(ValueError, match="multiples of 4"):
        FluxGenerator(pipeline, **{**SETTINGS, "height": 30})


def test_requests_need_prompts(generator):
    with pytest.raises(ValueError, match="without a prompt.*'nolabel'"):
        generator.generate([Request("nolabel", 1, class_label=3)])


def test_saved_pipeline_loads_through_a_file_uri(generator, saved_pipeline):
    loaded = load_flux_pipeline(f"file://{saved_pipeline}", torch.float32, "cpu")
    assert model_fingerprint(loaded.transformer) == model_fingerprint(generator.transformer)
    original = generator.generate([CAT])
    reloaded = FluxGenerator(loaded, **SETTINGS).generate([CAT])
    assert np.array_equal(reloaded.images, original.images)
    assert torch.equal(reloaded.final, original.final)


def test_transformer_only_from_a_pipeline_directory(generator, saved_pipeline):
    loaded = load_flux_pipeline(saved_pipeline, torch.float32, "cpu", transformer_only=True)
    assert loaded.text_encoder is None and loaded.text_encoder_2 is None and loaded.vae is not None
    assert model_fingerprint(loaded.transformer) == model_fingerprint(generator.transformer)

    benchmark = FluxGenerator(loaded, **SETTINGS)
    requests = [CAT, Request("dogs", 7, prompt="dogs 2")]
    result = benchmark.generate(requests)
    assert result.images.shape == (2, 32, 32, 3) and result.final.shape == (2, 4, 16, 16)
    # Random prompt embeddings are keyed by the prompt, so a row still does not depend on its batch.
    alone = benchmark.generate([CAT])
    torch.testing.assert_close(result.final[:1], alone.final, atol=BATCH_INVARIANCE_ATOL, rtol=0)
    assert (result.final[0] - result.final[1]).abs().max() > 1.0


def test_transformer_only_from_a_bare_config(saved_pipeline, tmp_path):
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(saved_pipeline / "transformer")
    config["guidance_embeds"] = False  # like FLUX-schnell
    FluxTransformer2DModel.from_config(config).save_config(tmp_path)  # config.json only, no weights

    first = load_flux_pipeline(tmp_path, torch.bfloat16, "cpu", transformer_only=True, seed=5)
    assert first.vae is None and first.transformer.dtype == torch.bfloat16
    assert flux_layer_counts(first.transformer)["single_mlp"] == 2
    same = load_flux_pipeline(tmp_path, torch.bfloat16, "cpu", transformer_only=True, seed=5)
    other = load_flux_pipeline(tmp_path, torch.bfloat16, "cpu", transformer_only=True, seed=6)
    assert model_fingerprint(first.transformer) == model_fingerprint(same.transformer)
    assert model_fingerprint(first.transformer) != model_fingerprint(other.transformer)

    # Without a VAE, images are a preview of the latents at latent resolution (the pipeline's default 8x VAE).
    benchmark = FluxGenerator(first, **SETTINGS)
    result = benchmark.generate([CAT])
    assert result.images.shape == (1, 4, 4, 3) and result.final.shape == (1, 4, 4, 4)
    assert torch.isfinite(result.final).all()
    fields = benchmark.signature_fields()
    assert (fields["guidance_mode"], fields["guidance_scale"], fields["dtype"]) == ("none", 1.0, "bfloat16")


def test_clear_errors_when_loading(saved_pipeline, tmp_path):
    from pipelines.tiny import save_tiny_dit

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_flux_pipeline(tmp_path / "missing", torch.float32, "cpu")
    with pytest.raises(ValueError, match="holds a DiTPipeline, not a FluxPipeline"):
        load_flux_pipeline(save_tiny_dit(tmp_path / "dit"), torch.float32, "cpu")
    with pytest.raises(ValueError, match="single model, not a pipeline"):
        load_flux_pipeline(saved_pipeline / "transformer", torch.float32, "cpu")
    with pytest.raises(ValueError, match="not a FluxTransformer2DModel"):
        load_flux_pipeline(saved_pipeline / "vae", torch.float32, "cpu", transformer_only=True)
