"""Tiny random-init DiT / FLUX transformers, toy plans and call counters for the runtime and recorder tests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from invardiff import apply_invardiff, get_adapter, invardiff_cache_contents

DIT_LAYERS = 3
FLUX_DUAL, FLUX_SINGLE = 2, 2
NULL_CLASS = 10  # DiT with 10 classes and class dropout keeps a learned null embedding at index 10


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models are all per-op overhead; on a busy 2-core machine one intra-op thread is ~10x faster than
    contending for both. Restored after the module so other tests keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class ToyPlan:
    """The attributes the runtime reads from `invardiff.plan.Plan`."""

    step_gate: np.ndarray
    modules: dict[str, np.ndarray]
    plan_id: str = "toy-plan"


def all_compute_plan(num_steps: int, layers: dict[str, int]) -> ToyPlan:
    return ToyPlan(
        np.zeros(num_steps, dtype=bool),
        {family: np.zeros((num_steps, n), dtype=bool) for family, n in layers.items()},
        plan_id="all-compute",
    )


def random_plan(num_steps: int, layers: dict[str, int], seed: int, step_gate: str, share: float = 0.5) -> ToyPlan:
    """Module books drawn at random (including reuse at step 0, which must fall back to compute); step gate given
    as a bit string such as "00110010"."""
    rng = np.random.default_rng(seed)
    gate = np.array([c == "1" for c in step_gate], dtype=bool)
    assert gate.shape == (num_steps,)
    modules = {family: rng.random((num_steps, n)) < share for family, n in layers.items()}
    return ToyPlan(gate, modules, plan_id=f"random-{seed}")


# ----------------------------------------------------------------------------------------------------------------
# Models and samplers.


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    # 8x8 latent, patch 2 -> 16 tokens, hidden 32, 3 layers, 10 classes (+ learned null class).
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=DIT_LAYERS,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    return model.eval()


def dit_inputs(batch: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    labels = torch.arange(batch) % 10
    return x, labels


def dit_timesteps(num_steps: int) -> list[int]:
    return np.linspace(999, 0, num_steps).round().astype(int).tolist()


@torch.no_grad()
def sample_dit(
    model, x, labels, num_steps: int, guidance: float | None = None, on_step=None, stop_after: int | None = None
) -> list[torch.Tensor]:
    """A deterministic Euler-like loop over `num_steps` timesteps; returns the transformer output of every step.
    With `guidance`, cond and uncond halves go through the model as one batch (batched CFG). `stop_after` abandons
    the generation after that many steps."""
    outputs = []
    for k, t in enumerate(dit_timesteps(num_steps)[:stop_after]):
        if guidance is None:
            model_in, model_labels = x, labels
        else:
            model_in = torch.cat([x, x])
            model_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        timestep = torch.full((model_in.shape[0],), t, dtype=torch.long)
        out = model(model_in, timestep=timestep, class_labels=model_labels).sample
        outputs.append(out)
        eps = out[:, :4]
        if guidance is not None:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        x = x - 0.05 * eps
        if on_step is not None:
            on_step(k)
    return outputs


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    # hidden 16 (2 heads x 8), 2 dual + 2 single blocks, 16 image tokens, 8 text tokens.
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=FLUX_DUAL,
        num_single_layers=FLUX_SINGLE,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    )
    return model.eval()


@dataclass
class FluxInputs:
    x: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    img_ids: torch.Tensor = field(default_factory=lambda: torch.stack(
        [torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=1
    ).float())
    txt_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(8, 3))

    def rows(self, index) -> "FluxInputs":
        return FluxInputs(self.x[index], self.text[index], self.pooled[index])


def flux_inputs(batch: int, seed: int = 2) -> FluxInputs:
    generator = torch.Generator().manual_seed(seed)
    return FluxInputs(
        torch.randn(batch, 16, 8, generator=generator),
        torch.randn(batch, 8, 16, generator=generator),
        torch.randn(batch, 16, generator=generator),
    )


def flux_sigmas(num_steps: int) -> list[float]:
    return np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()


@torch.no_grad()
def flux_step(model, inputs: FluxInputs, x: torch.Tensor, k: int, num_steps: int) -> torch.Tensor:
    sigma = flux_sigmas(num_steps)[k]
    timestep = torch.full((x.shape[0],), sigma)
    return model(
        hidden_states=x,
        encoder_hidden_states=inputs.text,
        pooled_projections=inputs.pooled,
        timestep=timestep,
        img_ids=inputs.img_ids,
        txt_ids=inputs.txt_ids,
        return_dict=False,
    )[0]


@torch.no_grad()
def sample_flux(model, inputs: FluxInputs, num_steps: int, on_step=None, stop_after: int | None = None):
    """Flow-matching Euler with one transformer call per step (guidance-distilled layout); returns the transformer
    output of every step. `stop_after` abandons the generation after that many steps."""
    x = inputs.x
    outputs = []
    for k in range(num_steps if stop_after is None else stop_after):
        out = flux_step(model, inputs, x, k, num_steps)
        outputs.append(out)
        x = x - (1.0 / num_steps) * out
        if on_step is not None:
            on_step(k)
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# Counting the calls that really run.


class CallCounter:
    """Wraps the forwards of named submodules (before any hook is registered, so hooks see the wrapper as the
    original forward) and counts the calls that actually execute them."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.counts: Counter[str] = Counter()
        self.fail_at: tuple[str, int] | None = None  # (name, call number) that raises, for exception tests
        modules = dict(model.named_modules())
        for name in names:
            self._wrap(name, modules[name])

    def _wrap(self, name: str, module: torch.nn.Module) -> None:
        forward = module.forward

        def counted(*args, **kwargs):
            self.counts[name] += 1
            if self.fail_at == (name, self.counts[name]):
                raise RuntimeError(f"injected failure in {name}")
            return forward(*args, **kwargs)

        module.forward = counted

    def total(self, prefix: str, suffix: str) -> int:
        return sum(n for name, n in self.counts.items() if name.startswith(prefix) and name.endswith(suffix))


