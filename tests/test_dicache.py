"""DiCache: online probe, accumulated-error decisions, trajectory-aligned residuals, per-row and batch-global modes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from invardiff_testing import (
    DIT_LAYERS,
    FLUX_DUAL,
    FLUX_SINGLE,
    diffusers_hook_names,
    dit_inputs,
    flux_inputs,
    sample_dit,
    sample_flux,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_dit,
    tiny_flux,
)

from invardiff import CachePolicy, cache_context
from invardiff.policies.dicache import DiCachePolicy, aligned_residual, alignment_gain, relative_l1

T = 20
BATCH_TOLERANCE = 5e-5  # what other batch sizes cost in float32 on CPU (the runtime tests use the same bound)


def run(model, policy, sample, *inputs):
    """One generation under `policy`; returns (outputs, stats, per-row decision strings)."""
    policy.attach(model)
    try:
        policy.reset(model)
        outputs = sample(model, *inputs)
        decisions = policy.decisions(model)["default"]
        rows = ["".join("1" if c else "0" for c in column) for column in zip(*decisions)]
        return outputs, policy.stats(model), rows
    finally:
        policy.detach(model)


def dit_sample(model, x, labels):
    return sample_dit(model, x, labels, T)


def flux_sample(model, inputs):
    return sample_flux(model, inputs, 12)


def spread_batch():
    """Three rows whose trajectories change at clearly different rates, so their decisions differ."""
    x, labels = dit_inputs(3)
    return x * torch.tensor([1.0, 0.2, 3.0]).view(3, 1, 1, 1), labels


# ---- the math


def test_relative_l1_per_row_and_over_the_whole_batch():
    a = torch.tensor([[1.0, 1.0], [4.0, 4.0]])
    b = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    assert torch.allclose(relative_l1(a, b, per_row=True), torch.tensor([0.5, 1.0]))
    assert torch.allclose(relative_l1(a, b, per_row=False), torch.tensor([0.75]))


def test_alignment_gain_is_clipped_and_falls_back_to_one():
    q_old, q_new = torch.zeros(2, 3), torch.ones(2, 3)
    q = torch.tensor([[1.2] * 3, [5.0] * 3])
    assert torch.allclose(alignment_gain(q, q_old, q_new, (1.0, 1.5), per_row=True), torch.tensor([1.2, 1.5]))
    assert torch.allclose(alignment_gain(q * 0.1, q_old, q_new, (1.0, 1.5), per_row=True), torch.ones(2))
    nan = torch.full((1, 3), float("nan"))
    assert torch.equal(alignment_gain(nan, q_old[:1], q_new[:1], (1.0, 1.5), per_row=True), torch.ones(1))


def test_aligned_residual_extrapolates_along_the_last_change():
    r_old, r_new = torch.zeros(2, 2, 2), torch.ones(2, 2, 2)
    gamma = torch.tensor([1.0, 1.5])
    r = aligned_residual(r_old, r_new, gamma)
    assert torch.equal(r[0], r_new[0])  # gamma 1: R_new exactly
    assert torch.allclose(r[1], torch.full((2, 2), 1.5))


# ---- DiT


def test_dicache_is_a_cache_policy_and_detaches_without_a_trace():
    model = tiny_dit()
    policy = DiCachePolicy(0.1, T)
    assert isinstance(policy, CachePolicy) and policy.name == "dicache" and policy.plan_id is None
    x, labels = dit_inputs(2)
    reference = sample_dit(model, x, labels, T)
    run(model, policy, dit_sample, x, labels)
    assert diffusers_hook_names(model) == []
    assert all(torch.equal(a, b) for a, b in zip(reference, sample_dit(model, x, labels, T)))


def test_threshold_zero_never_skips_and_is_bitwise_the_full_model():
    model = tiny_dit()
    x, labels = dit_inputs(2)
    reference = sample_dit(model, x, labels, T)
    outputs, stats, rows = run(model, DiCachePolicy(0.0, T), dit_sample, x, labels)
    assert all(torch.equal(a, b) for a, b in zip(reference, outputs))
    assert rows == ["1" * T] * 2
    assert stats.steps_computed == stats.steps_total == T
    assert stats.module_evals_computed == stats.module_evals_total == 2 * DIT_LAYERS * T


def test_warmup_computes_and_skips_follow_the_accumulated_probe_error():
    model = tiny_dit()
    x, labels = spread_batch()
    _, _, rows = run(model, DiCachePolicy(0.1, T, batch_mode="row"), dit_sample, x, labels)
    warmup = int(0.2 * T)
    assert all(row.startswith("1" * warmup) for row in rows)
    assert all("0" in row for row in rows)  # the threshold is loose enough to skip on every row
    assert len(set(rows)) > 1  # and the rows decide differently


def _row_counts(model, names):
    """Rows each named module runs on, summed over calls (a sub-batch of 2 rows counts 2)."""
    counts: Counter[str] = Counter()
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        forward = module.forward

        def counted(*args, _name=name, _forward=forward, **kwargs):
            counts[_name] += int(args[0].shape[0])
            return _forward(*args, **kwargs)

        module.forward = counted
    return counts


def test_stats_count_the_rows_that_actually_ran():
    model = tiny_dit()
    attn = [f"transformer_blocks.{l}.attn1" for l in range(DIT_LAYERS)]
    ff = [f"transformer_blocks.{l}.ff" for l in range(DIT_LAYERS)]
    counts = _row_counts(model, attn + ff)
    x, labels = spread_batch()
    _, stats, rows = run(model, DiCachePolicy(0.1, T, batch_mode="row"), dit_sample, x, labels)
    batch = x.shape[0]
    assert counts["transformer_blocks.0.attn1"] == batch * T  # the probe runs once per step, never twice
    tail_rows = sum(row.count("1") for row in rows)
    assert all(counts[name] == tail_rows for name in attn[1:] + ff[1:])  # tails ran on exactly the computing rows
    assert 0 < tail_rows < batch * T
    assert stats.per_family["attn"] == (round(sum(counts[n] for n in attn) / batch), DIT_LAYERS * T)
    assert stats.module_evals_computed == round(sum(counts.values()) / batch)
    assert stats.steps_computed == round(tail_rows / batch)


def test_per_row_decisions_are_batch_invariant_and_global_ones_are_not():
    model = tiny_dit()
    x, labels = spread_batch()
    alone = [run(model, DiCachePolicy(0.1, T), dit_sample, x[i : i + 1], labels[i : i + 1]) for i in range(3)]
    batched, _, rows = run(model, DiCachePolicy(0.1, T, batch_mode="row"), dit_sample, x, labels)
    for i, (outputs, _, alone_rows) in enumerate(alone):
        assert rows[i] == alone_rows[0]
        assert torch.allclose(batched[-1][i], outputs[-1][0], atol=BATCH_TOLERANCE, rtol=0)

    global_out, _, global_rows = run(model, DiCachePolicy(0.1, T, batch_mode="global"), dit_sample, x, labels)
    assert len(set(global_rows)) == 1  # one decision for the whole batch
    differs = [i for i in range(3) if global_rows[i] != alone[i][2][0]]
    assert differs  # some row is made to compute or skip by its batchmates ...
    i = differs[0]
    assert not torch.allclose(global_out[-1][i], alone[i][0][-1][0], atol=1e-3)  # ... and its image changes


def test_generations_start_over_after_num_steps_calls_per_context():
    model = tiny_dit()
    x, labels = spread_batch()
    policy = DiCachePolicy(0.1, T)
    policy.attach(model)
    try:
        with cache_context(model, "cond"):
            first = sample_dit(model, x, labels, T)
            second = sample_dit(model, x, labels, T)
        assert torch.equal(first[-1], second[-1])
        assert len(policy.decisions(model)["cond"]) == 2 * T
    finally:
        policy.detach(model)


def test_batch_that_changes_size_mid_generation_is_refused():
    model = tiny_dit()
    x, labels = dit_inputs(2)
    policy = DiCachePolicy(0.1, T)
    policy.attach(model)
    try:
        sample_dit(model, x, labels, 2)
        with pytest.raises(RuntimeError, match="batch changed"):
            sample_dit(model, x[:1], labels[:1], 1)
    finally:
        policy.detach(model)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_mode"):
        DiCachePolicy(0.1, T, batch_mode="any")
    with pytest.raises(ValueError, match="no block to skip"):
        DiCachePolicy(0.1, T, probe_depth=DIT_LAYERS).attach(tiny_dit())


# ---- FLUX


def test_flux_skips_per_row_batch_invariantly_and_forces_the_last_step():
    model = tiny_flux()
    inputs = flux_inputs(2)
    inputs.x = inputs.x * torch.tensor([1.0, 4.0]).view(2, 1, 1)
    outputs, stats, rows = run(model, DiCachePolicy(0.2, 12), flux_sample, inputs)
    assert all(row.endswith("1") for row in rows)  # FLUX's last step always computes (the reference script's rule)
    assert any("0" in row for row in rows)
    assert stats.module_evals_computed < stats.module_evals_total
    assert set(stats.per_family) == {"attn", "context_attn", "ff", "context_ff", "single_attn", "single_mlp"}
    tail_steps = sum(row.count("1") for row in rows) / 2  # in call units: a tail run on one of two rows is 1/2
    # The probe is the first dual block (every step, every row); the other blocks run only where a row computes.
    assert stats.per_family["attn"] == (round(12 + tail_steps * (FLUX_DUAL - 1)), 12 * FLUX_DUAL)
    assert stats.per_family["single_attn"] == (round(tail_steps * FLUX_SINGLE), 12 * FLUX_SINGLE)
    for i in range(2):
        single, _, single_rows = run(model, DiCachePolicy(0.2, 12), flux_sample, inputs.rows(slice(i, i + 1)))
        assert single_rows[0] == rows[i]
        assert torch.allclose(outputs[-1][i], single[-1][0], atol=BATCH_TOLERANCE, rtol=0)
    assert diffusers_hook_names(model) == []


def test_flux_threshold_zero_is_bitwise_the_full_model():
    model = tiny_flux()
    inputs = flux_inputs(2)
    reference = sample_flux(model, inputs, 12)
    outputs, stats, _ = run(model, DiCachePolicy(0.0, 12), flux_sample, inputs)
    assert all(torch.equal(a, b) for a, b in zip(reference, outputs))
    assert stats.module_evals_computed == stats.module_evals_total


# ---- through the job and the CLI


def test_shipped_spec_becomes_a_dicache_policy():
    from invardiff.policies import policy_from_json, policy_spec_json

    spec = policy_spec_json("dicache", threshold=0.3, batch_mode="global")
    policy = policy_from_json(spec, num_steps=T)
    assert isinstance(policy, DiCachePolicy) and policy.name == "dicache"
    assert policy._options["threshold"] == 0.3 and policy._options["batch_mode"] == "global"
    with pytest.raises(ValueError, match="number of steps"):
        policy_from_json(spec)


def test_cli_ships_a_dicache_spec_and_refuses_a_plan_for_it():
    from jobs.cli import UserError, _shipped_policy

    spec = _shipped_policy(None, policy_name="dicache", dicache_threshold=0.2, dicache_batch_mode="global")
    assert '"threshold": 0.2' in spec and '"batch_mode": "global"' in spec
    with pytest.raises(UserError, match="takes no --plan"):
        _shipped_policy("{}", policy_name="dicache", dicache_threshold=None, dicache_batch_mode="row")
    with pytest.raises(UserError, match="dicache only"):
        _shipped_policy(None, policy_name=None, dicache_threshold=0.2, dicache_batch_mode="row")


@pytest.mark.slow  # Ray workers import torch and diffusers: about 20 s on an idle 2-core box
def test_generate_job_runs_dicache_and_its_rows_count_what_ran(ray_local, tmp_path):
    from invardiff.policies import policy_spec_json
    from jobs.generate import run_generate
    from jobs.manifest import ManifestSchema, class_manifest
    from jobs.outputs import read_outputs
    from pipelines.build import GeneratorConfig

    config = GeneratorConfig(model="tiny-dit", num_inference_steps=10, device="cpu")
    out = str(tmp_path / "out")
    spec = policy_spec_json("dicache", threshold=0.5)
    run_generate(class_manifest([0, 1], per_class=2, seed=0), out, config,
                 schema=ManifestSchema("class_label", num_classes=10), plan_json=spec, batch_size=4)
    rows = read_outputs(out).to_pylist()
    assert len(rows) == 4
    for row in rows:
        assert row["error"] is None and row["policy"] == "dicache" and row["plan_id"] is None
        assert row["steps_total"] == 10 and row["steps_computed"] < 10
        assert row["module_evals_computed"] < row["module_evals_total"] == 10 * 2 * 3
