"""Concurrent refreshes of one plan store key: the pointer moves by compare-and-swap, on a local disk (flock +
rename, threads and processes) and on S3 (conditional PUTs against the moto server), so no two promotions
replace the same plan, the loser is told in one line, and every version file stays intact."""

from __future__ import annotations

import json
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from invardiff.plan import PipelineSignature, Plan
from jobs.calibrate import publish
from jobs.plan_store import PlanStore, PromotionConflict, store_key

WRITERS = 6
SIGNATURE = PipelineSignature(
    architecture="dit", model_id="synthetic", model_fingerprint="sha256:" + "cd" * 32, scheduler="DDIMScheduler",
    num_inference_steps=8, height=16, width=16, guidance_mode="cfg-batched", guidance_scale=1.5, dtype="float32",
    layers={"attn": 2, "ff": 2},
)
KEY = store_key(SIGNATURE)


def make_plan(seed: int) -> Plan:
    rng = np.random.default_rng(seed)
    rho = {"step": 1.0 + 0.3 * rng.standard_normal(8), **{f: 1.0 + 0.3 * rng.standard_normal((8, 2)) for f in ("attn", "ff")}}
    return Plan.from_rates(
        SIGNATURE, rho, taus={"step": 0.5, "attn": 0.3, "ff": 0.3}, nonskip_rate=0.1, rho_phase1=rho,
        calibration={"runs": 2}, created_at=f"2026-12-03T10:{seed // 60:02d}:{seed % 60:02d}Z",
    )


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_credentials")
    monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_endpoint"))
    bucket = f"plans-{request.node.name.split('[')[0][-20:].replace('_', '-')}-{tmp_path.name[-6:]}".lower()
    store = PlanStore(f"s3://{bucket}/store")
    store.fs.mkdir(bucket)
    return f"s3://{bucket}/store"


def assert_store_intact(store: PlanStore, plans: list[Plan]) -> Plan:
    """Every version written is there and loads with its checksum; latest is a valid pointer to one of them."""
    versions = store.versions(KEY)
    assert sorted(v.plan_id for v in versions) == sorted(p.plan_id for p in plans)
    by_id = {p.plan_id: p for p in plans}
    for version in versions:
        assert store.load(version).checksum == by_id[version.plan_id].checksum
    latest = store.latest(KEY)  # verifies the pointer's checksum against the file it names
    assert latest is not None and latest.plan_id in by_id
    return latest


def test_racing_promotions_over_one_latest_have_one_winner_and_one_line_for_each_loser(store_uri):
    store = PlanStore(store_uri)
    base = make_plan(0)
    assert publish(store, base).status == "first"
    plans = [make_plan(seed) for seed in range(1, WRITERS + 1)]
    versions = [store.write(plan) for plan in plans]
    start = threading.Barrier(WRITERS)

    def promote(version):
        start.wait()
        try:
            return PlanStore(store_uri).promote(version, replacing=base)
        except PromotionConflict as e:
            return e

    with ThreadPoolExecutor(WRITERS) as pool:
        results = list(pool.map(promote, versions))
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, Exception)]
    assert len(winners) == 1, results
    for error in losers:
        message = str(error)
        assert "\n" not in message and f"moved from plan {base.plan_id} to {winners[0].version}" in message
        assert "not promoted" in message
    assert assert_store_intact(store, [base, *plans]).plan_id == winners[0].plan_id


def test_first_promotions_of_a_new_key_race_to_one_winner(store_uri):
    store = PlanStore(store_uri)
    plans = [make_plan(seed) for seed in range(10, 10 + WRITERS)]
    start = threading.Barrier(WRITERS)

    def first_publish(plan):
        start.wait()
        return publish(PlanStore(store_uri), plan)

    with ThreadPoolExecutor(WRITERS) as pool:
        outcomes = list(pool.map(first_publish, plans))
    assert sorted(o.status for o in outcomes) == ["first"] + ["rejected"] * (WRITERS - 1)
    winner = next(o for o in outcomes if o.status == "first")
    assert all("moved from no plan to" in o.reasons[0] for o in outcomes if o.status == "rejected")
    assert assert_store_intact(store, plans).plan_id == winner.plan_id


def refresh_until_promoted(store_uri: str, seed: int) -> tuple[str, str]:
    """A refresh that, when it loses, compares again with the new latest and retries: (replaced, promoted)."""
    store = PlanStore(store_uri)
    version = store.write(make_plan(seed))
    while True:
        previous = store.latest(KEY)
        try:
            store.promote(version, replacing=previous)
            return previous.plan_id, version.plan_id
        except PromotionConflict:
            continue


def check_promotions_form_one_chain(store_uri: str, base: Plan, promotions: list[tuple[str, str]]) -> None:
    """Each successful swap replaced a different plan: following them from the base visits every writer once.
    Two swaps that replaced the same plan (a lost update) would break the chain."""
    successor = dict(promotions)
    assert len(successor) == WRITERS, f"two promotions replaced the same plan: {promotions}"
    chain, current = [], base.plan_id
    while current in successor:
        current = successor[current]
        chain.append(current)
    assert sorted(chain) == sorted(promoted for _, promoted in promotions)
    store = PlanStore(store_uri)
    assert store.pointer(KEY).plan_id == chain[-1]
    pointer = json.loads(store.fs.cat_file(store._path(KEY, "latest.json")))
    assert pointer["plan_id"] == chain[-1] and pointer["path"].endswith(f"{chain[-1]}.json")


def test_refreshes_that_retry_after_losing_all_promote_in_one_chain(store_uri):
    store = PlanStore(store_uri)
    base = make_plan(0)
    publish(store, base)
    with ThreadPoolExecutor(WRITERS) as pool:
        promotions = list(pool.map(lambda seed: refresh_until_promoted(store_uri, seed), range(20, 20 + WRITERS)))
    check_promotions_form_one_chain(store_uri, base, promotions)
    assert_store_intact(store, [base, *(make_plan(seed) for seed in range(20, 20 + WRITERS))])
    if "://" not in store_uri:
        assert not [p for p in store.fs.find(store.root) if p.endswith(".tmp")]


def test_refreshes_in_separate_processes_on_a_local_disk(tmp_path):
    # The local swap's lock is an flock, held per open file: separate processes, not only threads, must serialise.
    store_uri = str(tmp_path / "store")
    base = make_plan(0)
    publish(PlanStore(store_uri), base)
    with multiprocessing.get_context("fork").Pool(WRITERS) as pool:
        promotions = pool.starmap(refresh_until_promoted, [(store_uri, seed) for seed in range(40, 40 + WRITERS)])
    check_promotions_form_one_chain(store_uri, base, promotions)
