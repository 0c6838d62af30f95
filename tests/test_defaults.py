"""Defaults that fit the model, and a start line that says what will be made."""

from __future__ import annotations

from jobs.console import start_line
from pipelines.build import GeneratorConfig, build_generator


def test_tiny_flux_defaults_to_the_resolution_it_was_built_for():
    generator = build_generator(GeneratorConfig(model="tiny-flux", device="cpu"))
    signature = generator.signature()
    assert (signature.height, signature.width) == (32, 32) == (generator.pipeline.vae.config.sample_size,) * 2
    assert signature.num_inference_steps == 28
    asked = build_generator(GeneratorConfig(model="tiny-flux", device="cpu", height=64, width=48)).signature()
    assert (asked.height, asked.width) == (64, 48)


def test_start_line_names_resolution_steps_guidance_and_plan():
    signature = build_generator(GeneratorConfig(model="tiny-flux", device="cpu")).signature()
    assert start_line(signature, "none", None) == "tiny-flux: 32x32, 28 steps, guidance distilled 3.5, no cache"
    digits = build_generator(GeneratorConfig(model="digits", device="cpu")).signature()
    assert start_line(digits, "invardiff", "p-123") == (
        "embedded:digits-dit: 16x16, 50 steps, guidance cfg-batched 1.5, plan p-123 (invardiff)"
    )
