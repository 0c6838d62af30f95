"""Forecast plans: the schedule math, plan format 2, the runtime's forecast arithmetic, the candidate-error recorder,
and calibration to a budget (method-forecast.md)."""

from __future__ import annotations

import itertools
from pathlib import Path
import json
import math

import numpy as np
import pytest
import torch

from invardiff.forecast import (
    COMPUTED,
    ForecastSchedule,
    candidates,
    choose_schedule,
    computed_steps_for,
    empty_errors,
    forecast_gain,
    ideal_speedup,
    min_max_gap,
    orders_text,
    parse_orders,
    pool_errors,
    schedule_error,
    uniform_schedule,
)
from invardiff.plan import FORMAT, FORMAT_V2, PipelineSignature, Plan, PlanError
from invardiff_testing import DIT_LAYERS, dit_inputs, dit_timesteps, sample_dit, single_thread, tiny_dit  # noqa: F401

# ----------------------------------------------------------------------------------------------------------------
# Schedule math


def random_errors(num_steps: int, max_gap: int, seed: int):
    rng = np.random.default_rng(seed)
    copy_error, linear_error = empty_errors(num_steps, max_gap)
    copy_error += rng.random(copy_error.shape)
    linear_error += rng.random(linear_error.shape)
    return copy_error, linear_error


def brute_force(copy_error, linear_error, num_steps, num_computed, max_gap):
    best = None
    for rest in itertools.combinations(range(1, num_steps), num_computed - 1):
        compute = np.zeros(num_steps, dtype=bool)
        compute[[0, *rest]] = True
        gated = np.flatnonzero(~compute)
        runs = np.diff(np.flatnonzero(np.r_[compute, True])) - 1
        if runs.max(initial=0) > max_gap:
            continue
        orders = np.full(num_steps, COMPUTED, dtype=np.int8)
        total = 0.0
        for k in gated:
            before = np.flatnonzero(compute[:k])
            b = before[-1]
            error, order = copy_error[k, k - 1 - b], 0
            if before.size > 1 and linear_error[k, k - 1 - b, b - 1 - before[-2]] < error:
                error, order = linear_error[k, k - 1 - b, b - 1 - before[-2]], 1
            total += error
            orders[k] = order
        if best is None or total < best[0] - 1e-12:
            best = (total, compute, orders)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_dp_finds_the_least_error_schedule_that_brute_force_finds(seed):
    num_steps, max_gap = 10, 2
    copy_error, linear_error = random_errors(num_steps, max_gap, seed)
    for num_computed in (4, 5, 7):
        schedule = choose_schedule(copy_error, linear_error, num_computed, max_gap=max_gap)
        cost, compute, orders = brute_force(copy_error, linear_error, num_steps, num_computed, max_gap)
        assert schedule.cost == pytest.approx(cost)
        assert schedule_error(copy_error, linear_error, schedule) == pytest.approx(cost)
        assert schedule.num_computed == num_computed and schedule.compute[0]
        np.testing.assert_array_equal(schedule.compute, compute)
        np.testing.assert_array_equal(schedule.orders, orders)


def test_dp_respects_the_cap_on_consecutive_gated_steps_and_copy_only():
    copy_error, linear_error = random_errors(20, 3, 0)
    schedule = choose_schedule(copy_error, linear_error, 6, max_gap=3, orders=(0,))
    runs = np.diff(np.flatnonzero(np.r_[schedule.compute, True])) - 1
    assert runs.max() <= 3
    assert set(schedule.orders[~schedule.compute]) == {0}
    with pytest.raises(ValueError, match="max_gap"):
        choose_schedule(copy_error, linear_error, 4, max_gap=3)  # 16 gated steps need runs of 4


def test_budget_arithmetic():
    assert computed_steps_for(50, 3.0) == 16 and 50 / 16 >= 3.0
    assert computed_steps_for(50, 2.5) == 20
    assert computed_steps_for(50, 4.0) == 12
    assert computed_steps_for(28, 1.0) == 28
    assert min_max_gap(50, 12) == 4
    with pytest.raises(ValueError):
        computed_steps_for(50, 0.5)


