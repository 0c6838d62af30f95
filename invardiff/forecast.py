"""Static plans that forecast: where to compute, and how to fill the steps in between (method-forecast.md).

Pure numpy, no torch and no I/O. A *forecast schedule* over ``T`` denoising steps is a compute mask (True = the
transformer's blocks run at that step) and, for every gated step ``k``, a forecast order: 0 copies the value
of the last computed step ``b``; 1 extrapolates linearly from the last two computed steps ``a < b``::

    v_k ~= v_b + (v_b - v_a) * (k - b) / (b - a)

(step-index spacing). The forecast value ``v`` is either the block stack's residual ``H - E`` or each cached
module's output; which one is the plan's ``target`` and is chosen outside this module.

Calibration measures, on deterministic uncached runs, the error each *candidate* would cause: gated step ``k``
filled from computed steps ``(a, b)`` with order ``o``, measured as the squared error of the next sampler state
``x_{k+1}`` (the rest of the model run on the true ``x_k``). Candidate errors live in two arrays, summed over
runs, so the distributed job pools them by addition exactly like the paper's rates:

* ``copy_error[k, j]``: order 0 from ``b = k - 1 - j``, ``j in [0, max_gap]``;
* ``linear_error[k, j, i]``: order 1 from ``b = k - 1 - j`` and ``a = b - 1 - i``, ``i in [0, max_gap]``.

NaN marks a candidate that does not exist (``b < 0`` or ``a < 0``). :func:`choose_schedule` then picks, by
dynamic programming over (last two computed steps), the schedule with exactly ``M`` computed steps, step 0
computed and at most ``max_gap`` consecutive gated steps, that minimises the summed candidate error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

COMPUTED = -1  # the order recorded for a computed step
ORDERS = (0, 1)
DEFAULT_MAX_GAP = 3


@dataclass(frozen=True)
class ForecastSchedule:
    """compute: bool (T,), True = computed. orders: int8 (T,), COMPUTED or the gated step's forecast order.
    cost: the summed calibrated error of the gated steps (NaN when the schedule was not chosen by error)."""

    compute: np.ndarray
    orders: np.ndarray
    cost: float = math.nan

    def __post_init__(self):
        compute = np.array(self.compute, dtype=bool)
        orders = np.array(self.orders, dtype=np.int8)
        check_schedule(compute, orders)
        compute.setflags(write=False)
        orders.setflags(write=False)
        object.__setattr__(self, "compute", compute)
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "cost", float(self.cost))

    @property
    def num_steps(self) -> int:
        return int(self.compute.size)

    @property
    def num_computed(self) -> int:
        return int(self.compute.sum())


def check_schedule(compute: np.ndarray, orders: np.ndarray) -> None:
    """Raise ValueError unless (compute, orders) is a schedule the runtime can execute."""
    if compute.ndim != 1 or compute.size == 0 or orders.shape != compute.shape:
        raise ValueError(f"compute and orders must be 1-D of one length, got {compute.shape} and {orders.shape}")
    if not compute[0]:
        raise ValueError("step 0 must be computed: there is nothing to forecast from yet")
    if np.any(orders[compute] != COMPUTED):
        raise ValueError("computed steps carry no forecast order")
    gated = np.flatnonzero(~compute)
    if np.any((orders[gated] < 0) | (orders[gated] > max(ORDERS))):
        raise ValueError(f"forecast orders must be in {list(ORDERS)}")
    for k in gated:
        if orders[k] == 1 and int(compute[:k].sum()) < 2:
            raise ValueError(f"step {k}: order 1 needs two computed steps before it")


def ideal_speedup(schedule: ForecastSchedule) -> float:
    """Counted speedup when every cached module is skipped on gated steps: steps / computed steps."""
    return schedule.num_steps / schedule.num_computed


def computed_steps_for(num_steps: int, target_speedup: float) -> int:
    """The number of computed steps whose counted speedup is at least ``target_speedup`` (and as close as can be)."""
    if not target_speedup >= 1.0:
        raise ValueError(f"target speedup must be >= 1, got {target_speedup!r}")
    return max(1, math.floor(num_steps / target_speedup + 1e-9))


def min_max_gap(num_steps: int, num_computed: int) -> int:
    """The smallest cap on consecutive gated steps for which ``num_computed`` computed steps can cover ``num_steps``."""
    if not 1 <= num_computed <= num_steps:
        raise ValueError(f"computed steps must be in [1, {num_steps}], got {num_computed}")
    return math.ceil((num_steps - num_computed) / num_computed)


def last_two(compute: np.ndarray, k: int) -> tuple[int | None, int]:
    """(a, b): the last two computed steps before step ``k`` (``a`` is None when only one exists)."""
    before = np.flatnonzero(compute[:k])
    return (int(before[-2]) if before.size > 1 else None), int(before[-1])


def forecast_gain(schedule: ForecastSchedule, k: int) -> float:
    """g of ``v_k = v_b + g (v_b - v_a)`` at gated step ``k``: 0 for order 0, ``(k - b) / (b - a)`` for order 1."""
    if schedule.compute[k]:
        raise ValueError(f"step {k} is computed")
    if schedule.orders[k] == 0:
        return 0.0
    a, b = last_two(schedule.compute, k)
    return (k - b) / (b - a)


# ----------------------------------------------------------------------------------------------------------------
# Candidates and their errors


def candidates(k: int, max_gap: int) -> Iterator[tuple[int, int, int | None, int | None]]:
    """Every (j, b, i, a) whose forecast of step ``k`` calibration measures: ``b = k - 1 - j`` for the copy
    (``i = a = None``) and each ``a = b - 1 - i`` for the linear forecast."""
    for j in range(max_gap + 1):
        b = k - 1 - j
        if b < 0:
            return
        yield j, b, None, None
        for i in range(max_gap + 1):
            a = b - 1 - i
            if a < 0:
                break
            yield j, b, i, a


def empty_errors(num_steps: int, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """(copy_error (T, G), linear_error (T, G, G)) with G = max_gap + 1: NaN where no candidate exists, 0 elsewhere
    (ready to be summed into)."""
    size = max_gap + 1
    copy_error = np.full((num_steps, size), np.nan)
    linear_error = np.full((num_steps, size, size), np.nan)
    for k in range(num_steps):
        for j, _b, i, _a in candidates(k, max_gap):
            if i is None:
                copy_error[k, j] = 0.0
            else:
                linear_error[k, j, i] = 0.0
    return copy_error, linear_error


def pool_errors(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum candidate errors in the order given. Callers pass parts in a fixed order (chunk index), so the float
    sum, and hence the plan, does not depend on how many workers produced them."""
    if not parts:
        raise ValueError("no candidate errors to pool")
    copy_error = parts[0][0].copy()
    linear_error = parts[0][1].copy()
    for copy_part, linear_part in parts[1:]:
        if copy_part.shape != copy_error.shape or linear_part.shape != linear_error.shape:
            raise ValueError("candidate errors of different shapes cannot be pooled")
        copy_error += copy_part
        linear_error += linear_part
    return copy_error, linear_error


