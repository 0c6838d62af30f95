"""Distributed two-phase calibration on Ray, and publishing the result to a plan store.

    driver                                     CalibrationWorker actors (model loaded once each)
    chunks of --batch-size runs  ----------->  record_rates(chunk)            phase 1: uncached runs
    pool per-run rho by chunk index <-------   per-run rho arrays (small)
    provisional books (phase-1 plan) ------->  record_rates(chunk, books)     phase 2: corrected bookkeeping
    pool, build final plan <----------------
    plan store: write, read back, validate, drift vs latest, move `latest` if within bounds

Why chunks of ``batch_size`` runs in request order rather than "1/N of the runs per worker": a run's rates are
not bit-identical across batch compositions (a batch of one takes other kernels than a batch of six), so the unit
of work must not depend on the number of workers. Each chunk is exactly one batch of the single-process
``pipelines.calibration.calibrate`` with the same batch size, and the driver concatenates results by chunk index,
not by completion order. The plan is then identical for any worker count and equal to the single-process plan.

A worker that dies (node lost, OOM, os._exit) is replaced and its chunk re-queued; results are keyed by chunk,
so a chunk that is somehow delivered twice is still counted once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from jobs import console

if TYPE_CHECKING:  # torch loads only inside workers and commands
    from pipelines.build import GeneratorConfig

log = logging.getLogger("invardiff")

# Exit code of `invardiff calibrate --refresh` when the new plan was stored but not promoted (drift too large).
# Distinct from 2 (bad input) so a scheduler can alert on it without confusing it with a misconfiguration.
EXIT_NOT_PROMOTED = 3


class CalibrationJobError(RuntimeError):
    """The job could not finish: a chunk failed more often than allowed, or a worker raised."""


class CalibrationWorker:
    """One Ray actor: builds the generator once, then records rates for whichever chunks it is handed."""

    def __init__(self, config: dict, torch_threads: int | None = None):
        import torch

        from pipelines.build import GeneratorConfig, build_generator

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.generator = build_generator(GeneratorConfig(**config))

    def describe(self, runs: int, seed: int) -> dict:
        import ray

        from pipelines.calibration import calibration_requests
        from pipelines.forecast_calibration import held_out_requests

        return {
            "signature": self.generator.signature(),
            "architecture": self.generator.architecture,
            "model_id": self.generator.model_id,
            "device": str(self.generator.device),
            "requests": calibration_requests(self.generator, runs=runs, seed=seed),
            "held_out": held_out_requests(self.generator),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def ready(self) -> int:
        return os.getpid()

    def record(self, chunk_index: int, requests: list, provisional=None, crash_once_marker: str | None = None):
        from pipelines.calibration import record_rates

        # Fault drill (tests, chaos runs): the one worker that creates the marker file dies mid-chunk. O_EXCL makes
        # the creation atomic, so two workers starting chunks at once cannot both "win" and both die.
        if crash_once_marker:
            try:
                fd = os.open(crash_once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        # One batch per chunk: the same batch the single-process calibration forms for these runs.
        return chunk_index, record_rates(self.generator, requests, provisional=provisional, batch_size=len(requests))

    def record_forecast(self, chunk_index: int, requests: list, target: str, max_gap: int):
        from pipelines.forecast_calibration import record_errors

        return chunk_index, record_errors(self.generator, requests, target, max_gap, batch_size=len(requests))[0]

    def measure_fit(self, chunk_index: int, requests: list, plan):
        from pipelines.forecast_calibration import measure_fit

        return chunk_index, measure_fit(self.generator, requests, plan, batch_size=len(requests))[0]

    def shadow_psnrs(self, chunk_index: int, requests: list, plans: list):
        from pipelines.shadow import plan_psnrs

        return chunk_index, plan_psnrs(self.generator, requests, plans)

    def propagation_gains(self, requests: list):
        from pipelines.forecast_calibration import propagation_gains

        return propagation_gains(self.generator, requests)


@dataclass
class JobStats:
    workers: int = 0
    device: str = "cpu"
    runs: dict[int, int] = field(default_factory=dict)  # phase -> runs pooled
    seconds: dict[str, float] = field(default_factory=dict)  # "startup", "phase1", "phase2"
    retries: int = 0
    replaced_workers: int = 0

    def runs_per_second(self) -> float:
        busy = self.seconds.get("phase1", 0.0) + self.seconds.get("phase2", 0.0)
        return sum(self.runs.values()) / busy if busy else 0.0


class CalibrationJob:
    """Start actors, learn the pipeline signature, run both phases, shut down. Use as a context manager."""

    def __init__(
        self,
        config: GeneratorConfig,
        *,
        workers: int,
        runs: int = 16,
        seed: int = 10_000,
        batch_size: int | None = None,
        address: str | None = None,
        max_retries: int = 3,
        progress: Callable[[str], None] | None = None,
        crash_once_marker: str | None = None,
        actors: list | None = None,
        torch_threads: int | None = None,
    ):
        """``actors``: already started `CalibrationWorker` actors for the same config (from :func:`start_workers`)
        to reuse instead of starting ``workers`` new ones; the job does not kill them, only their replacements."""
        if actors is not None:
            workers = len(actors)
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        if runs < 1:
            raise ValueError(f"--runs must be at least 1, got {runs}")
        self.config = config
        self.workers = workers
        self.runs = runs
        self.seed = seed
        # Default: enough chunks to keep every worker busy, at most 16 runs per forward batch.
        self.batch_size = batch_size or max(1, min(16, math.ceil(runs / workers)))
        self.address = address
        self.max_retries = max_retries
        self.say = progress or (lambda _msg: None)
        self.crash_once_marker = crash_once_marker
        self.torch_threads = torch_threads
        self.stats = JobStats()
        self._borrowed = list(actors or [])
        self._actors: list = []
        self.signature = None
        self.requests: list = []

    # ---- lifecycle

    def __enter__(self) -> CalibrationJob:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self) -> None:
        import ray

        from jobs.ray_runtime import cluster_cpus, cluster_gpus, ensure_ray

        started = time.perf_counter()
        ensure_ray(self.address)
        gpus = cluster_gpus() if self.config.device in (None, "cuda") else 0
        config = self.config
        if not gpus and not config.device:
            from dataclasses import replace

            config = replace(config, device="cpu")
        self._config_dict = asdict(config)
        chunks = math.ceil(self.runs / self.batch_size)
        self.stats.workers = min(self.workers, chunks)
        if self.stats.workers < self.workers:
            self.say(f"{self.workers} workers asked, {chunks} chunk(s) of {self.batch_size} runs: starting {self.stats.workers}")
        cpus = cluster_cpus()
        if gpus:
            self._options = dict(num_gpus=1, num_cpus=1)
            self._threads = None
        else:
            # Fractional CPUs: whole CPUs per actor deadlock a 2-core node once anything else wants one.
            self._options = dict(num_gpus=0, num_cpus=min(1.0, max(0.25, (cpus - 0.5) / self.stats.workers)))
            # CPU share per worker; on an oversubscribed node pass torch_threads=1 (BENCHMARKS.md §4).
            self._threads = self.torch_threads or max(1, int(cpus // self.stats.workers))
        self.stats.device = "cuda" if gpus else "cpu"
        self._remote = ray.remote(max_restarts=0, max_task_retries=0)(CalibrationWorker)
        if self._borrowed:
            self._actors = self._borrowed[: self.stats.workers]
        else:
            self._actors = [self._new_actor() for _ in range(self.stats.workers)]
        info = ray.get(self._actors[0].describe.remote(self.runs, self.seed))
        self.signature = info["signature"]
        self.requests = info["requests"]
        self.held_out = info["held_out"]
        self.architecture = info["architecture"]
        self.stats.seconds["startup"] = time.perf_counter() - started
        self.say(
            f"{self.stats.workers} {self.stats.device} worker(s) ready for {info['model_id']} "
            f"in {self.stats.seconds['startup']:.1f}s"
        )

    def _new_actor(self):
        return self._remote.options(**self._options).remote(self._config_dict, self._threads)

    def _replace(self, slot: int):
        """Kill the actor in ``slot``, start a new one there; returns the ObjectRef of its ready() call."""
        import ray

        with contextlib.suppress(Exception):  # already gone is what we want
            ray.kill(self._actors[slot])
        self._actors[slot] = self._new_actor()
        return self._actors[slot].ready.remote()

    def shutdown(self) -> None:
        import ray

        borrowed = {id(a) for a in self._borrowed}
        for actor in self._actors:
            if id(actor) in borrowed:
                continue
            with contextlib.suppress(Exception):  # a dead actor needs no killing
                ray.kill(actor)
        self._actors = []

    # ---- phases

    def record_phase(self, phase: int, provisional=None) -> dict[str, np.ndarray]:
        """Per-run rates of every calibration run, pooled in request order whatever the completion order."""
        import ray

        from pipelines.calibration import pool

        started = time.perf_counter()
        provisional_ref = ray.put(provisional) if provisional is not None else None

        def submit(actor, index, chunk):
            return actor.record.remote(index, chunk, provisional_ref, self.crash_once_marker)

        def check(index, chunk, rates):
            if any(values.shape[0] != len(chunk) for values in rates.values()):
                raise CalibrationJobError(f"phase {phase}: chunk {index} returned the wrong number of runs")

        results = self.map_chunks(f"phase {phase}", self.requests, submit, check)
        pooled = pool(results)
        self.stats.runs[phase] = int(next(iter(pooled.values())).shape[0])
        self.stats.seconds[f"phase{phase}"] = time.perf_counter() - started
        return pooled

    def map_chunks(self, label: str, requests: list, submit, check=None) -> list:
        """Run ``submit(actor, chunk_index, chunk)`` for every chunk of ``batch_size`` requests on whichever worker is
        free, replacing workers that die; returns the results in chunk order, whatever the completion order."""
        import ray
        from ray.exceptions import (
            ActorDiedError,
            ActorUnavailableError,
            RayActorError,
            WorkerCrashedError,
        )

        chunks = [requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)]
        pending = deque(range(len(chunks)))
        attempts = [0] * len(chunks)
        idle = list(range(len(self._actors)))
        in_flight: dict = {}  # ObjectRef -> (actor slot, chunk index)
        booting: dict = {}  # ObjectRef of a replacement's ready() -> actor slot
        boot_failures = 0
        results: dict[int, object] = {}
        done_runs = 0
        progress = console.Progress(label, len(requests), unit="runs").start()
        while pending or in_flight:
            while pending and idle:
                slot, index = idle.pop(), pending.popleft()
                attempts[index] += 1
                ref = submit(self._actors[slot], index, chunks[index])
                in_flight[ref] = (slot, index)
            ready, _ = ray.wait([*in_flight, *booting], num_returns=1)
            for ref in ready:
                if ref in booting:  # a replacement finished loading the model: it joins the idle workers
                    slot = booting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(slot)
                    except (ActorDiedError, ActorUnavailableError, WorkerCrashedError, RayActorError) as e:
                        boot_failures += 1
                        if boot_failures > self.max_retries:
                            raise CalibrationJobError(f"{label}: replacement workers keep dying") from e
                        booting[self._replace(slot)] = slot
                    continue
                slot, index = in_flight.pop(ref)
                try:
                    got_index, result = ray.get(ref)
                except (ActorDiedError, ActorUnavailableError, WorkerCrashedError, RayActorError) as e:
                    if attempts[index] > self.max_retries:
                        raise CalibrationJobError(
                            f"{label}: chunk {index} failed {attempts[index]} times, last: {type(e).__name__}"
                        ) from e
                    self.stats.retries += 1
                    self.stats.replaced_workers += 1
                    self.say(f"{label}: worker {slot} died ({type(e).__name__}); replacing it, retrying chunk {index}")
                    # The chunk goes back to the front of the queue for whichever worker is free first; the
                    # replacement takes work only once its model is loaded, so nobody waits on its start-up.
                    pending.appendleft(index)
                    booting[self._replace(slot)] = slot
                    continue
                except ray.exceptions.RayTaskError as e:  # a bug or bad input: retrying would fail the same way
                    raise CalibrationJobError(f"{label}: chunk {index} raised {e.cause!r}") from e
                idle.append(slot)
                if got_index != index or got_index in results:
                    continue
                if check is not None:
                    check(index, chunks[index], result)
                results[index] = result
                done_runs += len(chunks[index])
                progress.update(done_runs)
        progress.close()
        return [results[i] for i in range(len(chunks))]

    def calibrate(self, bundle, provisional_mode: str = "full", phase1: dict | None = None):
        """Both phases -> the final plan (the single-process `pipelines.calibration.calibrate`, distributed)."""
        from pipelines.calibration import build_plan, mean_of, provisional_plan

        if phase1 is None:
            phase1 = self.record_phase(1)
        rho1 = mean_of(phase1)
        p1 = provisional_plan(rho1, bundle, provisional_mode)
        phase2 = self.record_phase(2, provisional=p1)
        return build_plan(self.signature, rho1, mean_of(phase2), bundle, self.requests, provisional_mode)


    def calibrate_forecast(self, goal, *, orders=(0, 1), held_out: int = 8):
        """A forecast plan for ``goal`` (the single-process `pipelines.forecast_calibration.calibrate_forecast`,
        distributed): candidate errors and fit checks run chunk by chunk on the workers and are combined in chunk
        order, so the plan is identical for any worker count."""
        import ray

        from invardiff.forecast import pool_errors
        from pipelines.forecast_calibration import PROPAGATION_RUNS, TARGETS, choose_plan, with_held_out_check

        started = time.perf_counter()
        gap = goal.record_gap(self.signature.num_inference_steps)
        errors = {}
        for target in TARGETS:
            parts = self.map_chunks(
                f"{target} candidate errors", self.requests,
                lambda actor, index, chunk, t=target: actor.record_forecast.remote(index, chunk, t, gap),
            )  # fmt: skip
            errors[target] = pool_errors(parts)
        # One batch of the first runs on one worker: the same batch the single-process calibration measures.
        gains = ray.get(self._actors[0].propagation_gains.remote(self.requests[:PROPAGATION_RUNS]))

        def evaluate(plan, requests=None):
            plan_ref = ray.put(plan)
            return self.map_chunks(
                "fit check", requests or self.requests,
                lambda actor, index, chunk: actor.measure_fit.remote(index, chunk, plan_ref),
            )  # fmt: skip

        record = {
            "runs": len(self.requests),
            "inputs": [r.class_label if r.class_label is not None else r.prompt for r in self.requests],
            "seeds": [int(r.seed) for r in self.requests],
            "batch_size": self.batch_size,
            "weighting": "final",
        }
        plan = choose_plan(self.signature, goal, errors, gains, evaluate, orders=orders, record=record, say=self.say)
        if held_out:
            checks = self.held_out[:held_out]
            plan = with_held_out_check(plan, evaluate(plan, checks), goal, [r.seed for r in checks])
        self.stats.runs[1] = len(self.requests)
        self.stats.seconds["forecast"] = time.perf_counter() - started
        return plan


    def measure_fidelity(self, current, candidate, runs: int = 8):
        """Both plans against uncached on the first `runs` held-out requests (seeds no calibration run uses), chunk
        by chunk on the workers: the refresh's quality gate (pipelines.shadow.PlanFidelity)."""
        import ray

        from pipelines.shadow import compare_fidelity

        plans_ref = ray.put([current, candidate])
        parts = self.map_chunks(
            "held-out shadows", self.held_out[:runs],
            lambda actor, index, chunk: actor.shadow_psnrs.remote(index, chunk, plans_ref),
        )  # fmt: skip
        current_psnr = [p for part in parts for p in part[0]]
        candidate_psnr = [p for part in parts for p in part[1]]
        return compare_fidelity(current_psnr, candidate_psnr)


