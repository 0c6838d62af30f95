"""InvarDiff runtime on a tiny random-init FluxTransformer2DModel (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from invardiff_testing import (
    FLUX_DUAL,
    FLUX_SINGLE,
    CallCounter,
    ToyPlan,
    all_compute_plan,
    check_slot_holdings,
    diffusers_hook_names,
    flux_inputs,
    flux_step,
    gated_steps,
    random_plan,
    sample_flux,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_flux,
)

from invardiff import (
    UnsupportedModelError,
    apply_invardiff,
    get_adapter,
    invardiff_cache_contents,
    invardiff_stats,
    layers,
    remove_invardiff,
    reset_invardiff,
)

T = 8
GATE = "00110010"
LAYERS = {
    "attn": FLUX_DUAL,
    "context_attn": FLUX_DUAL,
    "ff": FLUX_DUAL,
    "context_ff": FLUX_DUAL,
    "single_attn": FLUX_SINGLE,
    "single_mlp": FLUX_SINGLE,
}


def aggressive_plan() -> ToyPlan:
    return random_plan(T, LAYERS, seed=11, step_gate=GATE, share=0.7)


def test_adapter_families():
    model = tiny_flux()
    assert layers(model) == LAYERS
    assert list(layers(model)) == list(LAYERS)  # plan order is forward order (contracts.md)
    names = [site.name for site in get_adapter(model).cache_sites(model)]
    assert names[:3] == ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"]
    assert names[-2:] == ["single_transformer_blocks.1.attn", "single_transformer_blocks.1.proj_mlp"]


def test_all_compute_plan_is_bitwise_identical():
    model = tiny_flux()
    inputs = flux_inputs(2)
    reference = sample_flux(model, inputs, T)
    apply_invardiff(model, all_compute_plan(T, LAYERS))
    cached = sample_flux(model, inputs, T)
    assert all(torch.equal(a, b) for a, b in zip(reference, cached))
    stats = invardiff_stats(model)
    assert stats.steps_computed == T and stats.module_evals_computed == stats.module_evals_total == T * 12


def test_aggressive_plan_runs_exactly_the_planned_evaluations():
    model = tiny_flux()
    dual = {"attn": "attn", "ff": "ff", "context_ff": "ff_context"}
    single = {"single_attn": "attn", "single_mlp": "proj_mlp"}
    names = [f"transformer_blocks.{l}.{m}" for l in range(FLUX_DUAL) for m in dual.values()]
    names += [f"single_transformer_blocks.{l}.{m}" for l in range(FLUX_SINGLE) for m in single.values()]
    names += [f"transformer_blocks.{l}" for l in range(FLUX_DUAL)]
    names += [f"single_transformer_blocks.{l}" for l in range(FLUX_SINGLE)] + ["x_embedder"]
    counter = CallCounter(model, names)
    plan = aggressive_plan()
    apply_invardiff(model, plan)
    sample_flux(model, flux_inputs(2), T)

    gated = gated_steps(plan.step_gate)
    computed_steps = [k for k in range(T) if not gated[k]]
    assert counter.counts["x_embedder"] == len(computed_steps)
    for l in range(FLUX_DUAL):
        assert counter.counts[f"transformer_blocks.{l}"] == len(computed_steps)
    for l in range(FLUX_SINGLE):
        assert counter.counts[f"single_transformer_blocks.{l}"] == len(computed_steps)

    def runs(books, l):  # computed steps on which not every book says reuse (step 0 has nothing to reuse)
        return sum(1 for k in computed_steps if not (k > 0 and all(book[k, l] for book in books)))

    expected = {}
    for l in range(FLUX_DUAL):
        # AND rule: the joint attention runs unless both the image and the text book say reuse
        joint = runs([plan.modules["attn"], plan.modules["context_attn"]], l)
        assert counter.counts[f"transformer_blocks.{l}.attn"] == joint
        assert counter.counts[f"transformer_blocks.{l}.ff"] == runs([plan.modules["ff"]], l)
        assert counter.counts[f"transformer_blocks.{l}.ff_context"] == runs([plan.modules["context_ff"]], l)
        for family, n in (("attn", joint), ("context_attn", joint), ("ff", runs([plan.modules["ff"]], l)),
                          ("context_ff", runs([plan.modules["context_ff"]], l))):
            expected[family] = expected.get(family, 0) + n
    for l in range(FLUX_SINGLE):
        for family, module in single.items():
            n = runs([plan.modules[family]], l)
            assert counter.counts[f"single_transformer_blocks.{l}.{module}"] == n
            expected[family] = expected.get(family, 0) + n
    # the AND rule made the joint attention run on some step where only one of its books said reuse
    either = sum(runs([plan.modules["attn"]], l) + runs([plan.modules["context_attn"]], l) for l in range(FLUX_DUAL))
    assert 2 * expected["attn"] > either

    stats = invardiff_stats(model)
    assert stats.steps_total == T and stats.steps_computed == len(computed_steps)
    assert stats.per_family == {f: (expected[f], T * n) for f, n in LAYERS.items()}
    assert stats.module_evals_computed == sum(expected.values()) < stats.module_evals_total == T * 12


def test_gated_step_reuses_image_h_but_applies_the_current_timestep():
    model = tiny_flux()
    apply_invardiff(model, aggressive_plan())
    h_seen = []
    model.norm_out.register_forward_hook(lambda module, inputs, output: h_seen.append(inputs[0].clone()))
    outputs = sample_flux(model, flux_inputs(2), T)
    for k in (2, 3, 6):
        assert h_seen[k].shape == (2, 16, 16)  # image tokens only
        assert torch.equal(h_seen[k], h_seen[k - 1])
        assert not torch.allclose(outputs[k], outputs[k - 1])


def test_batch_invariance():
    model = tiny_flux()
    apply_invardiff(model, aggressive_plan())
    inputs = flux_inputs(3)
    batch_of_three = sample_flux(model, inputs, T)
    alone = sample_flux(model, inputs.rows(slice(2, 3)), T)
    for big, small in zip(batch_of_three, alone):
        # fp32 round-off of CPU matmul blocking between batch sizes only
        torch.testing.assert_close(big[2:3], small, rtol=1e-5, atol=1e-5)


def test_separate_cfg_calls_keep_separate_slots_and_counters():
    model = tiny_flux()
    apply_invardiff(model, aggressive_plan())
    cond, uncond = flux_inputs(2, seed=2), flux_inputs(2, seed=5)
    x_cond, x_uncond = cond.x, uncond.x
    interleaved_cond, interleaved_uncond = [], []
    for k in range(T):  # the FluxPipeline true-CFG layout: two calls per step under named contexts
        with model.cache_context("cond"):
            out_cond = flux_step(model, cond, x_cond, k, T)
        with model.cache_context("uncond"):
            out_uncond = flux_step(model, uncond, x_uncond, k, T)
        interleaved_cond.append(out_cond)
        interleaved_uncond.append(out_uncond)
        x_cond, x_uncond = x_cond - out_cond / T, x_uncond - out_uncond / T
        contents = invardiff_cache_contents(model)
        if k < T - 1:
            assert contents["cond"]["step"] == contents["uncond"]["step"] == k + 1
    assert invardiff_stats(model).steps_total == 2 * T

    reset_invardiff(model)
    alone_cond = sample_flux(model, cond, T)  # no context set: the "default" context
    alone_uncond = sample_flux(model, uncond, T)
    assert all(torch.equal(a, b) for a, b in zip(interleaved_cond, alone_cond))
    assert all(torch.equal(a, b) for a, b in zip(interleaved_uncond, alone_uncond))


def test_pipeline_reset_frees_the_cache_but_keeps_the_stats():
    # FluxPipeline ends every call with maybe_free_model_hooks() -> transformer._reset_stateful_cache().
    model = tiny_flux()
    plan = aggressive_plan()
    apply_invardiff(model, plan)
    inputs = flux_inputs(2)
    with model.cache_context("cond"):
        reference = sample_flux(model, inputs, T)
        sample_flux(model, inputs, T, stop_after=3)
    assert invardiff_cache_contents(model)["cond"]["step"] == 3
    model._reset_stateful_cache()
    assert invardiff_cache_contents(model) == {}
    assert invardiff_stats(model).steps_total == T + 3
    with model.cache_context("cond"):
        again = sample_flux(model, inputs, T)
    assert all(torch.equal(a, b) for a, b in zip(reference, again))


def test_slots_held_are_only_those_a_later_row_needs():
    model = tiny_flux()
    inputs = flux_inputs(2)
    held = check_slot_holdings(model, aggressive_plan(), lambda on_step: sample_flux(model, inputs, T, on_step=on_step))
    assert any("transformer_blocks.0.attn" in h for h in held)  # the joint attention slot is exercised


def test_exception_inside_a_call_resets_the_state():
    model = tiny_flux()
    counter = CallCounter(model, ["single_transformer_blocks.0.proj_mlp"])
    apply_invardiff(model, aggressive_plan())
    inputs = flux_inputs(2)
    reference = sample_flux(model, inputs, T)
    target = "single_transformer_blocks.0.proj_mlp"
    counter.fail_at = (target, counter.counts[target] + 2)
    with pytest.raises(RuntimeError, match="injected failure"):
        sample_flux(model, inputs, T)
    assert invardiff_cache_contents(model) == {}
    counter.fail_at = None
    assert all(torch.equal(a, b) for a, b in zip(reference, sample_flux(model, inputs, T)))


def test_remove_restores_the_original_model():
    model = tiny_flux()
    inputs = flux_inputs(2)
    reference = sample_flux(model, inputs, T)
    apply_invardiff(model, aggressive_plan())
    assert not torch.equal(sample_flux(model, inputs, T)[-1], reference[-1])
    remove_invardiff(model)
    assert [name for name in diffusers_hook_names(model) if "invardiff" in name] == []
    assert all(torch.equal(a, b) for a, b in zip(reference, sample_flux(model, inputs, T)))


def test_controlnet_residuals_are_refused():
    model = tiny_flux()
    apply_invardiff(model, aggressive_plan())
    inputs = flux_inputs(1)
    with pytest.raises(UnsupportedModelError, match="ControlNet"):
        model(
            hidden_states=inputs.x,
            encoder_hidden_states=inputs.text,
            pooled_projections=inputs.pooled,
            timestep=torch.ones(1),
            img_ids=inputs.img_ids,
            txt_ids=inputs.txt_ids,
            controlnet_block_samples=[torch.zeros(1, 16, 16)],
        )
    assert invardiff_cache_contents(model) == {} and invardiff_stats(model).steps_total == 0
