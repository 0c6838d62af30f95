"""InvarDiff calibration math: relative change rates, quantile thresholds and cache books.

Pure numpy, no torch and no I/O; the torch recorder and the calibration job call into this module.
Conventions (docs/contracts.md, method spec §3-§5):

* Row ``k`` of every array is denoising step ``k`` in execution order (0 = noisiest); ``T`` steps.
* A *stream* is one feature sequence ``Z[0..T-1]``: a module family of one layer, or the step feature ``H``.
* ``rho`` arrays are float64, ``(T,)`` for ``"step"`` and ``(T, L)`` for a module family.
* Books (masks) are bool with the same shapes; ``True`` means *reuse the cached value at this step*.
* ``rho[j]`` compares the ``j -> j+1`` change with the ``j-1 -> j`` change (paper-era look-ahead
  alignment). Rows 0 and ``T-1`` hold the placeholder 1.0 and are never reuse candidates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

EPS = 1e-8
STEP = "step"
RATE_VARIANT = "l1-ratio"  # rho[j] = |Z[j+1] - Z[j]|_1 / |Z[j] - Z[j-1]|_1, the paper-era definition (§10.1)
BookMode = Literal["full", "dit-legacy"]
BOOK_MODES: tuple[str, ...] = ("full", "dit-legacy")

Books = tuple[np.ndarray, dict[str, np.ndarray]]  # (step_gate bool[T], {family: bool[T, L]})


# --------------------------------------------------------------------------------------------------
# Rates


def l1_distance(a: np.ndarray, b: np.ndarray, eps: float = EPS) -> float:
    """``sum |a - b + eps|`` over all elements, in float64. ``a`` and ``b`` share any shape.

    ``eps`` goes inside the abs, as in the reference code: it only keeps ``0 / 0`` out of the ratio.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.abs(diff + eps).sum())


def step_sizes(features: np.ndarray, eps: float = EPS) -> np.ndarray:
    """L1 size of every step of one stream of one run.

    features: ``(T, ...)``, the stream's feature at each step.
    Returns ``d``: float64 ``(T,)`` with ``d[0] = nan`` and ``d[k] = sum |Z[k] - Z[k-1] + eps|``.
    """
    z = np.asarray(features, dtype=np.float64)
    d = np.full(z.shape[0], np.nan)
    if z.shape[0] > 1:
        d[1:] = np.abs(z[1:] - z[:-1] + eps).reshape(z.shape[0] - 1, -1).sum(axis=1)
    return d


class RateTracker:
    """The rate bookkeeping of one stream, consumed one step at a time (§3.2 and §5).

    The tracker never sees features, so the same state machine serves the offline reference
    (:func:`rates`) and the online torch recorder. The caller keeps one *anchor* feature per stream;
    the tracker keeps the last step size ``dprev`` and the ``run`` flag of §5.

    Driving it, for ``k = 0 .. T-1`` with ``z`` the stream's feature at step ``k``::

        distance = None if k == 0 else l1(z, anchor)     # sum |z - anchor + eps|, accumulated in fp32+
        if tracker.update(distance):
            anchor = z                                     # (a detached copy, if z may be overwritten)
        ...
        rho = tracker.rates                                # float64 (T,), complete after T updates

    With no provisional mask every step refreshes the anchor, which gives the phase-1 rate
    ``rho[j] = d[j+1] / d[j]``. With the phase-1 provisional mask (True = reused at that row), a run
    of reused rows starting at row ``j`` freezes the anchor on ``Z[j+1]`` (and ``dprev`` on the step
    into it) until the run ends, so the later members of the run are rated by the displacement
    accumulated from that anchor: the phase-2 resampling correction. In the §5 example (rows 5-8
    reused) the anchor is ``Z6`` for rows 6-9 and row 10 is rated against ``|Z10 - Z6|``.
    """

    def __init__(self, num_steps: int, provisional: Sequence[bool] | np.ndarray | None = None):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if provisional is None:
            provisional = np.zeros(num_steps, dtype=bool)
        provisional = np.asarray(provisional, dtype=bool)
        if provisional.shape != (num_steps,):
            raise ValueError(f"provisional mask must have shape ({num_steps},), got {provisional.shape}")
        self.num_steps = num_steps
        self.provisional = provisional
        self.rates = np.full(num_steps, np.nan)
        self.rates[[0, -1]] = 1.0  # placeholders, never reuse candidates
        self.step = 0
        self._dprev = math.nan
        self._in_run = False

    @property
    def done(self) -> bool:
        return self.step == self.num_steps

    def update(self, distance: float | None) -> bool:
        """Record step ``self.step``; return True when the caller must make this step's feature the anchor.

        distance: ``None`` at step 0 (there is no anchor yet), afterwards ``l1(z_k, anchor)``.
        """
        k = self.step
        if k >= self.num_steps:
            raise RuntimeError(f"RateTracker already consumed all {self.num_steps} steps")
        if (distance is None) != (k == 0):
            raise ValueError(f"step {k}: distance must be {'None' if k == 0 else 'a float'}, got {distance!r}")
        refresh = True
        if k >= 2:
            with np.errstate(divide="ignore", invalid="ignore"):  # only reachable with eps = 0
                self.rates[k - 1] = np.float64(distance) / self._dprev
            if not self.provisional[k - 1]:
                self._in_run = False
            elif not self._in_run:
                self._in_run = True  # first reused row of a run: anchor on it, then freeze
            else:
                refresh = False
        if refresh and k >= 1:
            self._dprev = float(distance)
        self.step += 1
        return refresh