def start_workers(config: GeneratorConfig, workers: int, address: str | None = None, torch_threads: int | None = None) -> list:
    """Start calibration actors to share between several jobs (benchmarks, tests): the model loads once per
    actor, not once per job. Pass them as ``CalibrationJob(..., actors=...)``; kill them when done."""
    job = CalibrationJob(config, workers=workers, runs=workers, batch_size=1, address=address, torch_threads=torch_threads)
    job.start()
    return job._actors


# --------------------------------------------------------------------------------------------------
# Publishing


@dataclass
class Outcome:
    key: str
    status: str  # "promoted", "first" (promoted, nothing to compare), "rejected", "skipped" (latest exists)
    plan_id: str | None = None
    version: str | None = None
    reasons: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    drift: object | None = None

    @property
    def promoted(self) -> bool:
        return self.status in ("promoted", "first")


def publish(store, plan, *, gate=None, say: Callable[[str], None] = lambda _m: None, fidelity=None) -> Outcome:
    """Write ``plan`` as a new version; compare with the key's latest; move ``latest`` if it validates and the
    drift is within ``gate`` (a :class:`jobs.drift.DriftGate`; None promotes unconditionally). ``fidelity``: both
    plans measured against uncached on held-out requests (a pipelines.shadow.PlanFidelity), gated and reported."""
    from jobs.drift import compare_plans, drift_markdown, drift_png
    from jobs.plan_store import PromotionConflict, store_key

    key = store_key(plan.signature)
    previous = store.latest(key)
    version = store.write(plan)  # validated read-back; raises (and cleans up) on failure
    say(f"wrote {store.url(key, version.relpath)}")
    if previous is None:
        try:
            store.promote(version, replacing=None)
        except PromotionConflict as e:  # another first calibration of this key promoted while this one ran
            return Outcome(key, "rejected", plan.plan_id, version.name, [str(e)])
        return Outcome(key, "first", plan.plan_id, version.name)
    drift = compare_plans(previous, plan)
    if fidelity is not None:
        drift = dataclasses.replace(drift, fidelity=fidelity)
    reasons = gate.reasons(drift) if gate is not None else []
    png_name = f"{version.name}-drift.png"
    markdown = drift_markdown(drift, key=key, promoted=not reasons, reasons=reasons, png_name=png_name)
    reports = store.write_report(version, markdown, drift_png(previous, plan))
    if reasons:
        return Outcome(key, "rejected", plan.plan_id, version.name, reasons, reports, drift)
    try:
        store.promote(version, replacing=previous)  # only if latest is still the plan this one was compared with
    except PromotionConflict as e:
        return Outcome(key, "rejected", plan.plan_id, version.name, [str(e)], reports, drift)
    return Outcome(key, "promoted", plan.plan_id, version.name, [], reports, drift)


