"""Plan store (versioning, atomic `latest`), drift math and the refresh gate, and the CLI's handling of bad input.
No Ray and no model here: plans are built from synthetic rates, so these tests take seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from invardiff.plan import PipelineSignature, Plan, PlanError
from jobs import drift
from jobs.calibrate import EXIT_NOT_PROMOTED, publish
from jobs.plan_store import PlanStore, StoreError, store_key

T, L = 10, 3


def signature(steps: int = T, fingerprint: str = "sha256:" + "ab" * 32) -> PipelineSignature:
    return PipelineSignature(
        architecture="dit", model_id="synthetic", model_fingerprint=fingerprint, scheduler="DDIMScheduler",
        num_inference_steps=steps, height=16, width=16, guidance_mode="cfg-batched", guidance_scale=1.5,
        dtype="float32", layers={"attn": L, "ff": L},
    )


def make_plan(seed: int, created: str = "2026-11-25T02:00:00Z", taus=None, sig=None) -> Plan:
    rng = np.random.default_rng(seed)
    sig = sig or signature()
    steps = sig.num_inference_steps
    rho = {"step": 1.0 + 0.3 * rng.standard_normal(steps), **{f: 1.0 + 0.3 * rng.standard_normal((steps, L)) for f in ("attn", "ff")}}
    return Plan.from_rates(
        sig, rho, taus=taus or {"step": 0.5, "attn": 0.3, "ff": 0.3}, nonskip_rate=0.1, rho_phase1=rho,
        calibration={"runs": 4}, created_at=created,
    )


# --------------------------------------------------------------------------------------------------
# Drift math


def test_jaccard():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert drift.jaccard(a, b) == pytest.approx(1 / 3)
    assert drift.jaccard(a, a) == 1.0
    assert drift.jaccard(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert drift.jaccard(a, ~a) == 0.0
    with pytest.raises(ValueError):
        drift.jaccard(a, np.zeros(3, bool))


def test_family_jaccard_uses_effective_flux_attention():
    gate = np.zeros(2, bool)
    old = {"attn": np.array([[1], [1]], bool), "context_attn": np.array([[1], [0]], bool)}
    new = {"attn": np.array([[1], [1]], bool), "context_attn": np.array([[1], [1]], bool)}
    j = drift.family_jaccard(gate, old, gate, new)
    # the runtime skips joint attention only where both books agree: old effective [1,0], new [1,1]
    assert j["attn"] == j["context_attn"] == 0.5 and j["step"] == 1.0


def test_gate_changes_and_rho_drift():
    old = np.array([0, 1, 1, 0, 0], bool)
    new = np.array([0, 1, 0, 1, 0], bool)
    assert drift.gate_changes(old, new) == ([3], [2])
    a = {"step": np.array([1.0, 2.0, 3.0, 1.0]), "ff": np.array([[1.0], [1.0], [np.nan], [1.0]])}
    b = {"step": np.array([9.0, 2.5, 2.0, 9.0]), "ff": np.array([[5.0], [1.5], [2.0], [5.0]])}
    d = drift.rho_drift(a, b)
    assert d["step"] == {"mean_abs": pytest.approx(0.75), "max_abs": pytest.approx(1.0)}  # rows 0 and T-1 ignored
    assert d["ff"] == {"mean_abs": pytest.approx(0.5), "max_abs": pytest.approx(0.5)}  # NaN ignored


def test_speedup_change():
    assert drift.speedup_change(2.0, 2.5) == pytest.approx(0.25)
    assert drift.speedup_change(2.0, 2.0) == 0.0
    assert math.isinf(drift.speedup_change(math.inf, 2.0))


def test_compare_identical_and_different_plans():
    a, b = make_plan(1), make_plan(2)
    same = drift.compare_plans(a, make_plan(1, created="2026-11-26T02:00:00Z"))
    assert same.min_jaccard == 1.0 and same.gates_added == same.gates_removed == []
    assert all(v["max_abs"] == 0.0 for v in same.rho.values()) and same.speedup_change == 0.0
    moved = drift.compare_plans(a, b)
    assert moved.min_jaccard < 1.0 and moved.rho["step"]["mean_abs"] > 0
    assert drift.DriftGate(min_jaccard=0.0, max_speedup_change=10).reasons(moved) == []
    reasons = drift.DriftGate(min_jaccard=1.0).reasons(moved)
    assert reasons and "Jaccard" in reasons[0]
    with pytest.raises(ValueError):  # plans for different pipelines are not comparable
        drift.compare_plans(a, make_plan(1, sig=signature(steps=12)))


# --------------------------------------------------------------------------------------------------
# Store


def test_write_promote_and_resolve(tmp_path):
    store = PlanStore(str(tmp_path / "store"))
    plan = make_plan(1)
    outcome = publish(store, plan)
    key = store_key(plan.signature)
    assert outcome.status == "first" and outcome.key == key
    assert store.latest(key) == plan
    assert store.latest_for(signature()) == plan
    assert store.keys() == [key]
    pointer = json.loads((tmp_path / "store" / key / "latest.json").read_text())
    assert pointer["checksum"] == plan.checksum and pointer["version"].endswith(plan.plan_id)
    # model_id is informative only: it does not change the key
    assert store_key(PipelineSignature(**{**signature().to_dict(), "model_id": "other"})) == key
    assert store_key(signature(steps=12)) != key


def test_missing_latest_names_the_key(tmp_path):
    store = PlanStore(str(tmp_path))
    publish(store, make_plan(1))
    other = signature(steps=12)
    with pytest.raises(StoreError, match=store_key(other)):
        store.latest_for(other)


def test_failed_write_leaves_latest_and_no_half_plan(tmp_path, monkeypatch):
    store = PlanStore(str(tmp_path))
    first = make_plan(1)
    publish(store, first)
    key = store_key(first.signature)
    before = sorted(p.name for p in (tmp_path / key / "plans").iterdir())

    # the new plan's bytes get truncated on the way to the disk: read-back validation must catch it
    real_put = PlanStore._put

    def truncating_put(self, path, data):
        real_put(self, path, data[: len(data) // 2] if "/plans/" in path else data)

    monkeypatch.setattr(PlanStore, "_put", truncating_put)
    with pytest.raises(PlanError):
        publish(store, make_plan(2, created="2026-11-26T02:00:00Z"))
    monkeypatch.undo()
    assert store.latest(key) == first
    assert sorted(p.name for p in (tmp_path / key / "plans").iterdir()) == before  # the half plan was removed

    # a crash between the validated write and the pointer move: latest still names the old plan
    monkeypatch.setattr(PlanStore, "promote", lambda self, version, **_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        publish(store, make_plan(3, created="2026-11-27T02:00:00Z"))
    monkeypatch.undo()
    assert store.latest(key) == first
    assert not list(tmp_path.rglob("*.tmp"))


def test_pointer_checksum_mismatch_is_refused(tmp_path):
    store = PlanStore(str(tmp_path))
    plan = make_plan(1)
    publish(store, plan)
    key = store_key(plan.signature)
    pointer_file = tmp_path / key / "latest.json"
    doc = json.loads(pointer_file.read_text())
    pointer_file.write_text(json.dumps({**doc, "checksum": "sha256:" + "0" * 64}))
    with pytest.raises(StoreError, match="refusing"):
        store.latest(key)
    pointer_file.write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        store.latest(key)


def test_refresh_gate_promotes_or_keeps_old(tmp_path):
    store = PlanStore(str(tmp_path))
    old = make_plan(1)
    publish(store, old)
    key = store_key(old.signature)
    strict = drift.DriftGate(min_jaccard=1.0)
    rejected = publish(store, make_plan(2, created="2026-11-26T02:00:00Z"), gate=strict)
    assert rejected.status == "rejected" and rejected.reasons
    assert store.latest(key) == old
    report = (tmp_path / key / "reports" / f"{rejected.version}-drift.md").read_text()
    assert "NOT promoted" in report and "Jaccard" in report
    png = (tmp_path / key / "reports" / f"{rejected.version}-drift.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    new = make_plan(1, created="2026-11-27T02:00:00Z")  # same statistics: no drift
    promoted = publish(store, new, gate=strict)
    assert promoted.status == "promoted" and store.latest(key) == new
    assert len(store.versions(key)) == 3  # the rejected version stays, for a human to look at


def test_unknown_store_uri():
    with pytest.raises(StoreError, match="nope://"):
        PlanStore("nope://bucket/plans")


# --------------------------------------------------------------------------------------------------
# CLI


class Result:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `invardiff ARGS` in this process through main(), which maps known errors to exit code 2."""
    from jobs import cli as cli_module

    def run(*args, env=None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr("sys.argv", ["invardiff", *args])
        code = 0
        try:
            cli_module.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def test_cli_list_and_bad_input(tmp_path, cli):
    store_dir = tmp_path / "store"
    plan = make_plan(1)
    publish(PlanStore(str(store_dir)), plan)
    listed = cli("plan", "list", "--store", str(store_dir))
    assert listed.returncode == 0, listed.stderr
    assert store_key(plan.signature) in listed.stdout and "latest" in listed.stdout

    bad = cli("plan", "list", "--store", "nope://x")
    assert bad.returncode == 2 and "nope://" in bad.stderr and "Traceback" not in bad.stderr

    missing = cli("plan", "list", "--store", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    workers = cli("calibrate", "--workers", "0", "--store", str(tmp_path / "s2"))
    assert workers.returncode == 2 and "at least 1" in workers.stderr
    assert not (tmp_path / "s2").exists()

    refresh = cli("calibrate", "--refresh", "--out", str(tmp_path / "p.json"))
    assert refresh.returncode == 2 and "--store" in refresh.stderr

    latest = cli("generate", "--classes", "0-1", "--plan", "latest", "--out", str(tmp_path / "o"),
                           "--model", "tiny-dit", "--steps", "4", env={"INVARDIFF_PLAN_STORE": ""})
    assert latest.returncode == 2 and "--store" in latest.stderr and not (tmp_path / "o").exists()

    # a store without a plan for this pipeline: refused before Ray starts, naming the key
    nokey = cli("generate", "--classes", "0-1", "--plan", "latest", "--store", str(store_dir),
                          "--out", str(tmp_path / "o"), "--model", "tiny-dit", "--steps", "4")
    assert nokey.returncode == 2 and "no latest plan for key dit-" in nokey.stderr
    assert not (tmp_path / "o").exists()

    # the key exists for tiny-dit, but the plan file under latest is corrupt: refused, exit 2, nothing written
    from jobs.plan_store import signature_for
    from pipelines.build import GeneratorConfig

    tiny = signature_for(GeneratorConfig(model="tiny-dit", num_inference_steps=4))
    tiny_plan = make_plan(5, sig=tiny)
    publish(PlanStore(str(store_dir)), tiny_plan)
    (store_dir / store_key(tiny) / "plans" / f"20261125T020000Z-{tiny_plan.plan_id}.json").write_text("{}")
    corrupt = cli("generate", "--classes", "0-1", "--plan", "latest", "--store", str(store_dir),
                  "--out", str(tmp_path / "o"), "--model", "tiny-dit", "--steps", "4")
    assert corrupt.returncode == 2 and "format" in corrupt.stderr and not (tmp_path / "o").exists()
    listed = cli("plan", "list", "--store", str(store_dir))  # listing reads pointers, not plans
    assert listed.returncode == 0 and store_key(tiny) in listed.stdout


def test_refresh_not_promoted_exits_3(tmp_path, cli, monkeypatch):
    """The CLI turns a drift rejection into exit code 3 and says why (the job itself is replaced by a stub)."""
    import jobs.calibrate as job_module
    from jobs.calibrate import JobStats

    old = make_plan(1)
    store = PlanStore(str(tmp_path))
    publish(store, old)
    rejected = publish(store, make_plan(2, created="2026-11-26T02:00:00Z"), gate=drift.DriftGate(min_jaccard=1.0))

    def fake_job(config, make_bundle, **kwargs):
        assert kwargs["refresh"] and kwargs["gate"].min_jaccard == 0.95 and kwargs["workers"] == 2
        return None, rejected, JobStats()

    monkeypatch.setattr(job_module, "run_calibrate_job", fake_job)
    result = cli("calibrate", "--workers", "2", "--store", str(tmp_path), "--refresh", "--min-jaccard", "0.95",
                 "--model", "tiny-dit")
    assert EXIT_NOT_PROMOTED == 3 and result.returncode == EXIT_NOT_PROMOTED
    assert "NOT promoted" in result.stdout and "Jaccard" in result.stdout
    assert store.latest(store_key(old.signature)) == old


def forecast_plan(computed: int, created: str, target: str = "residual") -> Plan:
    from invardiff.forecast import uniform_schedule

    return Plan.from_forecast(signature(), uniform_schedule(T, computed), target=target, calibration={"runs": 4},
                              created_at=created)  # fmt: skip


def test_store_versions_forecast_plans_and_gates_their_refresh(tmp_path):
    store = PlanStore(str(tmp_path))
    paper = make_plan(1)
    publish(store, paper)
    key = store_key(paper.signature)
    first = forecast_plan(5, "2026-11-26T02:00:00Z")
    assert publish(store, first).status == "promoted"  # paper -> forecast: a refresh like any other
    assert store.latest(key) == first and store.latest(key).mode == "forecast"
    # a schedule that moved far is stored, reported, and not promoted under a strict gate
    moved = forecast_plan(3, "2026-11-27T02:00:00Z")
    rejected = publish(store, moved, gate=drift.DriftGate(min_jaccard=0.9))
    assert rejected.status == "rejected" and store.latest(key) == first
    report = (tmp_path / key / "reports" / f"{rejected.version}-drift.md").read_text()
    assert "NOT promoted" in report
    assert len(store.versions(key)) == 3
