"""invardiff.compile_blocks: regional torch.compile under a plan compiles once, then never again for any step, and
computes what eager computes.

Recompiles are counted with dynamo's own counters (`counters["frames"]["total"]`, frames dynamo converted) and, for
the digits model, refused outright with `error_on_recompile`. The counting tests use dynamo's `eager` backend: the
guards and recompiles are dynamo's, identical under inductor, and inductor's code generation would cost minutes
on this CPU. One test runs inductor itself, on the tiny DiT, for the output agreement.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from invardiff_testing import (
    dit_inputs,
    flux_inputs,
    random_plan,
    sample_dit,
    sample_flux,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_dit,
    tiny_flux,
)

import invardiff
from invardiff import apply_invardiff, invardiff_stats, layers, remove_invardiff
from invardiff.compile import compile_blocks
from invardiff.plan import Plan

BALANCED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "forecast-plans" / "balanced.json"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


class FramesPerStep:
    """`on_step` callback: dynamo's frame count after each step."""

    def __init__(self) -> None:
        self.after: list[int] = []

    def __call__(self, _step: int) -> None:
        self.after.append(frames_compiled())


@torch.no_grad()
def test_balanced_plan_on_the_digits_model_compiles_during_the_first_step_only():
    from pipelines.base import Request
    from pipelines.build import GeneratorConfig, build_generator

    plan = Plan.load(BALANCED)
    generator = build_generator(GeneratorConfig(model="digits", num_inference_steps=plan.num_steps, guidance_scale=1.5))
    assert plan.num_steps == 50 and plan.mode == "forecast"
    transformer = generator.transformer
    requests = [Request("r0", 0, class_label=3)]
    apply_invardiff(transformer, plan)
    eager = generator.generate(requests).final
    compile_blocks(transformer, backend="eager")
    frames = FramesPerStep()
    transformer.register_forward_hook(lambda *_: frames(0))
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises
        compiled = generator.generate(requests).final
        again = generator.generate(requests).final
    stats = invardiff_stats(transformer)
    remove_invardiff(transformer)

    assert len(frames.after) == 100
    assert frames.after[0] > 0 and frames.after[-1] == frames.after[0], "a frame compiled after the first step"
    # the plan ran as planned under compilation: 3 generations of its computed steps
    computed = int(plan.forecast_schedule.compute.sum())
    assert stats.steps_total == 150 and stats.steps_computed == 3 * computed < 150
    # dynamo's eager backend runs the captured ATen ops one by one: the very same arithmetic
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


def paper_plan(model):
    return random_plan(8, layers(model), seed=3, step_gate="00110010", share=0.5)


def forecast_plan(model, target: str):
    from invardiff.forecast import uniform_schedule
    from invardiff.plan import PipelineSignature

    signature = PipelineSignature(
        architecture="dit", model_id="tiny", model_fingerprint="sha256:" + "ab" * 32, scheduler="DDIMScheduler",
        num_inference_steps=8, height=8, width=8, guidance_mode="none", guidance_scale=1.0, dtype="float32",
        layers=layers(model),
    )  # fmt: skip
    return Plan.from_forecast(signature, uniform_schedule(8, 4), target=target, created_at="2026-12-01T00:00:00Z")


@torch.no_grad()
@pytest.mark.parametrize("mode", ["paper", "forecast-residual", "forecast-modules"])
def test_every_plan_mode_compiles_during_the_first_step_only_on_the_tiny_dit(mode):
    model = tiny_dit()
    plan = paper_plan(model) if mode == "paper" else forecast_plan(model, mode.removeprefix("forecast-"))
    x, labels = dit_inputs(2)
    apply_invardiff(model, plan)
    eager = sample_dit(model, x, labels, 8, guidance=2.0)
    compile_blocks(model, backend="eager")
    frames = FramesPerStep()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = sample_dit(model, x, labels, 8, guidance=2.0, on_step=frames)
    remove_invardiff(model)
    assert frames.after[0] > 0 and frames.after == [frames.after[0]] * 8
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


@torch.no_grad()
def test_flux_compiles_once_per_distinct_shape_during_the_first_step():
    model = tiny_flux()
    plan = random_plan(8, layers(model), seed=3, step_gate="00110010", share=0.5)
    inputs = flux_inputs(2)
    apply_invardiff(model, plan)
    eager = sample_flux(model, inputs, 8)
    compile_blocks(model, backend="eager")
    frames = FramesPerStep()
    compiled = sample_flux(model, inputs, 8, on_step=frames)
    remove_invardiff(model)
    # the feed-forward code runs at two shapes (image and text tokens): two entries, both made at step 0
    assert frames.after[0] > 0 and frames.after == [frames.after[0]] * 8
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


@torch.no_grad()
def test_inductor_compiled_outputs_agree_with_eager():
    """Tolerance: inductor fuses and reorders float32 arithmetic; per step outputs of order 1 agree to 1e-4."""
    model = tiny_dit()
    plan = forecast_plan(model, "residual")
    x, labels = dit_inputs(2)
    apply_invardiff(model, plan)
    eager = sample_dit(model, x, labels, 8, guidance=2.0)
    compile_blocks(model)  # inductor
    compiled = sample_dit(model, x, labels, 8, guidance=2.0)
    remove_invardiff(model)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_disable_drops_the_compiled_regions_and_the_model_computes_as_before():
    model = tiny_dit()
    x, labels = dit_inputs(2)
    before = sample_dit(model, x, labels, 4)
    apply_invardiff(model, paper_plan(model))
    compile_blocks(model, backend="eager")
    sample_dit(model, x, labels, 8)
    remove_invardiff(model)
    compiled_before = frames_compiled()
    after = sample_dit(model, x, labels, 4)
    assert frames_compiled() == compiled_before  # nothing compiled ran or compiled again
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_compile_blocks_refuses_what_it_cannot_do():
    model = tiny_dit()
    with pytest.raises(ValueError, match="not applied"):
        compile_blocks(model)
    apply_invardiff(model, paper_plan(model))
    with pytest.raises(ValueError, match="fullgraph"):
        compile_blocks(model, fullgraph=True)
    invardiff.compile_blocks(SimpleNamespace(transformer=model), backend="eager")  # a pipeline: its transformer
    with pytest.raises(ValueError, match="already compiled"):
        compile_blocks(model, backend="eager")
    remove_invardiff(model)
    registries = [getattr(module, "_diffusers_hook", None) for module in model.modules()]
    assert not any(registry is not None and registry.hooks for registry in registries)