def diffusers_hook_names(model: torch.nn.Module) -> list[str]:
    return [
        f"{path}:{name}"
        for path, module in model.named_modules()
        if hasattr(module, "_diffusers_hook")
        for name in module._diffusers_hook.hooks
    ]


def gated_steps(step_gate: np.ndarray) -> list[bool]:
    return [bool(step_gate[k]) and k > 0 for k in range(len(step_gate))]


def expected_slot_holdings(plan: ToyPlan, sites) -> list[set[str]]:
    """For each step k: the names of the sites whose slot must be held after step k, derived directly from the
    rule 'a slot is held after step k iff the next step that runs the blocks reuses it' (a reuse needs an earlier
    computed step, i.e. any non-gated step before it)."""
    num_steps = len(plan.step_gate)
    gated = gated_steps(plan.step_gate)
    held_after = []
    for k in range(num_steps):
        next_reached = next((j for j in range(k + 1, num_steps) if not gated[j]), None)
        names = set()
        if next_reached is not None:
            for site in sites:
                if all(plan.modules[f][next_reached, site.layer] for f in site.families):
                    names.add(site.name)
        held_after.append(names)
    return held_after


def check_slot_holdings(model: torch.nn.Module, plan: ToyPlan, sample) -> list[set[str]]:
    """Apply `plan`, run `sample(on_step=...)` (one generation in the default context) and check after every step
    that the slots held are exactly those a later row needs (`expected_slot_holdings`), that H is held iff the
    next step is gated, and that after the last step the context starts over holding nothing. Returns the expected
    holdings, for checks that the plan exercises what a test means it to."""
    apply_invardiff(model, plan)
    held = expected_slot_holdings(plan, get_adapter(model).cache_sites(model))
    gated = gated_steps(plan.step_gate)
    observed = []
    sample(on_step=lambda k: observed.append(invardiff_cache_contents(model)["default"]))
    assert len(observed) == len(plan.step_gate)
    for k, contents in enumerate(observed[:-1]):
        assert set(contents["slots"]) == held[k], k
        assert contents["holds_h"] == gated[k + 1], k
        assert contents["step"] == k + 1
    assert observed[-1] == {"step": 0, "slots": (), "holds_h": False, "bytes": 0}
    return held