# ----------------------------------------------------------------------------------------------------------------
# Schedules


def choose_schedule(
    copy_error: np.ndarray,
    linear_error: np.ndarray,
    num_computed: int,
    *,
    max_gap: int = DEFAULT_MAX_GAP,
    orders: Sequence[int] = ORDERS,
) -> ForecastSchedule:
    """The schedule with exactly ``num_computed`` computed steps (step 0 among them), at most ``max_gap``
    consecutive gated steps and orders from ``orders``, that minimises the summed candidate error.

    Dynamic programming over states (b, a) = the last two computed steps: the cost of the gated steps between
    two computed steps depends only on those two and the one before. Ties go to the earlier-computed schedule.
    """
    num_steps, size = copy_error.shape
    if max_gap + 1 > size or linear_error.shape != (num_steps, size, size):
        raise ValueError(f"errors were measured for max_gap <= {size - 1}, asked for {max_gap}")
    if not set(orders) <= set(ORDERS) or 0 not in orders:
        raise ValueError(f"orders must include 0 and come from {list(ORDERS)}, got {list(orders)}")
    if not 1 <= num_computed <= num_steps:
        raise ValueError(f"computed steps must be in [1, {num_steps}], got {num_computed}")
    if min_max_gap(num_steps, num_computed) > max_gap:
        needed = min_max_gap(num_steps, num_computed)
        raise ValueError(
            f"{num_computed} computed steps of {num_steps} need runs of up to {needed} gated steps; max_gap is {max_gap}"
        )
    use_linear = 1 in orders

    def gated_cost(a: int | None, b: int, k: int) -> tuple[float, int]:
        """Best (error, order) for gated step k filled from (a, b)."""
        best = (copy_error[k, k - 1 - b], 0)
        if use_linear and a is not None:
            linear = linear_error[k, k - 1 - b, b - 1 - a]
            if linear < best[0]:
                best = (linear, 1)
        if math.isnan(best[0]):
            raise ValueError(f"no candidate error measured for step {k} from steps {a}, {b}")
        return best

    def run_cost(a: int | None, b: int, end: int) -> float:
        return sum(gated_cost(a, b, k)[0] for k in range(b + 1, end))

    # best[(b, a)] after m computed steps: (cost, previous state); a is None only for the first computed step.
    layers: list[dict[tuple[int, int | None], tuple[float, tuple | None]]] = [{(0, None): (0.0, None)}]
    for _m in range(1, num_computed):
        nxt: dict[tuple[int, int | None], tuple[float, tuple | None]] = {}
        for (b, a), (cost, _prev) in layers[-1].items():
            for c in range(b + 1, min(b + max_gap + 2, num_steps)):
                total = cost + run_cost(a, b, c)
                if (c, b) not in nxt or total < nxt[(c, b)][0]:
                    nxt[(c, b)] = (total, (b, a))
        layers.append(nxt)
    finals = [
        (cost + run_cost(a, b, num_steps), (b, a))
        for (b, a), (cost, _prev) in layers[-1].items()
        if num_steps - 1 - b <= max_gap
    ]
    if not finals:
        raise ValueError(f"no schedule with {num_computed} computed steps and max_gap {max_gap}")
    cost, state = min(finals, key=lambda item: (item[0], item[1][0]))

    computed = []
    for layer in reversed(layers):
        computed.append(state[0])
        state = layer[state][1]
    compute = np.zeros(num_steps, dtype=bool)
    compute[computed] = True
    return ForecastSchedule(compute, _best_orders(compute, gated_cost), cost)


