"""Learning-to-Cache (L2C, arXiv 2406.01733): a router learned per sampling step, frozen into a static plan.

Training (method-l2c-dicache.md §1.3-§1.6). Sampling alternates full steps (even k in execution order, k = 0 the
noisiest) and cache steps (odd k). Every cache step k has its own router: one free logit per unit, a unit being
one cache site of the adapter (DiT: `attn1` and `ff` of every block, 2L units), so the router is input-invariant
and step-variant. While training, a unit's output on a cache step is the relaxed mix

    s * f(x) + (1 - s) * cached,        s = sigmoid(logit),

where `cached` is that unit's pre-gate output at the preceding full step. One iteration draws a pair (full k,
cache k+1), noises real images to timestep t_k, runs the frozen model there (recording every unit), takes one
deterministic DDIM step to x_{k+1}, and regresses the relaxed student at (x_{k+1}, t_{k+1}) onto the full teacher:

    loss = MSE(teacher, student) + lambda * sum(s).

Only the router logits get gradients (AdamW, weight decay 0) and they are clamped to [-5, 5] after every step.

Inference (§1.7). Thresholding turns the router into an ordinary InvarDiff plan: step gate all False; on cache
step k a unit is reused iff sigmoid(logit_k) <= theta, every unit is computed on full steps. The existing runtime
executes it (`invardiff.runtime`), and reuse at step k+1 returns exactly the value computed at step k, which is
L2C's "cache of the last full step". There is no L2C runtime of its own.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from .._hookutils import register_hook, remove_hooks, unwrap
from ..adapters import CacheSite, get_adapter
from ..policy import InvarDiffPolicy

__all__ = [
    "L2CPolicy",
    "L2CRouter",
    "RelaxedCache",
    "RouterLogits",
    "RouterTrainingConfig",
    "cache_steps",
    "relaxed_mix",
    "router_books",
    "router_loss",
    "train_dit_router",
]

ROUTER_FORMAT = "invardiff-l2c-router/1"
METHOD = "l2c"
LOGIT_CLAMP = 5.0
DEFAULT_THETA = 0.1  # DiT-XL/2 and DiT-L/2 at 256 px, 20 and 50 NFE (§1.7)
_RELAXED_HOOK = "l2c_relaxed_unit"


# ----------------------------------------------------------------------------------------------------------------
# The math, as pure functions.


def cache_steps(num_steps: int) -> list[int]:
    """Cache-step indices in execution order: every odd k. L2C's respaced index n = T-1-k, so the last sampling
    step (n = 0) is a cache step whenever T is even, as in the DiT recipe (§1.8)."""
    return list(range(1, num_steps, 2))


def relaxed_mix(computed: Any, cached: Any, score: torch.Tensor) -> Any:
    """`s * f(x) + (1 - s) * cached`, element by element for tuple outputs (FLUX joint attention).

    Written as two products and a sum, not `cached + s * (f - cached)`: with s = 1 the result is f bit for bit,
    which is what makes the relaxed model with every score at 1 the full model exactly."""
    if isinstance(computed, tuple):
        return tuple(relaxed_mix(f, c, score) for f, c in zip(computed, cached))
    if computed is None:
        return None
    return score * computed + (1.0 - score) * cached


def router_loss(teacher: torch.Tensor, student: torch.Tensor, scores: torch.Tensor, lam: float):
    """(loss, mse): the mean squared error over every output element (per sample over all channels, learned
    variance included, then over the batch; equal sizes make that the plain mean) plus lambda times the sum of the
    scores, an L1 penalty on always-positive scores."""
    mse = F.mse_loss(student, teacher)
    return mse + lam * scores.sum(), mse


def router_books(
    probabilities: np.ndarray, sites: Sequence[CacheSite], layers: Mapping[str, int], theta: float
) -> dict[str, np.ndarray]:
    """Plan books from router scores: reuse unit u at cache step k iff score <= theta; full steps reuse nothing.

    probabilities: float (T, U), U = len(sites), rows of full steps ignored. A site that computes several families
    (FLUX joint attention) sets all of them, so the runtime's AND rule skips it exactly when the router does."""
    num_steps = probabilities.shape[0]
    if probabilities.shape != (num_steps, len(sites)):
        raise ValueError(f"router scores have shape {probabilities.shape}, expected ({num_steps}, {len(sites)})")
    books = {family: np.zeros((num_steps, n), dtype=bool) for family, n in layers.items()}
    for k in cache_steps(num_steps):
        for unit, site in enumerate(sites):
            for family in site.families:
                books[family][k, site.layer] = probabilities[k, unit] <= theta
    return books