def test_uniform_schedule_and_orders_text_round_trip():
    schedule = uniform_schedule(10, 4)
    assert list(np.flatnonzero(schedule.compute)) == [0, 2, 5, 7]
    # the gated step before a second computed step has only one value to go on: it copies
    assert orders_text(schedule) == "-0-11-1-11"
    assert parse_orders(orders_text(schedule)).orders.tolist() == schedule.orders.tolist()
    assert ideal_speedup(schedule) == 2.5
    assert forecast_gain(schedule, 3) == pytest.approx(1 / 2) and forecast_gain(schedule, 9) == pytest.approx(2 / 2)


@pytest.mark.parametrize("text", ["0---", "-1--", "--2-", "", "-x"])
def test_invalid_schedules_are_refused(text):
    with pytest.raises(ValueError):
        parse_orders(text)


def test_candidates_cover_exactly_the_measured_cells_and_pool_adds():
    copy_error, linear_error = empty_errors(8, 2)
    listed = list(candidates(5, 2))
    assert [(j, b) for j, b, i, _a in listed if i is None] == [(0, 4), (1, 3), (2, 2)]
    assert (0, 4, 2, 1) in listed and all(a is None or a >= 0 for *_x, a in listed)
    assert np.isnan(copy_error[0]).all() and not np.isnan(copy_error[3, :3]).any()
    a, b = random_errors(8, 2, 1), random_errors(8, 2, 2)
    pooled = pool_errors([a, b])
    np.testing.assert_array_equal(pooled[0], a[0] + b[0])


# ----------------------------------------------------------------------------------------------------------------
# Plan format 2


def signature(steps=10) -> PipelineSignature:
    return PipelineSignature(
        architecture="dit", model_id="tiny", model_fingerprint="sha256:" + "ab" * 32, scheduler="DDIMScheduler",
        num_inference_steps=steps, height=8, width=8, guidance_mode="none", guidance_scale=1.0, dtype="float32",
        layers={"attn": DIT_LAYERS, "ff": DIT_LAYERS},
    )  # fmt: skip


def forecast_plan(target="residual", steps=10, computed=4) -> Plan:
    return Plan.from_forecast(
        signature(steps), uniform_schedule(steps, computed), target=target,
        calibration={"method": "test"}, created_at="2026-12-01T00:00:00Z",
    )  # fmt: skip


def test_v2_round_trip_and_v1_unchanged(tmp_path):
    plan = forecast_plan()
    doc = plan.to_dict()
    assert doc["format"] == FORMAT_V2 and doc["mode"] == "forecast"
    assert doc["forecast"] == {"target": "residual", "orders": "-0-11-1-11"}
    path = tmp_path / "p.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan and loaded.forecast_schedule.orders.tolist() == plan.forecast_schedule.orders.tolist()
    # a paper plan is still written as format 1, with no mode/forecast keys, so its checksum is the old one
    paper = Plan.all_compute(signature(), created_at="2026-12-01T00:00:00Z")
    assert paper.to_dict()["format"] == FORMAT and "mode" not in paper.to_dict()
    assert Plan.from_json(paper.to_json()).mode == "paper"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["forecast"].update(orders="-0-11-1-1-"), "computed steps"),
        (lambda d: d["forecast"].update(target="everything"), "schema"),
        (lambda d: d.update(mode="paper"), "paper-mode plan has no forecast"),
        (lambda d: d.update(format=FORMAT), "schema"),
        (lambda d: d["forecast"].update(orders="-0-11-1-11-"), "one character per step"),
    ],
)
def test_v2_validation_names_what_is_wrong(edit, message):
    doc = forecast_plan().to_dict()
    edit(doc)
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(json.loads(json.dumps(doc)))


def test_edited_v2_plan_fails_its_checksum():
    doc = forecast_plan().to_dict()
    doc["forecast"]["orders"] = "-0-10-1-11"  # valid, but not what was written
    with pytest.raises(PlanError, match="checksum"):
        Plan.from_dict(doc)


# ----------------------------------------------------------------------------------------------------------------
# Runtime: forecast arithmetic on hand-made inputs


STEPS = 10


def step_inputs(batch: int, seed: int = 3):
    """Independent latents per step: the runtime must forecast from what it stored, whatever the inputs."""
    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 4, 8, 8, generator=generator) for _ in range(STEPS)]
    labels = torch.arange(batch) % 10
    return xs, labels


