"""Cache policies besides InvarDiff's calibrated plans, Learning-to-Cache (`l2c`) and DiCache (`dicache`), and
`make_policy`, which builds any of the four policies by name.

    l2c       a router trained offline (`invardiff train-router`), thresholded into a static plan that the
              InvarDiff runtime executes                                              -> invardiff.policies.l2c
    dicache   decided online at every step by a shallow probe; no plan              -> invardiff.policies.dicache
"""

from __future__ import annotations

from typing import Any

POLICIES = ("none", "invardiff", "l2c", "dicache")
DICACHE_DEFAULT_THRESHOLD = 0.1  # HunyuanVideo's delta (method doc §2.6); on the digits model see BENCHMARKS.md §6


def make_policy(
    name: str,
    *,
    plan: Any = None,
    num_steps: int | None = None,
    threshold: float | None = None,
    batch_mode: str = "row",
):
    """The policy `name`: `none`; `invardiff` and `l2c` run `plan` (an `invardiff.plan.Plan`; for `l2c` one
    written by router training); `dicache` needs the sampler's `num_steps` and takes `threshold` and
    `batch_mode` (`row` or `global`)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    if name in ("invardiff", "l2c") and plan is None:
        raise ValueError(f"policy {name!r} needs a plan" + (" (from `invardiff train-router`)" if name == "l2c" else ""))
    if name in ("none", "dicache") and plan is not None:
        raise ValueError(f"policy {name!r} takes no plan")
    if name == "none":
        from ..policy import NoCache

        return NoCache()
    if name == "invardiff":
        from ..policy import InvarDiffPolicy

        return InvarDiffPolicy(plan)
    if name == "l2c":
        from .l2c import L2CPolicy

        return L2CPolicy(plan)
    if num_steps is None:
        raise ValueError("policy 'dicache' needs the sampler's number of steps")
    from .dicache import DiCachePolicy

    return DiCachePolicy(DICACHE_DEFAULT_THRESHOLD if threshold is None else threshold, num_steps, batch_mode=batch_mode)


SPEC_FORMAT = "invardiff-policy/1"


def policy_spec_json(name: str, **options: Any) -> str:
    """The JSON a job ships to its workers for a policy without a plan (`dicache`): name and options."""
    import json

    if name != "dicache":
        raise ValueError(f"only plan-less policies have a spec; {name!r} ships its plan")
    return json.dumps({"format": SPEC_FORMAT, "policy": name, **options}, sort_keys=True)


def policy_from_json(text: str | None, *, num_steps: int | None = None):
    """The policy a job's workers run, from what the driver shipped: None (no caching), a plan document
    (`invardiff`, or `l2c` when the plan's calibration record says it came from router training), or a spec
    written by `policy_spec_json`. `num_steps` is the worker's sampler step count (DiCache needs it)."""
    import json

    if text is None:
        return make_policy("none")
    doc = json.loads(text)
    if doc.get("format") == SPEC_FORMAT:
        options = {k: v for k, v in doc.items() if k not in ("format", "policy")}
        return make_policy(doc["policy"], num_steps=num_steps, **options)
    from ..plan import Plan

    plan = Plan.from_dict(doc)
    return make_policy("l2c" if plan.calibration.get("method") == "l2c" else "invardiff", plan=plan)
