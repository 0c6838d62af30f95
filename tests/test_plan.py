"""The plan object: JSON format invardiff-plan/1, validation, storage, compatibility, presets and reports."""

import dataclasses
import hashlib
import json
import os
import pickle

import fsspec
import numpy as np
import pytest

import invardiff.plan as plan_module
from invardiff.calibration import build_books
from invardiff.plan import PipelineSignature, Plan, PlanError, PlanMismatchError
from invardiff.plan_report import format_plan, write_heatmaps
from invardiff.presets import PRESETS, get_preset, preset_names

T = 8
CREATED_AT = "2026-01-31T12:00:00Z"


def make_signature(**changes) -> PipelineSignature:
    fields = dict(
        architecture="dit",
        model_id="digits-dit",
        model_fingerprint="sha256:" + "ab" * 32,
        scheduler="DDIMScheduler",
        num_inference_steps=T,
        height=32,
        width=32,
        guidance_mode="cfg-batched",
        guidance_scale=4.0,
        dtype="float32",
        layers={"attn": 3, "ff": 3},
    )
    return PipelineSignature(**{**fields, **changes})


def make_rates(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rho = {"step": rng.uniform(0.8, 1.4, T), "attn": rng.uniform(0.8, 1.4, (T, 3)), "ff": rng.uniform(0.8, 1.4, (T, 3))}
    for values in rho.values():
        values[[0, -1]] = 1.0
    # values that stress an exact round trip: NaN (absent module), infinities, -0.0, a non-representable sum
    rho["attn"][2, 1] = np.nan
    rho["ff"][3, 0] = np.inf
    rho["ff"][4, 2] = -np.inf
    rho["ff"][5, 1] = -0.0
    rho["step"][3] = 0.1 + 0.2
    return rho


@pytest.fixture
def plan() -> Plan:
    taus = {"step": 0.4, "attn": 0.3, "ff": 0.3}
    return Plan.from_rates(
        make_signature(),
        make_rates(2),
        taus=taus,
        nonskip_rate=0.0,
        rho_phase1=make_rates(1),
        calibration={
            "inputs": [3, 1, 4],
            "seeds": [0, 1, 2],
            "runs": 3,
            "phases": 2,
            "provisional_mode": "full",
            "preset": "fast",
        },
        created_at=CREATED_AT,
    )


def assert_same_plan(a: Plan, b: Plan) -> None:
    assert a == b and a.checksum == b.checksum and a.plan_id == b.plan_id
    assert a.signature == b.signature and a.taus == b.taus and a.nonskip_rate == b.nonskip_rate
    assert a.calibration == b.calibration and a.created_at == b.created_at
    np.testing.assert_array_equal(a.step_gate, b.step_gate)
    assert a.modules.keys() == b.modules.keys()
    for family in a.modules:
        np.testing.assert_array_equal(a.modules[family], b.modules[family])
    for phase in ("rho_phase1", "rho_phase2"):
        if getattr(a, phase) is None:
            assert getattr(b, phase) is None
            continue
        for name, values in getattr(a, phase).items():
            # bit-for-bit: NaN payload aside, every double (including -0.0 and inf) must come back identical
            other = getattr(b, phase)[name]
            assert other.dtype == np.float64 and other.shape == values.shape
            np.testing.assert_array_equal(np.isnan(other), np.isnan(values))
            finite = ~np.isnan(values)
            assert values[finite].tobytes() == other[finite].tobytes()


# --------------------------------------------------------------------------------------------------
# format


def test_json_round_trip_is_exact(plan):
    text = plan.to_json()
    loaded = Plan.from_json(text)
    assert_same_plan(plan, loaded)
    assert loaded.to_json() == text
    doc = json.loads(text)
    assert doc["format"] == "invardiff-plan/1"
    assert doc["step_gate"] == "".join("1" if b else "0" for b in plan.step_gate)
    assert doc["modules"]["attn"][0] == "000" and len(doc["modules"]["attn"]) == T
    assert doc["rho_phase1"]["attn"][2][1] is None
    assert doc["rho_phase2"]["ff"][3][0] == "inf" and doc["rho_phase2"]["ff"][4][2] == "-inf"
    # the checksum is reproducible from the document alone, as the schema describes it
    content = {key: value for key, value in doc.items() if key not in ("checksum", "plan_id")}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert doc["checksum"] == "sha256:" + hashlib.sha256(canonical).hexdigest()
    assert doc["plan_id"] == doc["checksum"][len("sha256:") :][:12]


def test_local_save_and_load(plan, tmp_path):
    path = tmp_path / "nested" / "plan.json"
    plan.save(path)
    assert_same_plan(plan, Plan.load(path))
    assert_same_plan(plan, Plan.load(str(path)))
    assert os.listdir(path.parent) == ["plan.json"]  # no temporary file left behind
    assert '"step_gate": "' in path.read_text()


def test_fsspec_round_trip_through_memory(plan):
    uri = "memory://invardiff-tests/plans/plan.json"
    try:
        plan.save(uri)
        assert_same_plan(plan, Plan.load(uri))
    finally:
        fsspec.filesystem("memory").rm("/invardiff-tests", recursive=True)


def test_storage_options_reach_fsspec(plan, monkeypatch):
    seen = []
    real = fsspec.core.url_to_fs

    def spy(url, **options):
        seen.append(options)
        return real(url)

    monkeypatch.setattr(plan_module.fsspec.core, "url_to_fs", spy)
    uri = "memory://invardiff-tests/options.json"
    try:
        plan.save(uri, storage_options={"anon": True})
        Plan.load(uri, storage_options={"anon": True})
    finally:
        fsspec.filesystem("memory").rm("/invardiff-tests", recursive=True)
    assert seen == [{"anon": True}, {"anon": True}]


def test_checksum_detects_tampering(plan):
    doc = plan.to_dict()
    doc["step_gate"] = doc["step_gate"][:4] + ("0" if doc["step_gate"][4] == "1" else "1") + doc["step_gate"][5:]
    with pytest.raises(PlanError, match="checksum.*modified after it was written"):
        Plan.from_dict(doc)
    doc = plan.to_dict()
    doc["rho_phase2"]["attn"][3][0] *= 1.0000001
    with pytest.raises(PlanError, match="checksum"):
        Plan.from_dict(doc)
    doc = plan.to_dict()
    doc["plan_id"] = "0" * 12
    with pytest.raises(PlanError, match="plan_id"):
        Plan.from_dict(doc)


def test_schema_violations_name_the_field(plan):
    doc = plan.to_dict()
    doc["signature"]["dtype"] = "float64"
    with pytest.raises(
        PlanError, match=r"schema: signature\.dtype: 'float64' is not one of \['float32', 'bfloat16', 'float16'\]"
    ):
        Plan.from_dict(doc, source="plans/x.json")
    doc = plan.to_dict()
    del doc["taus"]
    with pytest.raises(PlanError, match="'taus' is a required property"):
        Plan.from_dict(doc)
    doc = plan.to_dict()
    doc["modules"]["ff"][2] = "01x"
    with pytest.raises(PlanError, match=r"modules\.ff\[2\]: '01x' does not match"):
        Plan.from_dict(doc)


def test_inconsistent_shapes_are_refused(plan):
    doc = plan.to_dict()
    doc["signature"]["num_inference_steps"] = 9
    with pytest.raises(PlanError, match=r"step_gate: expected shape \(9,\).*got \(8,\)"):
        Plan.from_dict(doc)
    doc = plan.to_dict()
    doc["signature"]["layers"]["attn"] = 4
    with pytest.raises(PlanError, match=r"modules\.attn: expected shape \(8, 4\).*got \(8, 3\)"):
        Plan.from_dict(doc)
    doc = plan.to_dict()
    doc["modules"]["attn"][5] = "0000"
    with pytest.raises(PlanError, match=r"modules\.attn: every step needs the same number of layer bits"):
        Plan.from_dict(doc)
    doc = plan.to_dict()
    doc["rho_phase1"]["step"] = doc["rho_phase1"]["step"][:-1]
    with pytest.raises(PlanError, match=r"rho_phase1\.step: expected shape \(8,\)"):
        Plan.from_dict(doc)


def test_malformed_documents(plan):
    with pytest.raises(PlanError, match="not a valid JSON document"):
        Plan.from_json("{", source="broken.json")
    with pytest.raises(PlanError, match="NaN"):
        Plan.from_json(plan.to_json().replace("null", "NaN", 1))
    with pytest.raises(PlanError, match="paper-era"):
        Plan.from_dict({"step_cache_book": [False] * T})


def test_save_failing_during_serialisation_leaves_no_file(plan, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("serialiser exploded")

    monkeypatch.setattr(plan_module, "_readable_json", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        plan.save(tmp_path / "plan.json")
    assert os.listdir(tmp_path) == []


def test_save_failing_while_writing_keeps_the_previous_file(plan, tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    target.write_text("previous plan")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(plan_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        plan.save(target)
    assert target.read_text() == "previous plan"
    assert os.listdir(tmp_path) == ["plan.json"]


# --------------------------------------------------------------------------------------------------
# compatibility


def test_mismatch_lists_every_field(plan):
    other = make_signature(
        model_id="another name",  # informative only: never a mismatch
        model_fingerprint="sha256:" + "cd" * 32,
        scheduler="EulerDiscreteScheduler",
        num_inference_steps=28,
        height=64,
        width=48,
        guidance_mode="none",
        guidance_scale=1.0,
        dtype="bfloat16",
        layers={"attn": 3, "ff": 4},
        architecture="flux",
    )
    with pytest.raises(PlanMismatchError) as raised:
        plan.check_compatible(other)
    message = str(raised.value)
    expected = ["architecture", "model_fingerprint", "scheduler", "num_inference_steps", "height", "width",
                "guidance_mode", "guidance_scale", "dtype", "layers"]  # fmt: skip
    assert [name for name, _, _ in raised.value.mismatches] == expected
    for name in expected:
        assert f"{name}: plan has" in message
    assert "num_inference_steps: plan has 8, pipeline has 28" in message
    assert "model_id" not in message
    assert pickle.loads(pickle.dumps(raised.value)).mismatches == raised.value.mismatches
    plan.check_compatible(make_signature(model_id="renamed"))


def test_signature_validates_and_hashes():
    assert hash(make_signature()) == hash(make_signature())
    assert make_signature(num_inference_steps=8.0).num_inference_steps == 8
    with pytest.raises(ValueError, match=r"signature\.dtype: expected one of"):
        make_signature(dtype="float64")
    with pytest.raises(ValueError, match="model_fingerprint"):
        make_signature(model_fingerprint="abc")
    with pytest.raises(ValueError, match="reserved"):
        make_signature(layers={"step": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_signature().height = 1


# --------------------------------------------------------------------------------------------------
# constructors and summary


def test_all_compute_reuses_nothing():
    plan = Plan.all_compute(make_signature())
    assert not plan.step_gate.any() and not any(book.any() for book in plan.modules.values())
    assert plan.taus == {"step": 0.0, "attn": 0.0, "ff": 0.0}
    summary = plan.summary()
    assert summary["ideal_speedup"] == 1.0 and summary["gated_steps"] == 0 and summary["step_gate"] == "0" * T
    assert_same_plan(plan, Plan.from_json(plan.to_json()))  # rates absent: stored as null


def test_from_books_copies_and_freezes_arrays():
    step_gate = np.array([0, 0, 1, 1, 0, 1, 0, 0], dtype=bool)
    modules = {"attn": np.zeros((T, 3), dtype=bool), "ff": np.zeros((T, 3), dtype=bool)}
    plan = Plan.from_books(
        make_signature(), (step_gate, modules), taus={"step": 0.5, "attn": 0.0, "ff": 0.0}, nonskip_rate=0.1
    )
    step_gate[0] = True
    assert not plan.step_gate[0]  # the caller's array is not shared
    with pytest.raises(ValueError, match="read-only"):
        plan.step_gate[0] = True
    shipped = pickle.loads(pickle.dumps(plan))  # as Ray moves it between processes
    assert shipped == plan and not shipped.modules["attn"].flags.writeable
    summary = plan.summary()
    assert summary["step_gate"] == "00110100" and summary["gated_steps"] == 3 and summary["longest_gated_run"] == 2
    assert summary["reuse_share"]["attn"] == {"grid": 0.0, "non_gated_rows": 0.0}
    assert summary["ideal_speedup"] == pytest.approx(8 / 5)
    with pytest.raises(PlanError, match=r"taus: expected keys \['step', 'attn', 'ff'\]"):
        Plan.from_books(make_signature(), (step_gate, modules), taus={"step": 0.5}, nonskip_rate=0.1)


def test_from_rates_thresholds_the_corrected_rates(plan):
    rho2 = plan.rho_phase2
    step_gate, modules = build_books(rho2, plan.taus, plan.nonskip_rate)
    np.testing.assert_array_equal(plan.step_gate, step_gate)
    np.testing.assert_array_equal(plan.modules["ff"], modules["ff"])


# --------------------------------------------------------------------------------------------------
# presets and report


def test_presets():
    # The paper points are kept verbatim; quality/balanced/fast/turbo are forecast targets (BENCHMARKS.md).
    assert get_preset("dit", "paper-dit-fast") == {"nonskip_rate": 0.0, "taus": {"step": 0.63, "attn": 0.22, "ff": 0.22}}
    assert get_preset("dit", "paper-dit-slow")["taus"] == {"step": 0.61, "attn": 0.20, "ff": 0.20}
    flux_fast = get_preset("flux", "paper-flux-fast")
    assert flux_fast["nonskip_rate"] == 0.10 and flux_fast["taus"]["context_attn"] == flux_fast["taus"]["attn"] == 0.68
    assert get_preset("flux", "paper-flux-slow")["taus"]["single_mlp"] == 0.62
    for architecture in ("dit", "flux"):
        assert {"fast", "balanced", "quality"} <= set(preset_names(architecture))
        families = {frozenset(p["taus"]) for p in PRESETS[architecture].values()}
        assert len(families) == 1  # every preset of an architecture covers the same families
    get_preset("dit", "paper-dit-fast")["taus"]["step"] = 0.0
    assert PRESETS["dit"]["paper-dit-fast"]["taus"]["step"] == 0.63  # callers get copies
    assert [get_preset("dit", n)["target_speedup"] for n in ("quality", "balanced", "fast", "turbo")] == [2, 2.5, 3, 4]
    with pytest.raises(ValueError, match="valid names: quality, balanced, fast, turbo, paper-dit-fast, paper-dit-slow"):
        get_preset("dit", "warp")


def test_report_text_and_heatmaps(plan, tmp_path):
    text = format_plan(plan, show_modules=True)
    assert plan.plan_id in text and "".join("1" if b else "0" for b in plan.step_gate) in text
    assert "modules.ff" in text and "rho_phase1, rho_phase2" in text
    paths = write_heatmaps(plan, tmp_path / "figures", dpi=40)
    assert [p.name for p in paths] == ["rho_phase1.png", "rho_phase2.png", "plan.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
