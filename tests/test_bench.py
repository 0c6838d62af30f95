"""The peer-comparison harness end to end on a tiny DiT, its Pareto helpers, and the paper's step gates."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from benchmarks.bench import (
    PAPER_GATED_STEPS,
    PAPER_STEP_GATES,
    QUICK,
    dominated_by,
    pareto_front,
)

# ------------------------------------------------------------------------------------------------------------------
# Pareto front (both coordinates maximised)


def test_pareto_front_keeps_only_undominated_points_sorted_by_speed():
    points = [(1.0, 40.0), (2.0, 30.0), (1.5, 25.0), (3.0, 20.0), (2.5, 10.0)]
    assert pareto_front(points) == [0, 1, 3]


def test_pareto_front_drops_a_point_equal_in_one_axis_and_worse_in_the_other():
    assert pareto_front([(2.0, 30.0), (2.0, 31.0), (1.0, 31.0)]) == [1]


def test_pareto_front_keeps_exact_ties_and_ignores_missing_values():
    points = [(2.0, 30.0), (2.0, 30.0), (None, 99.0), (float("nan"), 50.0), (1.0, None)]
    assert pareto_front(points) == [0, 1]
    assert pareto_front([]) == []


def test_dominated_by_needs_at_least_equal_speed_and_strictly_higher_quality():
    others = [(1.5, 35.0), (2.0, 30.0), (2.5, 31.0)]
    assert dominated_by((2.0, 30.0), others) == 2
    assert dominated_by((2.0, 31.0), others) is None
    assert dominated_by((1.0, 20.0), others) == 0
    assert dominated_by((None, 20.0), others) is None


# ------------------------------------------------------------------------------------------------------------------
# Published step gates (method doc §4.6)


@pytest.mark.parametrize("name", sorted(PAPER_STEP_GATES))
def test_paper_step_gates_reproduce_the_documented_gated_step_counts(name):
    from invardiff.calibration import gated_steps

    gate = np.array([c == "1" for c in PAPER_STEP_GATES[name]])
    gated, total = PAPER_GATED_STEPS[name]
    assert set(PAPER_STEP_GATES[name]) <= {"0", "1"}
    assert (len(gated_steps(gate)), gate.size) == (gated, total)
    assert not gate[0] and not gate[-1]  # the first and last steps are always computed


def test_paper_step_gate_counts_are_the_documented_ones():
    assert PAPER_GATED_STEPS == {"dit-slow": (29, 50), "dit-fast": (30, 50), "flux-fast": (17, 28), "flux-slow": (14, 28)}


# ------------------------------------------------------------------------------------------------------------------
# The harness end to end


TINY = replace(
    QUICK,
    model="tiny-dit",
    steps=6,
    images=4,
    batch_size=2,
    warmup_batch=1,
    calibration_runs=2,
    presets=("fast", "copy-fast"),
    forecast_calibration_runs=2,
    uniform_speedups=(3.0,),
    taylorseer_warmups=(1,),
    tau_steps=(0.45,),
    mag_thresholds=(0.5,),
    step_intervals=(2,),
    fora_intervals=(2,),
    fewer_steps=(3,),
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from benchmarks.bench import run_bench

    out = tmp_path_factory.mktemp("bench")
    result = run_bench(TINY, out, command="pytest", say=lambda _m: None)
    return out, result


def rows_by_name(result):
    return {r["method"]: r for r in result["rows"]}


def test_bench_has_a_row_for_every_method(bench):
    _, result = bench
    rows = rows_by_name(result)
    expected = [
        "uncached",
        "InvarDiff copy-fast",
        "InvarDiff tau_step=0.45",
        "uniform + forecast residual, 2 computed",
        "uniform + forecast modules, 2 computed",
        "FirstBlockCache 0.1",
        "TaylorSeer N=3 O=1 W=1",
        "MagCache 0.5 K=3",
        "PAB attn every 2, t in (100, 800)",
        "FasterCache",
        "reuse step, compute every 2",
        "FORA attn+ff, compute every 2",
        "DDIM 3 steps",
    ]
    for name in expected:
        assert name in rows, f"missing row {name!r}; rows: {sorted(rows)}"
    # the forecast preset's row names the target calibration chose; 6 steps at 3x is 2 computed
    fast = [name for name in rows if name.startswith("InvarDiff fast (forecast ")]
    assert len(fast) == 1 and fast[0].endswith(", 2 computed)")
    assert rows[fast[0]]["ideal_speedup"] == pytest.approx(3.0)
    assert any(r["kind"] == "cache-dit" for r in rows.values())
    assert rows["FasterCache"]["status"].startswith("not run:")
    for row in rows.values():
        if row["method"] != "FasterCache" and row["kind"] != "cache-dit":
            assert row["status"] == "ok", row
        if row["kind"] == "cache-dit" and row["status"] != "ok":  # only acceptable reason: not installed
            assert "not installed" in row["status"]


def test_uncached_row_is_the_reference(bench):
    _, result = bench
    uncached = rows_by_name(result)["uncached"]
    assert uncached["wall_speedup"] == 1.0 and uncached["cpu_speedup"] == 1.0
    assert uncached["ideal_speedup"] == 1.0
    assert uncached["psnr"] is None and uncached["ssim"] is None and uncached["ms_ssim"] is None
    # 6 steps x 3 layers x (attn + ff) per batch, two batches of two images.
    assert uncached["module_evals"] == uncached["module_evals_uncached"] == 2 * 6 * 3 * 2


def test_ideal_speedups_are_the_ratio_of_counted_evaluations(bench):
    _, result = bench
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        assert 0 < row["module_evals"] <= row["module_evals_uncached"], row["method"]
        assert row["ideal_speedup"] == pytest.approx(row["module_evals_uncached"] / row["module_evals"])
        if row["policy_module_evals"] is not None and row["kind"] in ("uncached", "invardiff", "invardiff-sweep"):
            # The counting hooks and the InvarDiff runtime's own bookkeeping agree.
            assert row["module_evals"] == row["policy_module_evals"], row["method"]


def test_static_baselines_evaluate_exactly_their_share(bench):
    _, result = bench
    rows = rows_by_name(result)
    full = rows["uncached"]["module_evals"]
    assert rows["DDIM 3 steps"]["module_evals"] == full // 2
    assert rows["reuse step, compute every 2"]["module_evals"] == full // 2
    assert rows["FORA attn+ff, compute every 2"]["module_evals"] == full // 2
    assert rows["TaylorSeer N=3 O=1 W=1"]["module_evals"] < full


def test_quality_and_speed_numbers_are_sane(bench):
    _, result = bench
    for row in result["rows"]:
        if row["status"] != "ok" or row["method"] == "uncached":
            continue
        assert math.isfinite(row["wall_speedup"]) and row["wall_speedup"] > 0
        assert math.isfinite(row["cpu_speedup"]) and row["cpu_speedup"] > 0
        assert row["wall_speedup_min"] <= row["wall_speedup"] <= row["wall_speedup_max"]
        assert 0 < row["psnr"] <= 100
        assert -1 <= row["ssim"] <= 1 and -1 <= row["ms_ssim"] <= 1 + 1e-6
        assert row["peak_memory_mib"] > 0
        assert row["lpips"].startswith("skipped: no local weights")
        assert row["fid"].startswith("skipped: no local weights")
    # Reusing what was computed differs from computing it: the cached rows are not the reference image.
    assert rows_by_name(result)["reuse step, compute every 2"]["psnr"] < 100


def test_outputs_written(bench):
    out, result = bench
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "table.md").read_text()
    for row in result["rows"]:
        assert f"| {row['method']} |" in table
    assert "skipped: no local weights" in table
    assert (out / "results.json").exists()


def test_bench_command_is_registered():
    from typer.testing import CliRunner

    from jobs.cli import app

    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    assert "--quick" in result.output and "--out" in result.output


def test_every_peer_is_a_cache_policy_and_detaches_without_a_trace():
    """The harness runs all methods on one transformer, so a hook left behind would bias every later row."""
    import torch

    from benchmarks import peers
    from invardiff._hookutils import cache_context
    from invardiff.policy import CachePolicy
    from pipelines.base import Request
    from pipelines.build import GeneratorConfig, build_generator

    generator = build_generator(GeneratorConfig(model="tiny-dit", device="cpu", num_inference_steps=6))
    requests = [Request("a", 0, class_label=1), Request("b", 1, class_label=2)]
    before = generator.generate(requests).final
    policies = [
        peers.first_block_cache(0.5),
        peers.taylorseer(2),
        peers.mag_cache(0.5, peers.mag_ratios(generator, requests), 6),
        peers.pyramid_attention_broadcast(2, (0, 1000)),
        peers.CacheDitDBCache(0.5, 6, warmup=1),
    ]
    for policy in policies:
        assert isinstance(policy, CachePolicy)
        policy.attach(generator.transformer)
        policy.reset(generator.transformer)
        with cache_context(generator.transformer, "cond"):
            cached = generator.generate(requests).final
        assert policy.stats(generator.transformer).module_evals_computed < 2 * 6 * 3, policy.name  # it skipped work
        policy.reset(generator.transformer)
        policy.detach(generator.transformer)
        assert not torch.equal(cached, before), policy.name
        assert torch.equal(generator.generate(requests).final, before), f"{policy.name} left state behind"


# ----------------------------------------------------------------------------------------------------------------
# FLUX in the harness (`invardiff bench --model tiny-flux`)


TINY_FLUX = replace(
    TINY,
    model="tiny-flux",
    images=2,
    presets=("fast", "paper-dit-fast", "copy-fast"),  # the DiT paper point becomes FLUX's; copy-* is left out
    tau_steps=(),
    step_intervals=(),
    fora_intervals=(),
    fewer_steps=(),
    dicache_thresholds=(),
)


def test_flux_bench_runs_our_plans_and_the_peers_that_support_flux(tmp_path):
    from benchmarks.bench import run_bench

    result = run_bench(TINY_FLUX, tmp_path, command="pytest", say=lambda _m: None)
    rows = rows_by_name(result)
    assert result["environment"]["model"] == "tiny-flux"
    assert set(rows) >= {"uncached", "InvarDiff paper-flux-fast", "FirstBlockCache 0.1", "TaylorSeer N=3 O=1 W=1",
                         "MagCache 0.5 K=3", "uniform + forecast residual, 2 computed"}  # fmt: skip
    assert [name for name in rows if name.startswith("InvarDiff fast (forecast ")]
    assert not any("copy-fast" in name or "dit" in name for name in rows)
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["ideal_speedup"] == pytest.approx(row["module_evals_uncached"] / row["module_evals"])
        if row["kind"] in ("uncached", "invardiff"):
            assert row["module_evals"] == row["policy_module_evals"], row["method"]
        if row["method"] != "uncached":
            assert math.isfinite(row["cpu_speedup"]) and 0 < row["psnr"] <= 100
    assert rows["InvarDiff paper-flux-fast"]["ideal_speedup"] > 1.0
    assert "| InvarDiff paper-flux-fast |" in (tmp_path / "table.md").read_text()


def test_flux_presets_swap_the_dit_paper_points_and_keep_unknown_names_to_fail_loudly():
    from benchmarks.bench import presets_for

    assert presets_for(("balanced", "copy-fast", "paper-dit-fast"), "flux") == ("balanced", "paper-flux-fast")
    assert presets_for(("copy-fast", "paper-dit-fast"), "dit") == ("copy-fast", "paper-dit-fast")
    assert presets_for(("nonsense",), "flux") == ("nonsense",)
