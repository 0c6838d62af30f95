"""Learning-to-Cache router training on a DiT pipeline, and the static plans it thresholds into.

    invardiff train-router --lam 1e-4 --out l2c-router.json --plan-out l2c-plan.json [--theta 0.1]
    invardiff train-router --from-router l2c-router.json --theta 0.2 --plan-out l2c-plan-0.2.json
    invardiff train-router --lam 1e-5 --lam 1e-4 --lam 1e-3 --workers 3 --out 'router-{lam}.json' \
        --plan-out 'plan-{lam}.json'

The training images are the data the model was trained on. For the embedded digits model those are scikit-learn's
digits in the pixel encoding of `pipelines.digits`; the scheduler noises them (L2C §1.5). Other models would need
their own training latents and are refused. One run is one process: the router has a few hundred parameters
and an iteration is a few forward passes, so on the digits model a run takes about 5 CPU minutes. A lambda sweep
runs on Ray, one task per lambda (`--lam` repeated with `--workers N`); one run is not split across workers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

from pipelines.build import GeneratorConfig


@dataclass
class TrainedRouter:
    router: Any  # invardiff.policies.l2c.L2CRouter
    plan: Any  # invardiff.plan.Plan at the requested theta


def training_data(model: str):
    """(images, labels, null_class) for a model spec whose training data ships with the project."""
    import torch

    from pipelines import digits

    if model != "digits":
        raise ValueError(
            f"router training needs the model's training images; only the embedded 'digits' model ships them "
            f"(got {model!r})"
        )
    images, labels = digits.load_digit_images()
    return torch.from_numpy(images), torch.from_numpy(labels), digits.NULL_CLASS


def train_router(
    config: GeneratorConfig,
    lam: float,
    *,
    theta: float,
    iterations: int = 750,
    batch_size: int = 16,
    lr: float = 0.2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TrainedRouter:
    """Train an L2C router for the pipeline `config` builds, and threshold it at `theta` into a plan."""
    from invardiff.adapters import get_adapter
    from invardiff.policies.l2c import L2CRouter, RouterTrainingConfig, train_dit_router
    from pipelines.build import build_generator

    generator = build_generator(config)
    if generator.architecture != "dit":
        raise ValueError("L2C router training is implemented for class-conditional DiT pipelines only")
    images, labels, null_class = training_data(config.model)
    transformer = generator.transformer
    logits, record = train_dit_router(
        transformer,
        copy.deepcopy(generator.scheduler),  # stepped during training; the sampler's own stays untouched
        images.to(generator.device, generator.dtype),
        labels.to(generator.device),
        num_steps=generator.num_inference_steps,
        null_class=null_class,
        config=RouterTrainingConfig(lam=lam, iterations=iterations, batch_size=batch_size, lr=lr, seed=seed),
        progress=progress,
    )
    record["data"] = f"{config.model}: sklearn load_digits, {len(images)} images, pixel encoding of pipelines.digits"
    units = [site.name for site in get_adapter(transformer).cache_sites(transformer)]
    router = L2CRouter(generator.signature(), units, logits.numpy(), record)
    return TrainedRouter(router, router.to_plan(transformer, theta))


def plan_from_router_file(router_uri: str, config: GeneratorConfig, theta: float, storage_options=None):
    """Re-threshold a saved router without retraining (the pipeline supplies the unit -> family mapping)."""
    from invardiff.policies.l2c import L2CRouter
    from pipelines.build import build_generator

    router = L2CRouter.load(router_uri, storage_options=storage_options)
    generator = build_generator(config)
    mismatches = router.signature.mismatches(generator.signature())
    if mismatches:
        fields = "; ".join(f"{name}: router {a!r}, pipeline {b!r}" for name, a, b in mismatches)
        raise ValueError(f"{router_uri} was trained for a different pipeline: {fields}")
    return router.to_plan(generator.transformer, theta)


def _train_on_worker(config: GeneratorConfig, lam: float, threads: int | None, **kwargs) -> TrainedRouter:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return train_router(config, lam, **kwargs)


def train_router_sweep(
    config: GeneratorConfig,
    lams: list[float],
    *,
    workers: int,
    address: str | None = None,
    **kwargs: Any,
) -> list[TrainedRouter]:
    """One router per lambda, trained as Ray tasks, at most `workers` at a time (one GPU each where the cluster
    has GPUs, else an even share of the CPUs). The paper sweeps lambda, and each lambda is an independent run, so
    the sweep parallelises without any change to one run's arithmetic. Results come back in `lams` order."""
    import ray

    from jobs.ray_runtime import cluster_cpus, cluster_gpus, ensure_ray

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ensure_ray(address)
    gpus = cluster_gpus() if config.device in (None, "cuda") else 0
    if gpus:
        options, threads = {"num_gpus": 1, "num_cpus": 1}, None
    else:
        share = max(1.0, cluster_cpus() / workers)
        options, threads = {"num_cpus": share}, int(share)
        config = GeneratorConfig(**{**config.__dict__, "device": "cpu"})
    task = ray.remote(**options)(_train_on_worker)
    pending, results = {}, {}
    for index, lam in enumerate(lams):
        if len(pending) == workers:  # keep at most `workers` runs in flight
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[task.remote(config, lam, threads, **kwargs)] = index
    for ref, index in pending.items():
        results[index] = ray.get(ref)
    return [results[index] for index in range(len(lams))]