@torch.no_grad()
def run_steps(model, xs, labels):
    timesteps = dit_timesteps(STEPS)
    return [model(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample for x, t in zip(xs, timesteps)]


@torch.no_grad()
def test_modules_target_forecasts_last_plus_gain_times_difference():
    from invardiff import apply_invardiff, remove_invardiff

    model = tiny_dit()
    plan = forecast_plan("modules", STEPS, 4)
    schedule = plan.forecast_schedule
    seen: list[torch.Tensor] = []
    handle = model.transformer_blocks[1].attn1.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
    apply_invardiff(model, plan)
    xs, labels = step_inputs(2)
    run_steps(model, xs, labels)
    remove_invardiff(model)
    handle.remove()
    computed = [k for k in range(STEPS) if schedule.compute[k]]
    for k in np.flatnonzero(~schedule.compute):
        before = [c for c in computed if c < k]
        b = before[-1]
        if schedule.orders[k] == 0:
            expected = seen[b]
        else:
            a = before[-2]
            expected = seen[b] + (k - b) / (b - a) * (seen[b] - seen[a])
        torch.testing.assert_close(seen[k], expected, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_residual_target_adds_the_forecast_residual_to_the_live_embedding():
    from invardiff import apply_invardiff, remove_invardiff

    model = tiny_dit()
    plan = forecast_plan("residual", STEPS, 4)
    schedule = plan.forecast_schedule
    entering, leaving = [], []
    h1 = model.transformer_blocks[0].register_forward_pre_hook(lambda _m, args, kw: entering.append(
        (args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)  # fmt: skip
    h2 = model.transformer_blocks[-1].register_forward_hook(lambda _m, _a, out: leaving.append(out.clone()))
    apply_invardiff(model, plan)
    xs, labels = step_inputs(2)
    run_steps(model, xs, labels)
    remove_invardiff(model)
    h1.remove(), h2.remove()
    embedded = [model.pos_embed(x) for x in xs]  # unhooked now: E_k of each step's latent
    residual = {k: leaving[k] - embedded[k] for k in range(STEPS) if schedule.compute[k]}
    for k in np.flatnonzero(~schedule.compute):
        before = sorted(r for r in residual if r < k)
        b = before[-1]
        forecast = residual[b]
        if schedule.orders[k] == 1:
            a = before[-2]
            forecast = residual[b] + (k - b) / (b - a) * (residual[b] - residual[a])
        torch.testing.assert_close(entering[k], embedded[k] + forecast, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("target", ["residual", "modules"])
def test_forecast_plans_are_batch_invariant_and_count_what_ran(target):
    from invardiff import apply_invardiff, invardiff_stats, remove_invardiff, reset_invardiff

    model = tiny_dit()
    plan = forecast_plan(target, STEPS, 4)
    apply_invardiff(model, plan)
    x, labels = dit_inputs(3)
    together = sample_dit(model, x, labels, STEPS)[-1]
    stats = invardiff_stats(model)
    alone = []
    for row in range(3):
        reset_invardiff(model)
        alone.append(sample_dit(model, x[row : row + 1], labels[row : row + 1], STEPS)[-1])
    remove_invardiff(model)
    torch.testing.assert_close(torch.cat(alone), together, rtol=0, atol=5e-5)
    assert stats.steps_total == STEPS and stats.steps_computed == 4
    assert stats.module_evals_computed == 4 * 2 * DIT_LAYERS
    assert stats.module_evals_total == STEPS * 2 * DIT_LAYERS


@torch.no_grad()
def test_forecast_with_module_books_forecasts_each_site_from_its_own_computed_steps():
    from invardiff import apply_invardiff, remove_invardiff

    model = tiny_dit()
    schedule = uniform_schedule(STEPS, 5)  # computed 0, 2, 4, 6, 8
    modules = {f: np.zeros((STEPS, DIT_LAYERS), dtype=bool) for f in ("attn", "ff")}
    modules["attn"][4, 0] = True  # layer 0's attention copies at computed step 4
    plan = Plan.from_forecast(signature(STEPS), schedule, target="modules", modules=modules)
    seen = []
    handle = model.transformer_blocks[0].attn1.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
    apply_invardiff(model, plan)
    xs, labels = step_inputs(1)
    run_steps(model, xs, labels)
    remove_invardiff(model)
    handle.remove()
    torch.testing.assert_close(seen[4], seen[2], rtol=0, atol=0)  # the book's copy
    # step 5 forecasts from this site's computed steps 0 and 2 (not 2 and 4): gain (5 - 2) / (2 - 0)
    torch.testing.assert_close(seen[5], seen[2] + 1.5 * (seen[2] - seen[0]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Recorder and calibration


@torch.no_grad()
def test_recorder_measures_zero_error_for_a_perfect_forecast_and_leaves_outputs_alone():
    from invardiff.forecast_recorder import ForecastErrorRecorder

    model = tiny_dit()
    xs, labels = step_inputs(2)
    xs = [xs[0]] * STEPS  # same input every step: copying the previous value is exact
    timesteps = [500] * STEPS
    reference = [model(x, timestep=torch.full((2,), t), class_labels=labels).sample for x, t in zip(xs, timesteps)]
    for target in ("residual", "modules"):
        with ForecastErrorRecorder(model, num_steps=STEPS, target=target, max_gap=2) as recorder:
            outputs = [model(x, timestep=torch.full((2,), t), class_labels=labels).sample for x, t in zip(xs, timesteps)]
        copy_error, linear_error = recorder.errors()
        for got, want in zip(outputs, reference):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert np.nanmax(copy_error) < 1e-10 and np.nanmax(linear_error) < 1e-10
        assert np.isnan(copy_error[0]).all() and not np.isnan(copy_error[1, 0])


@pytest.fixture(scope="module")
def tiny_generator():
    from pipelines.build import GeneratorConfig, build_generator

    return build_generator(GeneratorConfig(model="tiny-dit", num_inference_steps=12, device="cpu"))


def test_calibrate_to_a_target_speedup_meets_the_budget(tiny_generator):
    from pipelines.calibration import calibration_requests
    from pipelines.forecast_calibration import ForecastTarget, calibrate_forecast

    requests = calibration_requests(tiny_generator, runs=3)
    plan = calibrate_forecast(tiny_generator, ForecastTarget(speedup=3.0), requests, batch_size=3, held_out=2)
    schedule = plan.forecast_schedule
    assert plan.mode == "forecast" and plan.forecast["target"] in ("residual", "modules")
    assert schedule.num_computed == 4 and plan.summary()["ideal_speedup"] >= 3.0
    assert plan.summary()["longest_gated_run"] <= plan.calibration["max_gap"]
    record = plan.calibration
    assert record["method"] == "forecast-dp" and record["goal"]["target_speedup"] == 3.0
    assert set(record["candidates"]) == {"residual/dp", "residual/uniform", "modules/dp", "modules/uniform"}
    assert record["chosen"] == f"{record['target']}/{record['placement']}" == f"{plan.forecast['target']}/{record['placement']}"
    rel = {key: c["calibration_rel_err"] for key, c in record["candidates"].items()}
    best = {t: min(rel[f"{t}/dp"], rel[f"{t}/uniform"]) for t in ("residual", "modules")}
    assert rel[record["chosen"]] == best[record["target"]]  # the better placement of the chosen target
    from invardiff.tuning import MODULES_MARGIN

    assert (record["target"] == "modules") == (best["modules"] < MODULES_MARGIN * best["residual"])
    assert record["held_out"]["runs"] == 2 and math.isfinite(record["held_out"]["rel_err"])


def test_calibrate_to_an_error_bound_takes_the_fewest_computed_steps_within_it(tiny_generator):
    from pipelines.calibration import calibration_requests
    from pipelines.forecast_calibration import ForecastTarget, calibrate_forecast

    requests = calibration_requests(tiny_generator, runs=2)
    loose = calibrate_forecast(tiny_generator, ForecastTarget(max_rel_error=0.5), requests, batch_size=2, held_out=0)
    search = {int(m): min(v.values()) for m, v in loose.calibration["search"].items()}
    chosen = loose.forecast_schedule.num_computed
    assert search[chosen] <= 0.5
    assert all(rel > 0.5 for m, rel in search.items() if m < chosen)
    tight = calibrate_forecast(tiny_generator, ForecastTarget(max_rel_error=1e-4), requests, batch_size=2, held_out=0)
    assert tight.forecast_schedule.num_computed >= chosen


@torch.no_grad()
@pytest.mark.parametrize("target", ["residual", "modules"])
def test_flux_forecast_plans_run_batch_invariant_and_match_the_recorder(target):
    from invardiff import apply_invardiff, get_adapter, invardiff_stats, remove_invardiff, reset_invardiff
    from invardiff.forecast_recorder import ForecastErrorRecorder
    from invardiff_testing import flux_inputs, sample_flux, tiny_flux

    model = tiny_flux()
    layers = get_adapter(model).layers(model)
    sig = PipelineSignature(
        architecture="flux", model_id="tiny-flux", model_fingerprint="sha256:" + "cd" * 32,
        scheduler="FlowMatchEulerDiscreteScheduler", num_inference_steps=STEPS, height=32, width=32,
        guidance_mode="none", guidance_scale=1.0, dtype="float32", layers=layers,
    )  # fmt: skip
    plan = Plan.from_forecast(sig, uniform_schedule(STEPS, 4), target=target)
    inputs = flux_inputs(3)
    apply_invardiff(model, plan)
    together = sample_flux(model, inputs, STEPS)[-1]
    stats = invardiff_stats(model)
    alone = []
    for row in range(3):
        reset_invardiff(model)
        alone.append(sample_flux(model, inputs.rows(slice(row, row + 1)), STEPS)[-1])
    remove_invardiff(model)
    torch.testing.assert_close(torch.cat(alone), together, rtol=0, atol=5e-5)
    assert stats.steps_computed == 4 and stats.module_evals_computed == 4 * sum(layers.values())
    # the recorder measures the candidates on FLUX too, and leaves the uncached outputs alone
    reference = sample_flux(model, inputs, STEPS)
    with ForecastErrorRecorder(model, num_steps=STEPS, target=target, max_gap=2) as recorder:
        recorded = sample_flux(model, inputs, STEPS)
    for got, want in zip(recorded, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    copy_error, linear_error = recorder.errors()
    assert np.nanmin(copy_error) >= 0 and np.isfinite(copy_error[1:, 0]).all()


V1_PLAN = Path(__file__).parent / "data" / "plan-v1-633f83d.json"


@torch.no_grad()
def test_a_format_1_plan_written_before_forecasting_loads_and_runs_exactly_as_before():
    """The file was written by the code of commit 633f83d (format 1 only)."""
    from invardiff import apply_invardiff, remove_invardiff
    from invardiff_testing import ToyPlan

    plan = Plan.load(V1_PLAN)
    assert plan.mode == "paper" and plan.forecast is None and plan.plan_id == "91d669270358"
    assert plan.to_json() == V1_PLAN.read_text()  # re-written byte for byte, checksum unchanged
    # Run through the runtime, it computes what the same books did before: the paper path, not a forecast one.
    model = tiny_dit()
    x, labels = dit_inputs(2)
    toy = ToyPlan(np.array(plan.step_gate), {f: np.array(b) for f, b in plan.modules.items()})
    results = []
    for p in (plan, toy):
        apply_invardiff(model, p)
        results.append(sample_dit(model, x, labels, STEPS)[-1])
        remove_invardiff(model)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_propagation_gains_measure_growth_of_an_output_error_and_leave_the_model_alone(tiny_generator):
    from pipelines.calibration import calibration_requests
    from pipelines.forecast_calibration import propagation_gains

    requests = calibration_requests(tiny_generator, runs=2)
    before = tiny_generator.generate(requests).final
    gains = propagation_gains(tiny_generator, requests)
    assert gains.shape == (tiny_generator.num_inference_steps,)
    assert np.all(np.isfinite(gains)) and np.all(gains > 0)
    # the last step's output error reaches the final sample through one sampler step only: |d x / d output|
    # (2 %: the scheduler clips the predicted x0, which a few perturbed elements cross; measured 0.6 %)
    from pipelines.forecast_calibration import sampler_gains

    assert gains[-1] == pytest.approx(abs(sampler_gains(tiny_generator)[-1]), rel=0.02)
    torch.testing.assert_close(tiny_generator.generate(requests).final, before, rtol=0, atol=0)