def rates(features: np.ndarray, provisional: Sequence[bool] | np.ndarray | None = None, eps: float = EPS) -> np.ndarray:
    """Reference rate of one stream of one run.

    features: ``(T, ...)``. provisional: ``None`` for phase 1, or bool ``(T,)``, the phase-1 provisional
    book of this stream (True = reused), for the phase-2 corrected rate.
    Returns float64 ``(T,)``; rows 0 and ``T-1`` are 1.0.
    """
    z = np.asarray(features)
    tracker = RateTracker(z.shape[0], provisional)
    anchor = None
    for z_k in z:
        if tracker.update(None if anchor is None else l1_distance(z_k, anchor, eps)):
            anchor = z_k
    return tracker.rates


def mean_rates(per_run: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Elementwise arithmetic mean over runs of per-run rates (a mean of ratios, not a ratio of means).

    per_run: ``(R, T, ...)`` or a sequence of R arrays ``(T, ...)``. Returns float64 ``(T, ...)``.
    """
    stacked = np.asarray(per_run, dtype=np.float64)
    if stacked.ndim < 2 or stacked.shape[0] == 0:
        raise ValueError(f"need at least one run of shape (T, ...), got an array of shape {stacked.shape}")
    return stacked.mean(axis=0)


# --------------------------------------------------------------------------------------------------
# Thresholds and books


def quantile_threshold(rho: np.ndarray, tau: float) -> float:
    """``tau``-quantile of the interior rows ``1..T-2`` of ``rho`` (``(T,)`` or ``(T, L)``), pooled over layers.

    NaNs (absent modules) are dropped; linear interpolation, as ``torch.quantile``. Returns nan when
    no finite interior value exists, which reuses nothing.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    interior = np.asarray(rho, dtype=np.float64)[1:-1].ravel()
    interior = interior[~np.isnan(interior)]
    if interior.size == 0:
        return math.nan
    return float(np.quantile(interior, tau, method="linear"))


def threshold_books(rho_by_family: Mapping[str, np.ndarray], taus: Mapping[str, float]) -> dict[str, np.ndarray]:
    """§4.1: one global threshold per family; reuse where ``rho < theta`` (strict), interior rows only.

    rho_by_family: ``{"step": (T,), family: (T, L)}`` (any subset). taus: a ``tau`` for every key.
    Returns bool masks with the shapes of ``rho_by_family``. Strictness makes ``tau = 0`` disable a
    family (nothing lies below the minimum) and ``tau = 1`` reuse everything but the maximum.
    """
    missing = [name for name in rho_by_family if name not in taus]
    if missing:
        raise KeyError(f"no tau for {missing}; taus has {sorted(taus)}")
    books = {}
    for name, rho in rho_by_family.items():
        rho = np.asarray(rho, dtype=np.float64)
        book = np.zeros(rho.shape, dtype=bool)
        book[1:-1] = rho[1:-1] < quantile_threshold(rho, taus[name])
        books[name] = book
    return books


def warmup_steps(num_steps: int, nonskip_rate: float) -> int:
    """Number of leading steps forced to compute: ``max(1, floor(nonskip_rate * T))``, at most T."""
    if not 0.0 <= nonskip_rate <= 1.0:
        raise ValueError(f"nonskip_rate must lie in [0, 1], got {nonskip_rate}")
    return min(num_steps, max(1, math.floor(nonskip_rate * num_steps)))


def apply_forcing(step_gate: np.ndarray, modules: Mapping[str, np.ndarray], nonskip_rate: float) -> Books:
    """§4.2: warm-up rows ``j < n_warm`` and the last row compute everything. Inputs are not modified.

    step_gate: bool ``(T,)``; modules: ``{family: bool (T, L)}``. Returns new ``(step_gate, modules)``.
    """
    step_gate = np.array(step_gate, dtype=bool)
    num_steps = _check_rows(step_gate, modules)
    forced = np.zeros(num_steps, dtype=bool)
    forced[: warmup_steps(num_steps, nonskip_rate)] = True
    forced[-1] = True
    step_gate[forced] = False
    forced_modules = {}
    for family, book in modules.items():
        book = np.array(book, dtype=bool)
        book[forced] = False
        forced_modules[family] = book
    return step_gate, forced_modules


def consolidate_step_gate(step_gate: np.ndarray, modules: Mapping[str, np.ndarray]) -> Books:
    """§4.3: a gated row reuses every module; the first row after a gated run recomputes every module.

    This is the ascending loop of the reference code in closed form: rows inside a run of gated steps
    stay all-reuse because each is re-set when visited, so only the row that ends a run is cleared.
    step_gate: bool ``(T,)``; modules: ``{family: bool (T, L)}``. Returns new ``(step_gate, modules)``.
    """
    step_gate = np.array(step_gate, dtype=bool)
    _check_rows(step_gate, modules)
    ends_run = np.zeros_like(step_gate)
    ends_run[1:] = step_gate[:-1] & ~step_gate[1:]
    consolidated = {}
    for family, book in modules.items():
        book = np.array(book, dtype=bool)
        book[step_gate] = True
        book[ends_run] = False
        consolidated[family] = book
    return step_gate, consolidated


def build_books(
    rho_mean: Mapping[str, np.ndarray],
    taus: Mapping[str, float],
    nonskip_rate: float,
    mode: BookMode = "full",
) -> Books:
    """Cache books from mean rates: §4.1 thresholds, §4.2 forcing, then (mode ``"full"``) §4.3 consolidation.

    rho_mean: ``{"step": (T,), family: (T, L)}``; taus: a ``tau`` for ``"step"`` and every family.
    mode: ``"full"`` for final plans and the recommended provisional plan; ``"dit-legacy"`` skips the
    consolidation, as the paper-era DiT provisional plan did.
    Returns ``(step_gate bool (T,), {family: bool (T, L)})`` with families in ``rho_mean`` order.
    """
    if mode not in BOOK_MODES:
        raise ValueError(f"mode must be one of {BOOK_MODES}, got {mode!r}")
    if STEP not in rho_mean:
        raise KeyError(f"rho_mean needs a {STEP!r} entry, has {list(rho_mean)}")
    books = threshold_books(rho_mean, taus)
    step_gate = books.pop(STEP)
    step_gate, modules = apply_forcing(step_gate, books, nonskip_rate)
    if mode == "full":
        step_gate, modules = consolidate_step_gate(step_gate, modules)
    return step_gate, modules


def provisional_books(
    rho_phase1: Mapping[str, np.ndarray],
    taus: Mapping[str, float],
    nonskip_rate: float,
    provisional_mode: BookMode = "full",
) -> Books:
    """Phase-1 provisional plan ``P1`` whose books drive the phase-2 rate correction (§5).

    ``"full"`` (default, the Wan procedure that §10.3 recommends) or ``"dit-legacy"`` (warm-up and last
    step forced, no consolidation). Stream ``(family, l)`` is corrected with ``modules[family][:, l]``,
    the step stream with ``step_gate``. Shapes as in :func:`build_books`.
    """
    return build_books(rho_phase1, taus, nonskip_rate, mode=provisional_mode)


def _check_rows(step_gate: np.ndarray, modules: Mapping[str, np.ndarray]) -> int:
    num_steps = step_gate.shape[0]
    if step_gate.ndim != 1 or num_steps < 1:
        raise ValueError(f"step_gate must have shape (T,) with T >= 1, got {step_gate.shape}")
    for family, book in modules.items():
        shape = np.shape(book)
        if len(shape) != 2 or shape[0] != num_steps:
            raise ValueError(f"modules[{family!r}] must have shape ({num_steps}, L), got {shape}")
    return num_steps


# --------------------------------------------------------------------------------------------------
# Summaries


def bits(mask: np.ndarray) -> str:
    """A bool ``(N,)`` mask as a ``"0011..."`` string, 1 = reuse (the notation of the shipped plans)."""
    return "".join("1" if b else "0" for b in np.asarray(mask, dtype=bool).ravel())


def gated_steps(step_gate: np.ndarray) -> list[int]:
    """Indices of the steps whose blocks are skipped entirely."""
    return np.flatnonzero(np.asarray(step_gate, dtype=bool)).tolist()


def longest_run(step_gate: np.ndarray) -> int:
    """Length of the longest stretch of consecutive gated steps (the drift the correction fights)."""
    longest = current = 0
    for gated in np.asarray(step_gate, dtype=bool):
        current = current + 1 if gated else 0
        longest = max(longest, current)
    return longest


def effective_modules(modules: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reuse the runtime actually performs: FLUX's joint attention is skipped only when both
    ``attn`` and ``context_attn`` say reuse (§4.4), so both books become their AND."""
    effective = {family: np.asarray(book, dtype=bool) for family, book in modules.items()}
    if "attn" in effective and "context_attn" in effective:
        joint = effective["attn"] & effective["context_attn"]
        effective["attn"] = effective["context_attn"] = joint
    return effective


def reuse_share(step_gate: np.ndarray, modules: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Share of each family's ``(T, L)`` grid marked reuse, as in the §4.6 table.

    ``grid``: all reused cells / ``T*L``. ``non_gated_rows``: reused cells in rows that are not
    step-gated, also divided by ``T*L`` (so ``grid = gated/T + non_gated_rows`` after consolidation);
    it is the genuinely layer-wise reuse, since gated rows are all-reuse bookkeeping.
    """
    step_gate = np.asarray(step_gate, dtype=bool)
    shares = {}
    for family, book in modules.items():
        book = np.asarray(book, dtype=bool)
        cells = book.size or 1
        shares[family] = {
            "grid": float(book.sum() / cells),
            "non_gated_rows": float(book[~step_gate].sum() / cells),
        }
    return shares


def ideal_speedup(
    step_gate: np.ndarray,
    modules: Mapping[str, np.ndarray],
    costs: Mapping[str, float] | None = None,
) -> float:
    """Upper bound on the speedup: module evaluations of full compute / module evaluations performed.

    A cell ``(k, l, family)`` is evaluated unless step ``k`` is gated or the (effective) book reuses it.
    costs: relative cost of one evaluation per family (default 1 each). Embeddings, norms, gates and
    the head are ignored, so real speedups are lower. With no module families, counts whole steps.
    """
    step_gate = np.asarray(step_gate, dtype=bool)
    _check_rows(step_gate, modules)
    if not modules:
        computed_steps = int((~step_gate).sum())
        return math.inf if computed_steps == 0 else step_gate.size / computed_steps
    costs = costs or {}
    total = performed = 0.0
    for family, book in effective_modules(modules).items():
        weight = float(costs.get(family, 1.0))
        total += weight * book.size
        performed += weight * (~book & ~step_gate[:, None]).sum()
    return math.inf if performed == 0 else float(total / performed)