# ----------------------------------------------------------------------------------------------------------------
# Training-time execution: the relaxed mix on every unit.


class RelaxedUnitHook(ModelHook):
    """One unit. Always computes f(x) (the gradient of the mix needs it), then by the owner's mode: `record`
    stores it as the unit's cache, `full` returns it untouched, `relaxed` returns the mix with the cache."""

    def __init__(self, owner: "RelaxedCache", unit: int) -> None:
        super().__init__()
        self.owner = owner
        self.unit = unit

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        owner = self.owner
        if owner.mode == "record":
            owner.cache[self.unit] = _detached(output)
        elif owner.mode == "relaxed":
            cached = owner.cache.get(self.unit)
            if cached is None:
                raise RuntimeError(f"L2C: unit {owner.sites[self.unit].name} has no recorded output to mix with")
            output = relaxed_mix(output, cached, owner.scores[self.unit])
        return output


def _detached(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return None if value is None else value.detach()


class RelaxedCache:
    """Hooks on every unit of a transformer for router training. Set `mode` before each call: `record` (a full
    step that fills the cache), `full` (the teacher: computes, leaves the cache alone) or `relaxed` (the student:
    mixes with `scores`, a (U,) tensor)."""

    MODES = ("full", "record", "relaxed")

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = unwrap(transformer)
        self.sites = get_adapter(self.transformer).cache_sites(self.transformer)
        self.mode = "full"
        self.scores: torch.Tensor | None = None
        self.cache: dict[int, Any] = {}

    @property
    def num_units(self) -> int:
        return len(self.sites)

    def attach(self) -> "RelaxedCache":
        try:
            for unit, site in enumerate(self.sites):
                register_hook(site.module, RelaxedUnitHook(self, unit), _RELAXED_HOOK)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        remove_hooks(self.transformer, (_RELAXED_HOOK,))
        self.cache.clear()
        self.scores = None

    def set_mode(self, mode: str, scores: torch.Tensor | None = None) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "relaxed" and (scores is None or scores.shape != (self.num_units,)):
            raise ValueError(f"relaxed mode needs scores of shape ({self.num_units},)")
        self.mode, self.scores = mode, scores

    def __enter__(self) -> "RelaxedCache":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


class RouterLogits(torch.nn.Module):
    """One logit vector per sampling step (only cache steps are ever used or trained), N(0, 1) at init.

    Separate parameters per step, as the reference keeps one router per step: an iteration trains one step's
    router, the others get no gradient, and AdamW leaves a parameter without a gradient untouched (a single
    (T, U) tensor would see zero gradients, and Adam's momentum would keep moving rows nobody trained)."""

    def __init__(self, num_steps: int, num_units: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.logits = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(num_units, generator=generator)) for _ in range(num_steps)
        )

    def scores(self, step: int) -> torch.Tensor:
        return torch.sigmoid(self.logits[step])

    @torch.no_grad()
    def clamp_(self) -> None:
        for logits in self.logits:
            logits.clamp_(-LOGIT_CLAMP, LOGIT_CLAMP)

    def numpy(self) -> np.ndarray:
        return torch.stack([p.detach() for p in self.logits]).double().numpy()


# ----------------------------------------------------------------------------------------------------------------
# The trained router and the plan it becomes.


