"""Learning-to-Cache router training on a DiT pipeline, and the static plans it thresholds into.

    invardiff train-router --lam 1e-4 --out l2c-router.json --plan-out l2c-plan.json [--theta 0.1]
    invardiff train-router --from-router l2c-router.json --theta 0.2 --plan-out l2c-plan-0.2.json

The training images are the data the model was trained on. For the embedded digits model those are scikit-learn's
digits in the pixel encoding of `pipelines.digits`; the scheduler noises them (L2C §1.5). Other models would need
their own training latents and are refused. One process: the router has a few hundred parameters and an iteration
is a few forward passes, so on the digits model a run fits a few CPU minutes; spreading one run over Ray workers
is not implemented.
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
