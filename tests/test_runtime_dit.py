"""InvarDiff runtime on a tiny random-init DiTTransformer2DModel (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from invardiff_testing import (
    DIT_LAYERS,
    NULL_CLASS,
    CallCounter,
    ToyPlan,
    all_compute_plan,
    check_slot_holdings,
    diffusers_hook_names,
    dit_inputs,
    dit_timesteps,
    gated_steps,
    random_plan,
    sample_dit,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_dit,
)

from invardiff import (
    CacheStats,
    InvarDiffPolicy,
    NoCache,
    UnsupportedModelError,
    apply_invardiff,
    cache_context,
    get_adapter,
    invardiff_cache_contents,
    invardiff_stats,
    layers,
    remove_invardiff,
    reset_invardiff,
)

T = 8
GATE = "01101001"  # gated steps 1, 2, 4, 7 (a run of two, a single one, and the last step)
LAYERS = {"attn": DIT_LAYERS, "ff": DIT_LAYERS}


def aggressive_plan() -> ToyPlan:
    return random_plan(T, LAYERS, seed=3, step_gate=GATE, share=0.6)


def test_adapter_layers_and_unsupported_model():
    model = tiny_dit()
    assert layers(model) == LAYERS
    assert get_adapter(model).architecture == "dit"
    with pytest.raises(UnsupportedModelError, match="Linear"):
        get_adapter(torch.nn.Linear(2, 2))


def test_plan_that_does_not_match_the_model_is_refused():
    model = tiny_dit()
    plan = all_compute_plan(T, LAYERS)
    wrong_layers = ToyPlan(plan.step_gate, {"attn": np.zeros((T, 2), bool), "ff": np.zeros((T, 2), bool)})
    with pytest.raises(ValueError, match=r"bool\[8, 3\]"):
        apply_invardiff(model, wrong_layers)
    wrong_family = ToyPlan(plan.step_gate, {"msa": plan.modules["attn"], "ff": plan.modules["ff"]})
    with pytest.raises(ValueError, match="missing \\['attn'\\]"):
        apply_invardiff(model, wrong_family)
    assert diffusers_hook_names(model) == []  # nothing left half-applied


def test_all_compute_plan_is_bitwise_identical():
    model = tiny_dit()
    x, labels = dit_inputs(2)
    reference = sample_dit(model, x, labels, T)
    apply_invardiff(model, all_compute_plan(T, LAYERS))
    cached = sample_dit(model, x, labels, T)
    assert all(torch.equal(a, b) for a, b in zip(reference, cached))
    stats = invardiff_stats(model)
    assert stats == CacheStats(T, T, 2 * T * DIT_LAYERS, 2 * T * DIT_LAYERS, {"attn": (24, 24), "ff": (24, 24)})


def test_aggressive_plan_runs_exactly_the_planned_evaluations():
    model = tiny_dit()
    names = [f"transformer_blocks.{l}.{m}" for l in range(DIT_LAYERS) for m in ("attn1", "ff")]
    names += [f"transformer_blocks.{l}" for l in range(DIT_LAYERS)] + ["pos_embed", "transformer_blocks.0.norm1.emb"]
    counter = CallCounter(model, names)
    plan = aggressive_plan()
    apply_invardiff(model, plan)
    x, labels = dit_inputs(2)
    counts_after_step = []
    sample_dit(model, x, labels, T, on_step=lambda k: counts_after_step.append(dict(counter.counts)))

    gated = gated_steps(plan.step_gate)
    computed_steps = [k for k in range(T) if not gated[k]]
    assert counter.counts["pos_embed"] == len(computed_steps)
    for l in range(DIT_LAYERS):
        assert counter.counts[f"transformer_blocks.{l}"] == len(computed_steps)
    # block 0's norm1.emb runs once inside block 0 on computed steps and once for the final layer on every step
    assert counter.counts["transformer_blocks.0.norm1.emb"] == len(computed_steps) + T
    for k in range(1, T):  # gated steps run no block at all
        ran_blocks = counts_after_step[k]["transformer_blocks.0"] - counts_after_step[k - 1]["transformer_blocks.0"]
        assert ran_blocks == (0 if gated[k] else 1)

    expected = {}
    for family, module in (("attn", "attn1"), ("ff", "ff")):
        for l in range(DIT_LAYERS):
            # computes on every non-gated step unless the book says reuse (never at step 0: nothing to reuse yet)
            runs = sum(1 for k in computed_steps if not (plan.modules[family][k, l] and k > 0))
            assert counter.counts[f"transformer_blocks.{l}.{module}"] == runs, (family, l)
            expected[family] = expected.get(family, 0) + runs
    assert sum(expected.values()) < 2 * len(computed_steps) * DIT_LAYERS  # the plan does reuse inside computed steps

    stats = invardiff_stats(model)
    assert stats.steps_total == T and stats.steps_computed == len(computed_steps)
    assert stats.per_family == {f: (expected[f], T * DIT_LAYERS) for f in ("attn", "ff")}
    assert stats.module_evals_computed == sum(expected.values())
    assert stats.module_evals_total == 2 * T * DIT_LAYERS


def test_gated_step_reuses_h_but_applies_the_current_timestep():
    model = tiny_dit()
    plan = aggressive_plan()
    apply_invardiff(model, plan)
    h_seen = []
    model.norm_out.register_forward_hook(lambda module, inputs, output: h_seen.append(inputs[0].clone()))
    x, labels = dit_inputs(2)
    outputs = sample_dit(model, x, labels, T)
    for k in (1, 2, 4, 7):
        assert torch.equal(h_seen[k], h_seen[k - 1])  # H is the reused one
        assert not torch.allclose(outputs[k], outputs[k - 1])  # the final layer saw timestep k, not k-1
    uncached = tiny_dit()
    reference = sample_dit(uncached, x, labels, T)
    assert torch.equal(outputs[0], reference[0])
    assert not torch.allclose(outputs[-1], reference[-1])  # the plan changed the trajectory


def test_batch_invariance():
    model = tiny_dit()
    apply_invardiff(model, aggressive_plan())
    x, labels = dit_inputs(3)
    batch_of_three = sample_dit(model, x, labels, T)
    alone = sample_dit(model, x[1:2], labels[1:2], T)
    for big, small in zip(batch_of_three, alone):
        # Only CPU matmul blocking differs between batch sizes: fp32 round-off, nothing structural.
        torch.testing.assert_close(big[1:2], small, rtol=1e-5, atol=1e-5)


def test_batched_cfg_halves_reuse_their_own_values():
    model = tiny_dit()
    apply_invardiff(model, aggressive_plan())
    x, labels = dit_inputs(2)
    batched = sample_dit(model, x, labels, T, guidance=3.0)
    # Replay each half as its own generation on the latents of the batched trajectory. If the halves shared or
    # mixed slots, the separate runs could not reproduce them.
    latents = [x]
    for out in batched[:-1]:
        cond, uncond = out[:, :4].chunk(2)
        latents.append(latents[-1] - 0.05 * (uncond + 3.0 * (cond - uncond)))
    for half, branch_labels in enumerate((labels, torch.full_like(labels, NULL_CLASS))):
        reset_invardiff(model)
        with torch.no_grad():
            for k, t in enumerate(dit_timesteps(T)):
                out = model(latents[k], timestep=torch.full((2,), t), class_labels=branch_labels).sample
                # batch 4 vs batch 2: fp32 round-off of CPU matmul blocking only
                torch.testing.assert_close(out, batched[k].chunk(2)[half], rtol=1e-5, atol=1e-5)


def test_sequential_generations_equal_fresh_ones():
    model = tiny_dit()
    apply_invardiff(model, aggressive_plan())
    x, labels = dit_inputs(2)
    first = sample_dit(model, x, labels, T)
    # The context wraps after T calls, so back-to-back generations need no reset ...
    second = sample_dit(model, x, labels, T)
    # ... and an abandoned partial generation is cleared by reset_invardiff.
    sample_dit(model, x, labels, T, stop_after=3)
    reset_invardiff(model)
    third = sample_dit(model, x, labels, T)
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert invardiff_stats(model).steps_total == T  # stats count since the last reset


def test_cache_context_works_on_dit_without_cachemixin():
    # DiTTransformer2DModel has no `cache_context` in diffusers 0.42; invardiff.cache_context sets one anyway.
    model = tiny_dit()
    assert not hasattr(model, "cache_context")
    apply_invardiff(model, aggressive_plan())
    x, labels = dit_inputs(2)
    with cache_context(model, "cond"):
        in_context = sample_dit(model, x, labels, T, stop_after=3)
    outside = sample_dit(model, x, labels, T, stop_after=2)
    contents = invardiff_cache_contents(model)
    assert (contents["cond"]["step"], contents["default"]["step"]) == (3, 2)
    assert all(torch.equal(a, b) for a, b in zip(in_context, outside))


def test_exception_inside_a_call_resets_the_state():
    model = tiny_dit()
    counter = CallCounter(model, ["transformer_blocks.1.attn1"])
    plan = aggressive_plan()
    apply_invardiff(model, plan)
    x, labels = dit_inputs(2)
    reference = sample_dit(model, x, labels, T)
    sample_dit(model, x, labels, T, stop_after=2)  # leave the context mid-generation, holding slots
    assert invardiff_cache_contents(model)["default"]["step"] == 2
    counter.fail_at = ("transformer_blocks.1.attn1", counter.counts["transformer_blocks.1.attn1"] + 1)
    with pytest.raises(RuntimeError, match="injected failure"):
        sample_dit(model, x, labels, T)
    assert invardiff_cache_contents(model) == {}
    counter.fail_at = None
    again = sample_dit(model, x, labels, T)
    assert all(torch.equal(a, b) for a, b in zip(reference, again))


def test_slots_held_are_only_those_a_later_row_needs():
    model = tiny_dit()
    x, labels = dit_inputs(2)
    held = check_slot_holdings(model, aggressive_plan(), lambda on_step: sample_dit(model, x, labels, T, on_step=on_step))
    assert any(held)  # the plan does hold something


def test_remove_restores_the_original_model():
    model = tiny_dit()
    x, labels = dit_inputs(2)
    reference = sample_dit(model, x, labels, T)
    apply_invardiff(model, aggressive_plan())
    with pytest.raises(ValueError, match="already applied"):
        apply_invardiff(model, aggressive_plan())
    cached = sample_dit(model, x, labels, T, stop_after=4)
    assert not torch.equal(cached[2], reference[2])
    remove_invardiff(model)
    assert [name for name in diffusers_hook_names(model) if "invardiff" in name] == []
    restored = sample_dit(model, x, labels, T)
    assert all(torch.equal(a, b) for a, b in zip(reference, restored))
    with pytest.raises(ValueError, match="not applied"):
        invardiff_stats(model)


def test_policies_report_what_ran():
    model = tiny_dit()
    x, labels = dit_inputs(2)
    none = NoCache()
    none.attach(model)
    sample_dit(model, x, labels, T)
    assert none.name == "none" and none.plan_id is None
    full = T * DIT_LAYERS
    assert none.stats(model) == CacheStats(T, T, 2 * full, 2 * full, {"attn": (full, full), "ff": (full, full)})
    none.reset(model)
    assert none.stats(model).steps_total == 0
    none.detach(model)
    assert diffusers_hook_names(model) == []

    plan = aggressive_plan()
    policy = InvarDiffPolicy(plan)
    policy.attach(model)
    sample_dit(model, x, labels, T)
    assert (policy.name, policy.plan_id) == ("invardiff", plan.plan_id)
    stats = policy.stats(model)
    assert stats.steps_computed == T - 4 and stats.module_evals_computed < stats.module_evals_total
    policy.reset(model)
    assert policy.stats(model).steps_total == 0
    policy.detach(model)
    assert diffusers_hook_names(model) == []
