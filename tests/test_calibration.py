"""Calibration math on hand-computed arrays (method spec §3.2, §4, §5)."""

import math

import numpy as np
import pytest

from invardiff.calibration import (
    EPS,
    RateTracker,
    apply_forcing,
    bits,
    build_books,
    consolidate_step_gate,
    effective_modules,
    gated_steps,
    ideal_speedup,
    longest_run,
    mean_rates,
    provisional_books,
    quantile_threshold,
    rates,
    reuse_share,
    step_sizes,
    threshold_books,
    warmup_steps,
)


def trajectory(positions):
    """A stream whose feature at step k is [x_k, -2 x_k]: every L1 step size is 3 |dx|, so ratios are dx ratios."""
    x = np.asarray(positions, dtype=np.float64)
    return np.stack([x, -2 * x], axis=1)


# --------------------------------------------------------------------------------------------------
# step sizes and rates


def test_step_sizes_are_l1_with_eps_inside_the_abs():
    z = np.array([[0.0, 0.0], [1.0, -2.0], [1.5, -2.0], [3.0, 0.0]])
    d = step_sizes(z)
    assert math.isnan(d[0])
    np.testing.assert_allclose(d[1:], [3.0, 0.5 + 2 * EPS, 3.5 + 2 * EPS], rtol=0, atol=1e-12)
    # eps is added before the abs: a step of exactly -eps measures 0, not 2 eps.
    assert step_sizes(np.array([[0.0], [-1e-8]]))[1] == 0.0
    # a zero step still measures n * eps, which keeps 0/0 out of the ratio
    assert step_sizes(np.zeros((2, 4)))[1] == pytest.approx(4e-8, rel=1e-12)


def test_step_sizes_accumulate_in_float64():
    z = np.zeros((2, 1_000_000), dtype=np.float32)
    z[1] = np.float32(1e-3)
    assert step_sizes(z, eps=0.0)[1] == pytest.approx(1e6 * float(np.float32(1e-3)), rel=1e-12)


def test_phase1_rate_is_next_step_over_previous_step():
    z = trajectory([0, 1, 3, 4, 4.5, 6.5])  # steps 1, 2, 1, 0.5, 2
    np.testing.assert_array_equal(rates(z, eps=0.0), [1.0, 2.0, 0.5, 0.5, 4.0, 1.0])
    d = step_sizes(z)
    np.testing.assert_allclose(rates(z)[1:-1], d[2:] / d[1:-1], rtol=1e-15)


def test_phase1_equals_phase2_with_an_all_false_mask():
    z = np.random.default_rng(0).normal(size=(9, 3, 4))
    np.testing.assert_array_equal(rates(z), rates(z, provisional=np.zeros(9, dtype=bool)))


def test_phase2_worked_example_of_section_5():
    # Provisional plan reuses rows 5-8. Increments 1, 2, ..., 11 keep every ratio distinct.
    z = trajectory(np.concatenate([[0.0], np.cumsum(np.arange(1.0, 12.0))]))
    provisional = np.zeros(12, dtype=bool)
    provisional[5:9] = True

    def l1(a, b):
        return np.abs(z[a] - z[b]).sum()

    rho1 = rates(z, eps=0.0)
    rho2 = rates(z, provisional=provisional, eps=0.0)

    np.testing.assert_array_equal(rho2[:7], rho1[:7])  # rows before the run, and rho2[5], rho2[6], unchanged
    assert rho2[5] == l1(6, 5) / l1(5, 4) == 6 / 5
    assert rho2[6] == l1(7, 6) / l1(6, 5) == 7 / 6
    assert rho2[7] == l1(8, 6) / l1(6, 5) == 15 / 6  # numerator: displacement from the frozen anchor Z6
    assert rho2[8] == l1(9, 6) / l1(6, 5) == 24 / 6
    assert rho2[9] == l1(10, 6) / l1(6, 5) == 34 / 6
    assert rho2[10] == l1(11, 10) / l1(10, 6) == 11 / 34  # denominator spans 6 -> 10
    assert rho2[0] == rho2[11] == 1.0
    # with the default eps the same values up to eps
    np.testing.assert_allclose(rates(z, provisional=provisional), rho2, rtol=1e-7)


def test_rate_tracker_driven_online():
    z = trajectory(np.concatenate([[0.0], np.cumsum(np.arange(1.0, 12.0))]))
    provisional = np.zeros(12, dtype=bool)
    provisional[5:9] = True
    tracker = RateTracker(12, provisional)
    anchor, refreshed = None, []
    for z_k in z:  # what the torch recorder does, one hook call per step
        distance = None if anchor is None else float(np.abs(z_k - anchor + EPS).sum())
        refresh = tracker.update(distance)
        refreshed.append(refresh)
        if refresh:
            anchor = z_k.copy()
    # the anchor is frozen on Z6 for steps 7-9 (rows 6-8 are the 2nd..4th reused rows of the run)
    assert refreshed == [True] * 7 + [False] * 3 + [True] * 2
    assert tracker.done
    np.testing.assert_array_equal(tracker.rates, rates(z, provisional=provisional))