def format_outcome(outcome: Outcome, store_uri: str) -> str:
    if outcome.status == "skipped":
        return (
            f"store {store_uri} already has latest plan {outcome.plan_id} for key {outcome.key}; nothing calibrated "
            "(pass --refresh to recalibrate and compare)"
        )
    lines = []
    if outcome.drift is not None:
        d = outcome.drift
        jac = ", ".join(f"{k} {v:.3f}" for k, v in d.jaccard.items())
        lines.append(
            f"drift vs {d.old_plan_id}: Jaccard {jac}; gated steps +{d.gates_added} -{d.gates_removed}; "
            f"ideal speedup {d.speedup_old:.2f}x -> {d.speedup_new:.2f}x"
        )
        if d.fidelity is not None:
            lines.append(
                f"fidelity on {d.fidelity.runs} held-out shadow runs: mean PSNR to uncached "
                f"{d.fidelity.current_psnr:.2f} dB -> {d.fidelity.candidate_psnr:.2f} dB"
            )
    lines += [f"wrote {path}" for path in outcome.reports]
    if outcome.status == "first":
        lines.append(f"promoted {outcome.version} to latest of key {outcome.key} (first plan for this key)")
    elif outcome.status == "promoted":
        lines.append(f"promoted {outcome.version} to latest of key {outcome.key}")
    else:
        lines.append(f"NOT promoted: {outcome.version} stays in the store, key {outcome.key} keeps its latest plan")
        lines += [f"  {reason}" for reason in outcome.reasons]
    return "\n".join(lines)


