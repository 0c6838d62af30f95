"""RateRecorder: online phase-1 / phase-2 rates against full trajectories captured separately (fp32, CPU)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from invardiff_testing import (
    DIT_LAYERS,
    FLUX_DUAL,
    FLUX_SINGLE,
    dit_inputs,
    flux_inputs,
    flux_step,
    random_plan,
    sample_dit,
    sample_flux,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_dit,
    tiny_flux,
)

from invardiff import RateRecorder, get_adapter
from invardiff.calibration import rates as reference_rates
from invardiff.recorder import _RECORDER_STEP_HOOK

EPS = 1e-8
# The recorder subtracts in fp32 and sums in fp64; the references work in fp64 on the captured fp32 features.
RTOL = 1e-5
DIT_LAYERS_BY_FAMILY = {"attn": DIT_LAYERS, "ff": DIT_LAYERS}
FLUX_LAYERS_BY_FAMILY = {
    "attn": FLUX_DUAL,
    "context_attn": FLUX_DUAL,
    "ff": FLUX_DUAL,
    "context_ff": FLUX_DUAL,
    "single_attn": FLUX_SINGLE,
    "single_mlp": FLUX_SINGLE,
}


def capture(model, run):
    """Run `run()` with plain torch forward hooks that copy every stream at every call.
    Returns (run's result, {(family or "step", layer): float64 array [calls, batch, ...]})."""
    adapter = get_adapter(model)
    features = defaultdict(list)
    handles = []
    for site in adapter.cache_sites(model):

        def keep(module, inputs, output, site=site):
            for family, tensor in zip(site.families, site.family_outputs(output)):
                features[(family, site.layer)].append(tensor.detach().double().numpy().copy())

        handles.append(site.module.register_forward_hook(keep))

    def keep_h(module, inputs, output):
        features[("step", 0)].append(adapter.step_feature(output).detach().double().numpy().copy())

    handles.append(adapter.blocks(model)[-1].module.register_forward_hook(keep_h))
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return result, {key: np.stack(values) for key, values in features.items()}


def l1(a, b):
    return np.abs(a - b + EPS).sum()


def rate_of(rates, key, run):
    family, layer = key
    return rates["step"][run] if family == "step" else rates[family][run, :, layer]


def test_phase1_rates_match_the_closed_form_and_outputs_are_unchanged():
    T = 7
    model = tiny_dit()
    x, labels = dit_inputs(1)
    reference_outputs, features = capture(model, lambda: sample_dit(model, x, labels, T))
    with RateRecorder(model, num_steps=T) as recorder:
        recorded_outputs = sample_dit(model, x, labels, T)
    assert all(torch.equal(a, b) for a, b in zip(reference_outputs, recorded_outputs))
    rates = recorder.rates()
    assert rates["step"].shape == (1, T) and rates["attn"].shape == (1, T, DIT_LAYERS)
    assert rates["attn"].dtype == np.float64
    for key, z in features.items():
        z = z[:, 0]
        # §3.2: rho[j] = d[j+1] / d[j], d[k] = sum |Z[k] - Z[k-1] + eps|; rows 0 and T-1 are 1
        expected = [1.0] + [l1(z[j + 1], z[j]) / l1(z[j], z[j - 1]) for j in range(1, T - 1)] + [1.0]
        np.testing.assert_allclose(rate_of(rates, key, 0), expected, rtol=RTOL, err_msg=str(key))


def test_phase2_follows_the_worked_example():
    # method §5: the provisional plan reuses rows 5-8 of a stream; the anchor freezes on Z[6].
    T = 12
    model = tiny_dit()
    x, labels = dit_inputs(1)
    reused = np.zeros(T, dtype=bool)
    reused[5:9] = True
    provisional = (reused.copy(), {f: np.repeat(reused[:, None], n, axis=1) for f, n in DIT_LAYERS_BY_FAMILY.items()})
    _, features = capture(model, lambda: sample_dit(model, x, labels, T))
    with RateRecorder(model, num_steps=T, provisional=provisional) as recorder:
        sample_dit(model, x, labels, T)
    rates = recorder.rates()
    for key, z in features.items():
        z = z[:, 0]
        expected = [1.0] + [l1(z[j + 1], z[j]) / l1(z[j], z[j - 1]) for j in range(1, T - 1)] + [1.0]
        expected[7] = l1(z[8], z[6]) / l1(z[6], z[5])
        expected[8] = l1(z[9], z[6]) / l1(z[6], z[5])
        expected[9] = l1(z[10], z[6]) / l1(z[6], z[5])
        expected[10] = l1(z[11], z[10]) / l1(z[10], z[6])
        np.testing.assert_allclose(rate_of(rates, key, 0), expected, rtol=RTOL, err_msg=str(key))


def test_flux_phase2_agrees_with_the_offline_reference():
    T = 8
    model = tiny_flux()
    inputs = flux_inputs(2)
    plan = random_plan(T, FLUX_LAYERS_BY_FAMILY, seed=5, step_gate="00110110", share=0.5)
    reference_outputs, features = capture(model, lambda: sample_flux(model, inputs, T))
    with RateRecorder(model, num_steps=T, provisional=plan) as recorder:
        recorded_outputs = sample_flux(model, inputs, T)
    assert all(torch.equal(a, b) for a, b in zip(reference_outputs, recorded_outputs))
    rates = recorder.rates()
    assert set(rates) == {"step", *FLUX_LAYERS_BY_FAMILY}
    assert rates["single_mlp"].shape == (2, T, FLUX_SINGLE)
    for (family, layer), z in features.items():
        book = plan.step_gate if family == "step" else plan.modules[family][:, layer]
        for run in range(2):
            expected = reference_rates(z[:, run], book)
            np.testing.assert_allclose(rate_of(rates, (family, layer), run), expected, rtol=RTOL)


def test_a_batch_of_three_runs_equals_three_single_runs():
    T = 6
    model = tiny_dit()
    x, labels = dit_inputs(3)
    plan = random_plan(T, DIT_LAYERS_BY_FAMILY, seed=8, step_gate="001100", share=0.5)
    with RateRecorder(model, num_steps=T, provisional=plan) as recorder:
        sample_dit(model, x, labels, T)
    batched = recorder.rates()
    for run in range(3):
        with RateRecorder(model, num_steps=T, provisional=plan) as single:
            sample_dit(model, x[run : run + 1], labels[run : run + 1], T)
        for group, values in single.rates().items():
            # only batch-size round-off of the CPU matmuls differs
            np.testing.assert_allclose(batched[group][run], values[0], rtol=1e-4, err_msg=group)


def test_batched_cfg_halves_are_summed_into_their_run():
    T = 6
    runs = 2
    model = tiny_dit()
    x, labels = dit_inputs(runs)
    plan = random_plan(T, DIT_LAYERS_BY_FAMILY, seed=9, step_gate="010110", share=0.5)
    reference_outputs, features = capture(model, lambda: sample_dit(model, x, labels, T, guidance=3.0))
    with RateRecorder(model, num_steps=T, provisional=plan, cfg_batched=True) as recorder:
        recorded_outputs = sample_dit(model, x, labels, T, guidance=3.0)
    assert all(torch.equal(a, b) for a, b in zip(reference_outputs, recorded_outputs))
    rates = recorder.rates()
    assert rates["step"].shape == (runs, T)
    for (family, layer), z in features.items():
        book = plan.step_gate if family == "step" else plan.modules[family][:, layer]
        for run in range(runs):
            both_halves = z[:, [run, run + runs]]  # rows i and i+R of the CFG batch belong to run i
            expected = reference_rates(both_halves, book)
            np.testing.assert_allclose(rate_of(rates, (family, layer), run), expected, rtol=RTOL)


def test_separate_cfg_contexts_are_summed_like_batched_halves():
    T = 6
    model = tiny_flux()
    cond, uncond = flux_inputs(1, seed=2), flux_inputs(1, seed=5)

    def true_cfg():
        x = cond.x
        for k in range(T):
            with model.cache_context("cond"):
                out_cond = flux_step(model, cond, x, k, T)
            with model.cache_context("uncond"):
                out_uncond = flux_step(model, uncond, x, k, T)
            x = x - (out_uncond + 2.0 * (out_cond - out_uncond)) / T

    _, features = capture(model, true_cfg)
    with RateRecorder(model, num_steps=T) as recorder:
        true_cfg()
    rates = recorder.rates()
    for key, z in features.items():  # calls alternate cond, uncond
        both = np.stack([z[0::2, 0], z[1::2, 0]], axis=1)
        np.testing.assert_allclose(rate_of(rates, key, 0), reference_rates(both, None), rtol=RTOL, err_msg=str(key))


def test_incomplete_or_repeated_generations_are_refused():
    T = 5
    model = tiny_dit()
    x, labels = dit_inputs(1)
    with RateRecorder(model, num_steps=T) as recorder:
        sample_dit(model, x, labels, T, stop_after=T - 1)
    with pytest.raises(RuntimeError, match="expected 5 transformer calls"):
        recorder.rates()
    with RateRecorder(model, num_steps=T) as recorder:
        sample_dit(model, x, labels, T)
        with pytest.raises(RuntimeError, match="one generation per cache context"):
            sample_dit(model, x, labels, T, stop_after=1)
    assert [n for n in model._diffusers_hook.hooks] == []  # detached on exit


def test_a_failed_call_drops_every_anchor_and_refuses_the_rest():
    T = 5
    model = tiny_dit()
    x, labels = dit_inputs(1)

    def fail_at_step_2(module, inputs, output):
        if len(calls) == 2:
            raise ValueError("boom")
        calls.append(1)

    calls = []
    handle = get_adapter(model).blocks(model)[-1].module.register_forward_hook(fail_at_step_2)
    with RateRecorder(model, num_steps=T) as recorder:
        step_hook = model._diffusers_hook.get_hook(_RECORDER_STEP_HOOK)
        with pytest.raises(ValueError, match="boom"):
            sample_dit(model, x, labels, T)
        assert recorder.active is None
        assert step_hook.state_manager.states() == {}  # no half-written anchors left behind
        handle.remove()
        with pytest.raises(RuntimeError, match=r"an earlier call failed \(ValueError: boom\)"):
            sample_dit(model, x, labels, T)
    with pytest.raises(RuntimeError, match="a recorded call failed"):
        recorder.rates()