def test_rate_tracker_rejects_misuse():
    tracker = RateTracker(3)
    with pytest.raises(ValueError, match="step 0"):
        tracker.update(1.0)
    tracker.update(None)
    with pytest.raises(ValueError, match="step 1"):
        tracker.update(None)
    tracker.update(1.0)
    tracker.update(2.0)
    with pytest.raises(RuntimeError, match="all 3 steps"):
        tracker.update(1.0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        RateTracker(4, provisional=[True, False])


def test_mean_rates_is_a_mean_of_ratios():
    run_a = np.array([1.0, 2.0, 1.0])
    run_b = np.array([1.0, 4.0, 1.0])
    np.testing.assert_array_equal(mean_rates([run_a, run_b]), [1.0, 3.0, 1.0])
    per_run = np.arange(24, dtype=float).reshape(2, 4, 3)
    np.testing.assert_array_equal(mean_rates(per_run), per_run.mean(axis=0))
    with pytest.raises(ValueError):
        mean_rates([])


# --------------------------------------------------------------------------------------------------
# thresholds and books


def test_quantile_pools_interior_rows_of_all_layers_and_drops_nans():
    rho = np.array(
        [
            [-100.0, -100.0],  # row 0: placeholder, ignored
            [1.0, 2.0],
            [3.0, np.nan],
            [4.0, 5.0],
            [100.0, 100.0],  # row T-1: ignored
        ]
    )
    assert quantile_threshold(rho, 0.5) == 3.0
    assert quantile_threshold(rho, 0.3) == pytest.approx(2.2)  # linear: 2 + 0.2 * (3 - 2)
    assert quantile_threshold(rho, 0.3) == np.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.3, method="linear")
    assert math.isnan(quantile_threshold(np.full((4, 2), np.nan), 0.5))
    with pytest.raises(ValueError, match="tau"):
        quantile_threshold(rho, 1.5)


def test_threshold_is_strict_at_the_quantile_boundary():
    rho = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0])  # rows 0 and 6 are low but never candidates
    book = threshold_books({"step": rho}, {"step": 0.5})["step"]
    assert bits(book) == "0110000"  # theta = 3: the row equal to theta is not reused


def test_tau_zero_disables_a_family_and_tau_one_keeps_only_the_maximum():
    rho = {
        "step": np.array([1.0, 0.5, 0.7, 0.6, 1.0]),
        "attn": np.array([[1.0, 1.0], [0.2, 0.3], [0.2, 0.9], [0.4, 0.2], [1.0, 1.0]]),
    }
    books = threshold_books(rho, {"step": 0.0, "attn": 1.0})
    assert not books["step"].any()
    assert bits(books["attn"]) == "00" + "11" + "10" + "11" + "00"
    assert not threshold_books(rho, {"step": 0.5, "attn": 0.0})["attn"].any()
    with pytest.raises(KeyError, match="attn"):
        threshold_books(rho, {"step": 0.5})


def test_warmup_forcing_with_zero_nonskip_still_forces_row_zero():
    step_gate = np.ones(6, dtype=bool)
    modules = {"attn": np.ones((6, 2), dtype=bool)}
    forced_gate, forced_modules = apply_forcing(step_gate, modules, nonskip_rate=0.0)
    assert bits(forced_gate) == "011110"
    assert bits(forced_modules["attn"]) == "00" + "11" * 4 + "00"
    assert step_gate.all() and modules["attn"].all()  # inputs untouched


def test_warmup_length_is_floor_of_rate_times_steps():
    assert warmup_steps(28, 0.10) == 2  # FLUX fast
    assert warmup_steps(28, 0.22) == 6  # FLUX slow
    assert warmup_steps(50, 0.0) == 1
    assert warmup_steps(3, 1.0) == 3
    gate, _ = apply_forcing(np.ones(28, dtype=bool), {}, nonskip_rate=0.10)
    assert bits(gate) == "00" + "1" * 25 + "0"