@dataclass
class L2CRouter:
    """A trained router: logits (T, U) over the units `units` (cache-site names), for one pipeline signature."""

    signature: Any  # invardiff.plan.PipelineSignature
    units: list[str]
    logits: np.ndarray
    training: dict[str, Any] = field(default_factory=dict)

    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(self.logits, dtype=np.float64)))

    def kept_per_cache_step(self, theta: float) -> list[int]:
        """Units recomputed at each cache step (|K_n| of §1.9), in sampling order."""
        p = self.probabilities()
        return [int((p[k] > theta).sum()) for k in cache_steps(p.shape[0])]

    def to_plan(self, transformer: torch.nn.Module, theta: float = DEFAULT_THETA, *, created_at: str | None = None):
        """The static InvarDiff plan of threshold `theta`. `transformer` supplies the unit -> family mapping and
        must have exactly the units the router was trained on."""
        from ..plan import Plan

        transformer = unwrap(transformer)
        adapter = get_adapter(transformer)
        sites = adapter.cache_sites(transformer)
        if [site.name for site in sites] != list(self.units):
            raise ValueError("the router was trained on other units than this transformer's cache sites")
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f"theta must be in [0, 1], got {theta}")
        layers = adapter.layers(transformer)
        books = router_books(self.probabilities(), sites, layers, theta)
        num_steps = self.signature.num_inference_steps
        zero = {"step": 0.0, **dict.fromkeys(layers, 0.0)}  # InvarDiff's quantiles do not apply to L2C
        return Plan.from_books(
            self.signature,
            (np.zeros(num_steps, dtype=bool), books),
            taus=zero,
            nonskip_rate=0.0,
            calibration={
                "method": METHOD,
                "lambda": self.training.get("lambda"),
                "theta": float(theta),
                "kept_per_cache_step": self.kept_per_cache_step(theta),
                "units_per_step": len(self.units),
                "training": self.training,
            },
            created_at=created_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ROUTER_FORMAT,
            "signature": self.signature.to_dict(),
            "units": list(self.units),
            "logits": np.asarray(self.logits, dtype=np.float64).tolist(),
            "training": self.training,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "L2CRouter":
        from ..plan import PipelineSignature

        if doc.get("format") != ROUTER_FORMAT:
            raise ValueError(f"not an L2C router file: format {doc.get('format')!r}, expected {ROUTER_FORMAT!r}")
        logits = np.asarray(doc["logits"], dtype=np.float64)
        signature = PipelineSignature.from_dict(doc["signature"])
        if logits.shape != (signature.num_inference_steps, len(doc["units"])):
            raise ValueError(f"router logits have shape {logits.shape}, the signature and units say "
                             f"({signature.num_inference_steps}, {len(doc['units'])})")
        return cls(signature, list(doc["units"]), logits, dict(doc.get("training", {})))

    def save(self, uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
        with fsspec.open(os.fspath(uri), "w", **(storage_options or {})) as file:
            file.write(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> "L2CRouter":
        with fsspec.open(os.fspath(uri), "r", **(storage_options or {})) as file:
            return cls.from_dict(json.load(file))


class L2CPolicy(InvarDiffPolicy):
    """An L2C plan run by the InvarDiff runtime; only the name differs, so output rows say which method ran."""

    name = METHOD

    def __init__(self, plan: Any) -> None:
        method = (getattr(plan, "calibration", None) or {}).get("method")
        if method != METHOD:
            raise ValueError(f"plan {plan.plan_id} was made by {method!r}, not by L2C router training")
        super().__init__(plan)


# ----------------------------------------------------------------------------------------------------------------
# Training on a class-conditional DiT with DDIM.


@dataclass(frozen=True)
class RouterTrainingConfig:
    lam: float  # weight of the L1 penalty on the scores
    iterations: int = 750
    batch_size: int = 16
    # The reference trains 40k iterations at lr 1e-3 for DDIM-50, ~1600 Adam steps per router. A CPU budget gives
    # each router ~30 steps; at lr 0.2 a consistently signed gradient can still carry a logit across the clamp
    # range, which is what the released routers show (scores near 0 or 1).
    lr: float = 0.2
    class_dropout: float = 0.1  # labels replaced by the null class, so the unconditional CFG branch is covered
    seed: int = 0
    log_every: int = 25


def train_dit_router(
    transformer: torch.nn.Module,
    scheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int,
    null_class: int,
    config: RouterTrainingConfig,
    progress: Callable[[str], None] | None = None,
) -> tuple[RouterLogits, dict[str, Any]]:
    """Train L2C routers for `num_steps`-step deterministic DDIM sampling of a class-conditional DiT.

    `images` (N, C, H, W) are clean model inputs (latents or pixels) in the scale the model was trained on,
    `labels` (N,) their classes. `scheduler` is a DDIM scheduler configured as the sampler's; it is stepped here,
    so pass one the sampler does not share. The transformer is frozen (its requires_grad flags are restored).
    Returns the logits and a JSON-able training record (arguments, loss curve, wall and process CPU seconds)."""
    transformer = unwrap(transformer)
    generator = torch.Generator().manual_seed(config.seed)
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps
    pairs = len(cache_steps(num_steps))
    if pairs == 0:
        raise ValueError("L2C needs at least two sampling steps (one full, one cache)")

    relaxed = RelaxedCache(transformer)
    router = RouterLogits(num_steps, relaxed.num_units, generator)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=0.0)
    grad_flags = [p.requires_grad for p in transformer.parameters()]
    transformer.requires_grad_(False)
    was_training = transformer.training
    transformer.eval()

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return transformer(x, timestep=t.expand(x.shape[0]), class_labels=y).sample

    curve: list[list[float]] = []
    running = [0.0, 0.0, 0]
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        relaxed.attach()
        for iteration in range(config.iterations):
            pair = int(torch.randint(pairs, (), generator=generator))
            full_k, cache_k = 2 * pair, 2 * pair + 1
            rows = torch.randint(len(images), (config.batch_size,), generator=generator)
            x0, y = images[rows], labels[rows].clone()
            y[torch.rand(config.batch_size, generator=generator) < config.class_dropout] = null_class
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            t_full, t_cache = timesteps[full_k], timesteps[cache_k]
            with torch.no_grad():
                x_full = scheduler.add_noise(x0, noise, t_full.reshape(1))
                relaxed.set_mode("record")
                eps = model(x_full, t_full, y)
                x_cache = scheduler.step(_noise_part(eps, x_full), t_full, x_full, eta=0.0).prev_sample
                relaxed.set_mode("full")
                teacher = model(x_cache, t_cache, y)
            scores = router.scores(cache_k)
            relaxed.set_mode("relaxed", scores)
            student = model(x_cache, t_cache, y)
            loss, mse = router_loss(teacher, student, scores, config.lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            router.clamp_()
            relaxed.set_mode("full")

            running[0] += float(loss.detach())
            running[1] += float(mse.detach())
            running[2] += 1
            if (iteration + 1) % config.log_every == 0 or iteration + 1 == config.iterations:
                count = running[2]
                curve.append([iteration + 1, running[0] / count, running[1] / count])
                running = [0.0, 0.0, 0]
                if progress:
                    progress(f"iteration {iteration + 1}/{config.iterations}: loss {curve[-1][1]:.5f} "
                             f"(mse {curve[-1][2]:.5f}), {time.perf_counter() - started:.0f} s")
    finally:
        relaxed.detach()
        for p, flag in zip(transformer.parameters(), grad_flags):
            p.requires_grad_(flag)
        transformer.train(was_training)

    record = {
        "lambda": config.lam,
        "iterations": config.iterations,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "optimizer": "AdamW(weight_decay=0) on router logits only",
        "logit_clamp": LOGIT_CLAMP,
        "class_dropout": config.class_dropout,
        "null_class": null_class,
        "seed": config.seed,
        "pairs": "full step 2j, cache step 2j+1, j ~ U{0..%d}, one j per iteration" % (pairs - 1),
        "loss_curve": curve,  # [iteration, mean loss, mean mse] over each logging window
        "wall_seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return router, record


def _noise_part(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A learned-variance model (DiT-XL/2) predicts 2C channels; DDIM steps with the noise half."""
    return output[:, : x.shape[1]] if output.shape[1] == 2 * x.shape[1] else output