def run_calibrate_job(
    config: GeneratorConfig,
    make_bundle: Callable[[str], object],
    *,
    workers: int,
    runs: int = 16,
    seed: int = 10_000,
    batch_size: int | None = None,
    provisional_mode: str = "full",
    store=None,
    refresh: bool = False,
    gate=None,
    out: str | None = None,
    address: str | None = None,
    progress: Callable[[str], None] | None = None,
    crash_once_marker: str | None = None,
    actors: list | None = None,
) -> tuple[object | None, Outcome | None, JobStats]:
    """The whole `invardiff calibrate --workers N` job. Returns (plan or None if skipped, store outcome, stats).

    ``make_bundle(architecture)`` gives the tau bundle once the workers have told us the architecture.
    """
    say = progress or (lambda _m: None)
    if store is not None:
        store.check_reachable(create=True)
    job = CalibrationJob(
        config, workers=workers, runs=runs, seed=seed, batch_size=batch_size, address=address,
        progress=say, crash_once_marker=crash_once_marker, actors=actors,
    )
    previous = None  # the store's latest plan, which a refreshed one is measured against
    with job:
        bundle = make_bundle(job.architecture)
        if store is not None:
            from jobs.plan_store import store_key

            # Read (and verify) the current latest before spending the compute: a corrupt pointer stops here.
            key = store_key(job.signature)
            existing = store.latest(key)
            previous = existing
            if existing is not None and not refresh:
                return None, Outcome(key, "skipped", existing.plan_id), job.stats
        say(
            f"calibrating: {runs} runs x {job.signature.num_inference_steps} steps, "
            f"{'forecast plan' if hasattr(bundle, 'record_gap') else 'two phases'}, "
            f"chunks of {job.batch_size} runs on {job.stats.workers} worker(s)"
        )
        if hasattr(bundle, "record_gap"):  # a ForecastTarget
            plan = job.calibrate_forecast(bundle)
        else:
            plan = job.calibrate(bundle, provisional_mode)
        fidelity = None
        if previous is not None and gate is not None and gate.max_psnr_drop is not None:
            say(f"measuring both plans against uncached on {gate.quality_runs} held-out shadow runs")
            fidelity = job.measure_fidelity(previous, plan, runs=gate.quality_runs)
    if out:
        from jobs.ray_runtime import storage_options_for

        plan.save(out, storage_options=storage_options_for(out) or None)
        say(f"wrote plan {plan.plan_id} to {out}")
    outcome = publish(store, plan, gate=gate, say=say, fidelity=fidelity) if store is not None else None
    return plan, outcome, job.stats



