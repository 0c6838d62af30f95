"""Learning-to-Cache: the relaxed training model, router training, and the static plan the runtime executes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from invardiff_testing import (
    DIT_LAYERS,
    CallCounter,
    dit_inputs,
    flux_inputs,
    sample_dit,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_dit,
    tiny_flux,
)

from invardiff import get_adapter
from invardiff.plan import PipelineSignature, Plan
from invardiff.policies.l2c import (
    L2CPolicy,
    L2CRouter,
    RelaxedCache,
    RouterTrainingConfig,
    cache_steps,
    relaxed_mix,
    train_dit_router,
)
from invardiff.policy import InvarDiffPolicy

T = 6
LAYERS = {"attn": DIT_LAYERS, "ff": DIT_LAYERS}


def dit_call(model, x, labels, t=500):
    return model(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample


def flux_call(model, inputs, x, t=0.5):
    return model(
        hidden_states=x, encoder_hidden_states=inputs.text, pooled_projections=inputs.pooled,
        timestep=torch.full((x.shape[0],), t), img_ids=inputs.img_ids, txt_ids=inputs.txt_ids, return_dict=False,
    )[0]


def signature(num_steps: int = T) -> PipelineSignature:
    return PipelineSignature(
        architecture="dit", model_id="tiny-dit", model_fingerprint="sha256:" + "0" * 64, scheduler="DDIMScheduler",
        num_inference_steps=num_steps, height=8, width=8, guidance_mode="none", guidance_scale=1.0,
        dtype="float32", layers=LAYERS,
    )


def test_cache_steps_alternate_with_full_steps():
    assert cache_steps(6) == [1, 3, 5]
    assert cache_steps(5) == [1, 3]


def test_relaxed_mix_is_the_computed_output_at_one_and_the_cached_at_zero():
    f, c = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(relaxed_mix(f, c, torch.tensor(1.0)), f)
    assert torch.equal(relaxed_mix(f, c, torch.tensor(0.0)), c)
    pair = relaxed_mix((f, None), (c, None), torch.tensor(0.25))
    assert torch.allclose(pair[0], 0.25 * f + 0.75 * c) and pair[1] is None


def test_relaxed_dit_with_every_score_one_is_the_full_model_bitwise():
    model = tiny_dit()
    x, labels = dit_inputs(2)
    other, _ = dit_inputs(2, seed=7)
    full = dit_call(model, x, labels)
    with RelaxedCache(model) as relaxed, torch.no_grad():
        relaxed.set_mode("record")
        dit_call(model, other, labels, t=700)  # the cache holds a different step's outputs
        relaxed.set_mode("relaxed", torch.ones(relaxed.num_units))
        assert torch.equal(dit_call(model, x, labels), full)
        relaxed.set_mode("relaxed", torch.zeros(relaxed.num_units))
        assert not torch.allclose(dit_call(model, x, labels), full, atol=1e-4)
    assert not hasattr(model.transformer_blocks[0].attn1, "_diffusers_hook") or not any(
        model.transformer_blocks[0].attn1._diffusers_hook.hooks
    )


def test_relaxed_flux_with_every_score_one_is_the_full_model_bitwise():
    model = tiny_flux()
    inputs = flux_inputs(2)
    full = flux_call(model, inputs, inputs.x)
    with RelaxedCache(model) as relaxed, torch.no_grad():
        relaxed.set_mode("record")
        flux_call(model, inputs, inputs.x * 0.5, t=0.9)
        relaxed.set_mode("relaxed", torch.ones(relaxed.num_units))
        assert torch.equal(flux_call(model, inputs, inputs.x), full)


def test_relaxed_scores_zero_equal_the_runtime_reusing_every_unit():
    """s = 0 everywhere is 'reuse everything', which the InvarDiff runtime executes from a plan: same numbers."""
    model = tiny_dit()
    x, labels = dit_inputs(2)
    x_next = x * 0.9
    with RelaxedCache(model) as relaxed, torch.no_grad():
        relaxed.set_mode("record")
        dit_call(model, x, labels, t=800)
        relaxed.set_mode("relaxed", torch.zeros(relaxed.num_units))
        mixed = dit_call(model, x_next, labels, t=700)
    router = L2CRouter(signature(2), [s.name for s in get_adapter(model).cache_sites(model)], np.full((2, 6), -5.0))
    policy = L2CPolicy(router.to_plan(model, theta=0.1))
    policy.attach(model)
    try:
        with torch.no_grad():
            dit_call(model, x, labels, t=800)
            reused = dit_call(model, x_next, labels, t=700)
    finally:
        policy.detach(model)
    assert torch.equal(mixed, reused)


def _tiny_training(lam: float, iterations: int):
    from diffusers import DDIMScheduler

    from pipelines.digits import SCHEDULER_CONFIG

    model = tiny_dit()
    images = torch.rand(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(16) % 10
    config = RouterTrainingConfig(lam=lam, iterations=iterations, batch_size=4, lr=0.1, log_every=5, seed=0)
    logits, record = train_dit_router(
        model, DDIMScheduler.from_config(SCHEDULER_CONFIG), images, labels, num_steps=2, null_class=10, config=config
    )
    return model, logits, record


def test_router_training_decreases_the_loss_and_leaves_the_model_alone():
    model, logits, record = _tiny_training(lam=1e-2, iterations=40)
    curve = np.array(record["loss_curve"])  # [iteration, mean loss, mean mse] per window of 5 iterations
    assert curve[-1, 1] < 0.5 * curve[0, 1], curve
    assert np.all(np.abs(logits.numpy()) <= 5.0)
    assert record["lambda"] == 1e-2 and record["iterations"] == 40
    untouched = tiny_dit()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), untouched.state_dict().values()))
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the frozen-model training
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in model.modules())


def test_only_cache_step_routers_are_trained():
    generator = torch.Generator().manual_seed(0)  # RouterLogits draws step 0, then step 1, from the seed
    initial = [torch.randn(6, generator=generator).double().numpy() for _ in range(2)]
    _, logits, _ = _tiny_training(lam=1e-2, iterations=10)
    trained = logits.numpy()
    assert np.array_equal(trained[0], initial[0])  # step 0 is a full step: its router is never used or trained
    assert not np.allclose(trained[1], initial[1])


def test_thresholded_plan_skips_exactly_what_it_says():
    model = tiny_dit()
    sites = get_adapter(model).cache_sites(model)
    names = [site.name for site in sites]
    rng = np.random.default_rng(4)
    logits = rng.uniform(-5, 5, size=(T, len(sites)))
    router = L2CRouter(signature(), names, logits, {"lambda": 1e-4, "iterations": 3})
    theta = 0.3
    plan = router.to_plan(model, theta)
    keep = router.probabilities() > theta

    counter = CallCounter(model, names)
    policy = L2CPolicy(plan)
    policy.attach(model)
    ran_per_step, seen = [], dict.fromkeys(names, 0)

    def on_step(k):
        ran_per_step.append({name for name in names if counter.counts[name] > seen[name]})
        seen.update(counter.counts)

    x, labels = dit_inputs(2)
    try:
        sample_dit(model, x, labels, T, on_step=on_step)
        stats = policy.stats(model)
    finally:
        policy.detach(model)
    for k, ran in enumerate(ran_per_step):
        expected = set(names) if k % 2 == 0 else {name for u, name in enumerate(names) if keep[k, u]}
        assert ran == expected, k
    planned = T * len(names) - sum(int((~keep[k]).sum()) for k in cache_steps(T))
    assert stats.module_evals_computed == planned == sum(counter.counts.values())
    assert router.kept_per_cache_step(theta) == [int(keep[k].sum()) for k in cache_steps(T)]


def test_l2c_plan_records_its_origin_and_round_trips(tmp_path):
    model = tiny_dit()
    names = [site.name for site in get_adapter(model).cache_sites(model)]
    router = L2CRouter(signature(), names, np.zeros((T, 6)), {"lambda": 1e-3, "loss_curve": [[1, 0.5, 0.4]]})
    router.save(tmp_path / "router.json")
    loaded = L2CRouter.load(tmp_path / "router.json")
    assert loaded.units == names and np.array_equal(loaded.logits, router.logits)
    plan = loaded.to_plan(model, theta=0.6)  # sigmoid(0) = 0.5 <= 0.6: every unit reused on every cache step
    assert plan.calibration["method"] == "l2c"
    assert plan.calibration["lambda"] == 1e-3 and plan.calibration["theta"] == 0.6
    assert plan.calibration["training"]["loss_curve"] == [[1, 0.5, 0.4]]
    assert not plan.step_gate.any()
    assert plan.modules["attn"][1::2].all() and not plan.modules["attn"][0::2].any()
    assert Plan.from_json(plan.to_json()) == plan


def test_l2c_policy_refuses_a_plan_it_did_not_make():
    plan = Plan.all_compute(signature())
    with pytest.raises(ValueError, match="not by L2C"):
        L2CPolicy(plan)
    assert InvarDiffPolicy(plan).name == "invardiff"


def test_router_for_other_units_is_refused():
    router = L2CRouter(signature(), ["a", "b"], np.zeros((T, 2)))
    with pytest.raises(ValueError, match="other units"):
        router.to_plan(tiny_dit())


def test_a_shipped_l2c_plan_becomes_an_l2c_policy_and_an_invardiff_plan_stays_invardiff():
    from invardiff.policies import make_policy, policy_from_json

    model = tiny_dit()
    names = [site.name for site in get_adapter(model).cache_sites(model)]
    l2c_plan = L2CRouter(signature(), names, np.full((T, 6), -5.0)).to_plan(model)
    assert policy_from_json(l2c_plan.to_json()).name == "l2c"
    assert policy_from_json(Plan.all_compute(signature()).to_json()).name == "invardiff"
    assert policy_from_json(None).name == "none"
    with pytest.raises(ValueError, match="needs a plan"):
        make_policy("l2c")
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("teacache")


def test_cli_checks_that_policy_and_plan_agree():
    from jobs.cli import UserError, _shipped_policy

    model = tiny_dit()
    names = [site.name for site in get_adapter(model).cache_sites(model)]
    l2c_json = L2CRouter(signature(), names, np.zeros((T, 6))).to_plan(model).to_json()
    invardiff_json = Plan.all_compute(signature()).to_json()
    options = dict(dicache_threshold=None, dicache_batch_mode="row")
    assert _shipped_policy(l2c_json, policy_name="l2c", **options) == l2c_json
    assert _shipped_policy(l2c_json, policy_name=None, **options) == l2c_json  # the plan's record decides
    for plan_json, name, message in [
        (invardiff_json, "l2c", "made by"),
        (l2c_json, "invardiff", "made by"),
        (None, "l2c", "train-router"),
        (l2c_json, "none", "takes no --plan"),
    ]:
        with pytest.raises(UserError, match=message):
            _shipped_policy(plan_json, policy_name=name, **options)


@pytest.mark.slow  # Ray workers import torch and diffusers: about 20 s on an idle 2-core box
def test_lambda_sweep_trains_one_router_per_lambda_on_ray(ray_local):
    from jobs.train_router import train_router_sweep
    from pipelines.build import GeneratorConfig

    config = GeneratorConfig(model="digits", num_inference_steps=4, device="cpu")
    lams = [1e-3, 1e-5]
    results = train_router_sweep(config, lams, workers=2, theta=0.1, iterations=2, batch_size=2, lr=0.2, seed=0)
    assert [r.router.training["lambda"] for r in results] == lams  # in the order asked, whatever finished first
    for trained in results:
        assert trained.router.logits.shape == (4, 16)
        assert trained.plan.calibration["method"] == "l2c" and trained.plan.num_steps == 4


def test_train_router_command_refuses_a_sweep_without_a_path_per_lambda(tmp_path):
    from typer.testing import CliRunner

    from jobs.cli import UserError, app

    result = CliRunner().invoke(
        app, ["train-router", "--lam", "1e-4", "--lam", "1e-3", "--plan-out", str(tmp_path / "plan.json")]
    )
    assert isinstance(result.exception, UserError) and "{lam}" in str(result.exception)
    result = CliRunner().invoke(app, ["train-router", "--from-router", "r.json", "--lam", "1e-4", "--plan-out", "p"])
    assert isinstance(result.exception, UserError) and "no --lam" in str(result.exception)