def test_consolidation_with_two_consecutive_gated_steps():
    step_gate = np.array([0, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    attn = np.array([[0, 0], [1, 0], [0, 1], [0, 0], [1, 1], [0, 1], [0, 0], [0, 0]], dtype=bool)
    gate, modules = consolidate_step_gate(step_gate, {"attn": attn})
    np.testing.assert_array_equal(gate, step_gate)
    assert [bits(row) for row in modules["attn"]] == [
        "00",
        "10",  # untouched
        "11",  # gated
        "11",  # gated; not cleared by row 2's "next row recomputes" since row 3 is itself gated
        "00",  # first non-gated row after the run recomputes everything
        "01",  # untouched
        "11",  # gated
        "00",  # after the run
    ]


def test_consolidation_matches_the_reference_loop():
    rng = np.random.default_rng(1)
    step_gate = rng.random(40) < 0.5
    modules = {"attn": rng.random((40, 5)) < 0.5, "ff": rng.random((40, 3)) < 0.5}
    expected = {family: book.copy() for family, book in modules.items()}
    for j in range(40):  # §4.3 verbatim
        if step_gate[j]:
            for book in expected.values():
                book[j] = True
                if j + 1 < 40:
                    book[j + 1] = False
    _, consolidated = consolidate_step_gate(step_gate, modules)
    for family in modules:
        np.testing.assert_array_equal(consolidated[family], expected[family])


def test_build_books_full_and_dit_legacy():
    rho = {
        "step": np.array([1.0, 0.9, 0.5, 1.2, 1.1, 1.0]),
        "attn": np.array([[1.0, 1.0], [0.1, 0.8], [0.9, 0.9], [0.2, 0.7], [0.3, 0.9], [1.0, 1.0]]),
    }
    # step: interior [0.9, 0.5, 1.2, 1.1], theta = 0.5 + 0.9 * 0.4 = 0.86 -> row 2 only.
    # attn: 8 interior values, theta = 0.3 + 0.8 * (0.7 - 0.3) = 0.62 -> cells (1,0), (3,0), (4,0).
    taus = {"step": 0.3, "attn": 0.4}
    gate, modules = build_books(rho, taus, nonskip_rate=0.0, mode="full")
    assert bits(gate) == "001000"
    assert [bits(r) for r in modules["attn"]] == ["00", "10", "11", "00", "10", "00"]
    gate_legacy, modules_legacy = build_books(rho, taus, nonskip_rate=0.0, mode="dit-legacy")
    assert bits(gate_legacy) == "001000"
    assert [bits(r) for r in modules_legacy["attn"]] == ["00", "10", "00", "10", "10", "00"]
    # a warm-up of 2 steps (floor(0.4 * 6)) removes row 1 from every book
    _, warm = build_books(rho, taus, nonskip_rate=0.4)
    assert bits(warm["attn"][1]) == "00"
    with pytest.raises(ValueError, match="mode"):
        build_books(rho, taus, 0.0, mode="flux")


def test_provisional_books_default_to_the_full_procedure():
    rho = {"step": np.array([1.0, 0.9, 0.5, 1.2, 1.1, 1.0]), "attn": np.linspace(0.1, 1.2, 12).reshape(6, 2)}
    taus = {"step": 0.3, "attn": 0.4}
    for mode in ("full", "dit-legacy"):
        provisional = provisional_books(rho, taus, 0.0, provisional_mode=mode)
        expected = build_books(rho, taus, 0.0, mode=mode)
        np.testing.assert_array_equal(provisional[0], expected[0])
        np.testing.assert_array_equal(provisional[1]["attn"], expected[1]["attn"])
    default = provisional_books(rho, taus, 0.0)
    np.testing.assert_array_equal(default[1]["attn"], build_books(rho, taus, 0.0)[1]["attn"])


def _hand_made_step_rates(gate_bits: str, extra_low: tuple[int, ...] = ()) -> np.ndarray:
    """Low, distinct rates on the rows meant to be gated (and on `extra_low`), high ones elsewhere."""
    rho = np.array(
        [0.5 + 0.001 * j if bit == "1" or j in extra_low else 1.0 + 0.01 * j for j, bit in enumerate(gate_bits)]
    )
    rho[[0, -1]] = 1.0
    return rho


def test_reproduces_the_shipped_dit_fast_step_gate():
    shipped = "00111111111111110110001100110000011100001101111100"  # §4.6, tau_step 0.63, nonskip 0
    rho = {"step": _hand_made_step_rates(shipped), "attn": np.ones((50, 28)), "ff": np.ones((50, 28))}
    gate, modules = build_books(rho, {"step": 0.63, "attn": 0.22, "ff": 0.22}, nonskip_rate=0.0)
    assert bits(gate) == shipped
    assert len(gated_steps(gate)) == 30 and longest_run(gate) == 14
    assert reuse_share(gate, modules)["attn"] == {"grid": 30 / 50, "non_gated_rows": 0.0}


def test_reproduces_the_shipped_flux_fast_step_gate():
    shipped = "0010111111011101111111000000"  # §4.6, tau_step 0.70, nonskip 0.10
    # 26 interior rows, tau 0.7 -> the 18 lowest rates pass; warm-up (2 rows) removes row 1, leaving 17.
    rho = _hand_made_step_rates(shipped, extra_low=(1,))
    gate, _ = build_books({"step": rho}, {"step": 0.70}, nonskip_rate=0.10)
    assert threshold_books({"step": rho}, {"step": 0.70})["step"].sum() == 18
    assert bits(gate) == shipped
    assert len(gated_steps(gate)) == 17 and longest_run(gate) == 7


# --------------------------------------------------------------------------------------------------
# summaries


def test_summaries():
    gate = np.array([0, 1, 1, 0, 1, 0], dtype=bool)
    attn = np.zeros((6, 2), dtype=bool)
    attn[[1, 2, 4]] = True
    attn[3, 0] = True
    assert bits(gate) == "011010"
    assert gated_steps(gate) == [1, 2, 4]
    assert longest_run(gate) == 2
    assert longest_run(np.zeros(4, dtype=bool)) == 0
    assert reuse_share(gate, {"attn": attn}) == {"attn": {"grid": 7 / 12, "non_gated_rows": 1 / 12}}


def test_ideal_speedup_counts_module_evaluations():
    gate = np.array([0, 1, 0, 0], dtype=bool)
    attn = np.zeros((4, 2), dtype=bool)
    attn[2, 0] = True
    assert ideal_speedup(gate, {"attn": attn}) == 8 / 5  # 3 computed rows x 2 layers, minus one reused cell
    assert ideal_speedup(gate, {"attn": attn, "ff": np.zeros((4, 2), dtype=bool)}, costs={"ff": 2.0}) == 24 / 17
    assert ideal_speedup(gate, {}) == 4 / 3


def test_flux_joint_attention_needs_both_books():
    attn = np.array([[1, 1], [0, 1]], dtype=bool)
    context_attn = np.array([[1, 0], [0, 1]], dtype=bool)
    effective = effective_modules({"attn": attn, "context_attn": context_attn, "ff": attn})
    assert bits(effective["attn"]) == bits(effective["context_attn"]) == "1001"
    assert bits(effective["ff"]) == "1101"
    gate = np.zeros(2, dtype=bool)
    assert ideal_speedup(gate, {"attn": attn, "context_attn": context_attn}) == 8 / 4


def test_two_phase_calibration_end_to_end():
    """How the pieces compose: phase 1 -> provisional plan -> phase 2 on the same runs -> final books."""
    rng = np.random.default_rng(3)
    num_runs, num_steps, layers = 3, 12, 4
    # features[family][run]: (T, L, tokens); random walks with a per-step speed shared by all runs
    speed = rng.uniform(0.5, 2.0, size=(num_steps, 1, 1))
    features = {
        "step": [np.cumsum(speed * rng.normal(size=(num_steps, 1, 6)), axis=0) for _ in range(num_runs)],
        "attn": [np.cumsum(speed * rng.normal(size=(num_steps, layers, 6)), axis=0) for _ in range(num_runs)],
    }
    taus = {"step": 0.5, "attn": 0.3}

    def mean_rate_tables(masks=None):
        tables = {}
        for name, runs in features.items():
            per_run = []
            for z in runs:  # one (T, L) table per run, one stream per layer
                columns = [
                    rates(z[:, layer], None if masks is None else masks[name][:, layer]) for layer in range(z.shape[1])
                ]
                per_run.append(np.stack(columns, axis=1))
            tables[name] = mean_rates(per_run)
        tables["step"] = tables["step"][:, 0]
        return tables

    rho1 = mean_rate_tables()
    step_gate, modules = provisional_books(rho1, taus, nonskip_rate=0.0)
    rho2 = mean_rate_tables({"step": step_gate[:, None], "attn": modules["attn"]})
    final_gate, final_modules = build_books(rho2, taus, nonskip_rate=0.0)

    assert rho2["step"].shape == (num_steps,) and rho2["attn"].shape == (num_steps, layers)
    assert final_gate.shape == (num_steps,) and final_modules["attn"].shape == (num_steps, layers)
    # rho[j] spans steps j-1 -> j -> j+1; it changes only if step j or j+1 kept a frozen anchor, which
    # happens at the 2nd, 3rd ... rows of a provisional run (rows 7-10 in the §5 example)
    frozen = step_gate & np.r_[False, step_gate[:-1]]
    changed = np.r_[False, frozen[:-1]] | np.r_[False, False, frozen[:-2]]
    assert frozen.any() and (~changed[1:-1]).any()
    np.testing.assert_allclose(rho2["step"][~changed], rho1["step"][~changed], rtol=1e-12)
    assert (rho2["step"][changed] != rho1["step"][changed]).all()
    # the quantile keeps the budget: ~tau of the interior stays below the threshold in both phases
    interior = (num_steps - 2) * layers
    for rho in (rho1, rho2):
        below = threshold_books({"attn": rho["attn"]}, {"attn": 0.3})["attn"].sum()
        assert below == math.ceil(0.3 * (interior - 1))
