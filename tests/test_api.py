"""The Python API on a plain diffusers DiTPipeline: calibrate, enable, disable, calls checked against the plan, and
the README's "Use in Python" example run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import invardiff

STEPS = 8
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pipelines.tiny import save_tiny_dit

    return save_tiny_dit(tmp_path_factory.mktemp("tiny-dit-pipeline"), latent=True)


@pytest.fixture(scope="module")
def pipe(model_dir):
    from diffusers import DiTPipeline

    torch.set_num_threads(1)
    pipe = DiTPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=STEPS, labels=(2, 4)):
    generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
    return pipe(class_labels=list(labels), num_inference_steps=steps, guidance_scale=1.0, generator=generators,
                output_type="np").images  # fmt: skip


@pytest.fixture(scope="module")
def plan(pipe):
    return invardiff.calibrate(pipe, [1, 3, 5], num_inference_steps=STEPS, guidance_scale=1.0, target_speedup=2.0,
                               batch_size=3)  # fmt: skip


def test_calibrate_a_users_pipeline_gives_a_forecast_plan_for_it(pipe, plan):
    assert isinstance(plan, invardiff.Plan) and plan.mode == "forecast"
    assert plan.signature.architecture == "dit" and plan.signature.num_inference_steps == STEPS
    assert plan.signature.scheduler == "DDIMScheduler" and plan.signature.guidance_mode == "none"
    assert plan.forecast_schedule.num_computed == STEPS // 2
    assert plan.calibration["via"] == "invardiff.calibrate" and plan.calibration["held_out"]["runs"] == 3


def test_enable_runs_the_plan_and_disable_restores_the_model_exactly(pipe, plan):
    uncached = generate(pipe)
    invardiff.enable(pipe, plan)
    try:
        cached = generate(pipe)
        stats = invardiff.invardiff_stats(pipe.transformer)
    finally:
        invardiff.disable(pipe)
    assert stats.steps_total == STEPS and stats.steps_computed == STEPS // 2
    assert not np.array_equal(cached, uncached) and np.abs(cached - uncached).max() < 0.5
    np.testing.assert_array_equal(generate(pipe), uncached)
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_a_call_with_another_step_count_is_refused_before_it_runs(pipe, plan):
    invardiff.enable(pipe, plan)
    try:
        with pytest.raises(invardiff.PlanCallMismatch, match=f"calibrated for {STEPS} denoising steps; this call runs 5"):
            generate(pipe, steps=5)
        generate(pipe)  # the refused call left nothing behind: the next matching call runs
    finally:
        invardiff.disable(pipe)


def test_a_plan_for_another_model_is_refused_at_enable(pipe, plan):
    from invardiff.forecast import uniform_schedule
    from invardiff.plan import PipelineSignature

    fields = plan.signature.to_dict() | {"layers": {"attn": 5, "ff": 5}}
    other = invardiff.Plan.from_forecast(PipelineSignature(**fields), uniform_schedule(STEPS, 4), target="residual")
    with pytest.raises(invardiff.PlanMismatchError, match="layers"):
        invardiff.enable(pipe, other)
    with pytest.raises(ValueError, match="not applied"):  # the refused plan left no hooks behind
        invardiff.invardiff_stats(pipe.transformer)


def test_calibrate_refuses_an_ambiguous_goal(pipe):
    with pytest.raises(ValueError, match="exactly one"):
        invardiff.calibrate(pipe, [1], num_inference_steps=STEPS, preset="fast", target_speedup=3.0)
    with pytest.raises(ValueError, match="preset must be one of"):
        invardiff.calibrate(pipe, [1], num_inference_steps=STEPS, preset="paper-dit-fast")


def test_readme_python_example_runs_as_written(model_dir, tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Use in Python") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {"MODEL_DIR": str(model_dir)}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "dit-plan.json").exists()
    assert len(namespace["images"]) == 2