def _best_orders(compute: np.ndarray, gated_cost) -> np.ndarray:
    orders = np.full(compute.size, COMPUTED, dtype=np.int8)
    for k in np.flatnonzero(~compute):
        a, b = last_two(compute, int(k))
        orders[k] = gated_cost(a, b, int(k))[1]
    return orders


def uniform_schedule(num_steps: int, num_computed: int, *, order: int = 1) -> ForecastSchedule:
    """Computed steps spread evenly from step 0 (the "uniform spacing + forecast" baseline); every gated step uses
    ``order`` where two computed steps exist, else copies."""
    if not 1 <= num_computed <= num_steps:
        raise ValueError(f"computed steps must be in [1, {num_steps}], got {num_computed}")
    computed = np.unique(np.floor(np.arange(num_computed) * num_steps / num_computed).astype(int))
    compute = np.zeros(num_steps, dtype=bool)
    compute[computed] = True
    orders = np.full(num_steps, COMPUTED, dtype=np.int8)
    for k in np.flatnonzero(~compute):
        a, _b = last_two(compute, int(k))
        orders[k] = order if a is not None else 0
    return ForecastSchedule(compute, orders)


def schedule_error(copy_error: np.ndarray, linear_error: np.ndarray, schedule: ForecastSchedule) -> float:
    """The summed candidate error of any schedule (for comparing uniform and chosen ones on one calibration)."""
    total = 0.0
    for k in np.flatnonzero(~schedule.compute):
        a, b = last_two(schedule.compute, int(k))
        j = int(k) - 1 - b
        if j >= copy_error.shape[1]:
            return math.inf  # a longer gap than calibration measured
        if schedule.orders[k] == 0:
            total += copy_error[k, j]
        else:
            i = b - 1 - a
            total += linear_error[k, j, i] if i < linear_error.shape[2] else math.inf
    return float(total)


def orders_text(schedule: ForecastSchedule) -> str:
    """One character per step: '-' computed, else the gated step's order (how plans store it)."""
    return "".join("-" if o == COMPUTED else str(int(o)) for o in schedule.orders)


def parse_orders(text: str) -> ForecastSchedule:
    """Inverse of :func:`orders_text`."""
    if not text or any(ch != "-" and not ch.isdigit() for ch in text):
        raise ValueError(f"forecast orders: expected '-' or a digit per step, got {text!r}")
    orders = np.array([COMPUTED if ch == "-" else int(ch) for ch in text], dtype=np.int8)
    return ForecastSchedule(orders == COMPUTED, orders)
