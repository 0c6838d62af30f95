"""benchmarks/gpu_check.py: the one-command GPU check, run here in --smoke (shrunken models, CPU), as CI does."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import gpu_check
from benchmarks.bench import DIT_XL_2_256, PAPER_STEP_GATES

DIT_ROWS = ["uncached", "InvarDiff paper fast", "InvarDiff paper slow", "InvarDiff forecast 3x",
            "TaylorSeer N=3 O=1 W=3", "FirstBlockCache 0.1", "MagCache 0.12 K=3"]  # fmt: skip
FLUX_ROWS = ["uncached", "InvarDiff paper fast", "InvarDiff forecast 3x"]
FINITE = ["ms_per_image", "images_per_s", "speedup", "counted_speedup", "efficiency", "tflop_per_batch",
          "achieved_tflops", "warmup_s"]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    gpu_check.main(["--smoke", "--out", str(out)])
    return out, json.loads((out / "gpu_check.json").read_text())


def test_smoke_writes_every_row_with_finite_numbers(smoke):
    out, result = smoke
    assert result["skipped"] == []
    got = [(r["model"], r["compiled"], r["method"]) for r in result["rows"]]
    dit, flux = "random-init:tiny-dit", "random-init:tiny-flux"
    expected = (
        [(dit, False, m) for m in DIT_ROWS]
        + [(flux, False, m) for m in FLUX_ROWS]
        + [(dit, True, m) for m in DIT_ROWS[:4]]
        + [(flux, True, m) for m in FLUX_ROWS]
    )
    assert got == expected
    for row in result["rows"]:
        for key in FINITE:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
        assert len(row["seconds"]) == gpu_check.SMOKE.repeats
    md = (out / "gpu_check.md").read_text()
    assert md.count("\n| random-init:") == len(expected)
    encoding = result["host"]["png_encoding"]
    assert [e["threads"] for e in encoding] == [1, 4]
    assert all(e["wall_ms_per_image"] > 0 and e["bytes_per_image"] > 0 for e in encoding)
    assert md.count("PNG encoding on the host") == 2


def test_smoke_counts_and_cache_bytes(smoke):
    _, result = smoke
    for row in result["rows"]:
        if row["kind"] == "uncached":
            assert row["counted_speedup"] == 1.0
        if row["kind"].startswith("invardiff"):
            assert row["counted_speedup"] > 1.0
            # the shapes-and-schedule figure is what the cache contexts really held
            assert row["cache_bytes_per_image_computed"] == row["cache_bytes_per_image_measured"] > 0
        if row["compiled"]:
            compile_record = row["compile"]
            assert compile_record["warmup_frames_compiled"] >= 1
            assert isinstance(compile_record["recompiles_timed"], int)
            assert isinstance(compile_record["fell_back_to_eager"], bool)
            if row["kind"].startswith("invardiff"):  # a static plan under compile_blocks: compiled once, in warm-up
                assert compile_record["regions"] == "invardiff.compile_blocks"
                assert compile_record["recompiles_timed"] == 0 and not compile_record["fell_back_to_eager"]
        else:
            assert "compile" not in row


def test_dit_xl_flops_match_the_dit_paper():
    per_eval = gpu_check.family_flops("dit", DIT_XL_2_256, gpu_check.dit_tokens(DIT_XL_2_256))
    multiply_adds = sum(per_eval.values()) * DIT_XL_2_256["num_layers"] / 2
    assert multiply_adds == pytest.approx(118.6e9, rel=0.01)


def test_published_gate_kept_at_its_length_and_resampled_otherwise():
    gate, note = gpu_check.published_gate("dit-fast", 50)
    assert "".join("1" if g else "0" for g in gate) == PAPER_STEP_GATES["dit-fast"]
    assert "resampled" not in note
    short, note = gpu_check.published_gate("flux-fast", 7)
    assert len(short) == 7 and "resampled from 28 to 7" in note
    assert np.array_equal(short, np.array([c == "1" for c in PAPER_STEP_GATES["flux-fast"]])[::4])


def test_a_spent_budget_skips_the_group_and_says_why():
    group = gpu_check.Group(
        "model", SimpleNamespace(architecture="dit", num_classes=10), 2, False,
        [gpu_check.Row("uncached", "uncached", None), gpu_check.Row("other", "invardiff-paper", None)],
    )  # fmt: skip
    rows, skipped = gpu_check.run_group(group, gpu_check.SMOKE, gpu_check.Budget(0.0), say=lambda _m: None)
    assert rows == []
    assert [s["method"] for s in skipped] == ["uncached", "other"]
    assert "time budget" in skipped[0]["reason"] and "reference was not run" in skipped[1]["reason"]


def test_cache_bytes_of_the_published_plans_at_full_size_from_shapes_alone(smoke):
    _, result = smoke
    figures = {(f["model"], f["plan"]): f["cache_bytes_per_image"]
               for f in gpu_check.published_plan_cache_bytes(gpu_check.CheckConfig())}  # fmt: skip
    d, tokens = 16 * 72, 256  # DiT-XL/2 width; 32x32 latent in 2x2 patches
    # DiT books compute every module on non-gated steps: only H is held, for the CFG pair, in bf16
    assert figures[("DiT-XL-2-256", "InvarDiff paper dit-fast")] == 2 * tokens * d * 2
    assert figures[("DiT-XL-2-256", "InvarDiff paper dit-slow")] == 2 * tokens * d * 2
    # FLUX fast: rows 23-26 reuse every module, so every site's output is held (no H then: step 23 computes);
    # per dual block the joint attention (image + text), ff (image), ff_context (text); per single block the
    # attention (image + text) and proj_mlp (4x wide)
    image, text, d = (1024 // 16) ** 2, 512, 24 * 128
    sites = 19 * ((image + text) + image + text) + 38 * ((image + text) + 4 * (image + text))
    assert figures[("FLUX.1-dev-shaped", "InvarDiff paper flux-fast")] == sites * d * 2
    assert sum("cache bytes per image from shapes" in note for note in result["notes"]) == 3