def calibrate_command(
    config: GeneratorConfig,
    make_bundle: Callable[[str], object],
    *,
    workers: int,
    store: str | None,
    out: str | None,
    refresh: bool,
    min_jaccard: float,
    max_speedup_change: float,
    runs: int,
    max_psnr_drop: float | None = None,
    seed: int,
    batch_size: int | None,
    provisional_mode: str,
    address: str | None,
) -> int:
    """`invardiff calibrate --workers N --store URI [--refresh]`: returns the exit code (0, or 3 not promoted).
    Bad input raises ValueError subclasses the CLI turns into exit code 2 before any worker starts."""
    import typer

    from invardiff.plan_report import format_plan
    from jobs.drift import DriftGate
    from jobs.plan_store import JobInputError, PlanStore

    if workers < 1:
        raise JobInputError(f"--workers must be at least 1, got {workers}")
    if store is None and out is None:
        raise JobInputError("give --store DIR_OR_URI (plan store) or --out PLAN.json")
    if refresh and store is None:
        raise JobInputError("--refresh compares against a plan store: give --store DIR_OR_URI")
    plan_store = PlanStore(store) if store else None

    def say(message: str) -> None:
        typer.echo(f"  {message}", err=True)

    plan, outcome, stats = run_calibrate_job(
        config, make_bundle, workers=workers, runs=runs, seed=seed, batch_size=batch_size,
        provisional_mode=provisional_mode, store=plan_store, refresh=refresh,
        gate=DriftGate(min_jaccard=min_jaccard, max_speedup_change=max_speedup_change, max_psnr_drop=max_psnr_drop),
        out=out,
        address=address, progress=say,
    )
    if plan is not None:
        typer.echo(format_plan(plan))
        typer.echo(
            f"calibrated {stats.runs.get(1, 0)}+{stats.runs.get(2, 0)} runs on {stats.workers} {stats.device} "
            f"worker(s) at {stats.runs_per_second():.2f} runs/s ({stats.retries} chunk(s) retried)"
        )
    if outcome is not None:
        typer.echo(format_outcome(outcome, store))
        if outcome.status == "rejected":
            return EXIT_NOT_PROMOTED
    return 0
