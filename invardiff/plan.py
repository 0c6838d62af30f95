"""The InvarDiff cache plan: which module outputs to reuse at which step, and for which pipeline.

In memory a :class:`Plan` holds numpy arrays (docs/contracts.md): ``step_gate`` bool ``(T,)``,
``modules[family]`` bool ``(T, L)``, ``rho_phase1/2`` float64 ``{"step": (T,), family: (T, L)}``;
True means reuse, row ``k`` is denoising step ``k``. On disk it is one JSON document: bit strings for the
books so a plan can be read by eye, exact floats for the rates, and a checksum so an edited file is refused
rather than silently run.

A plan's ``mode`` says how the work it skips is filled:

* ``paper``: the InvarDiff method exactly. A gated step reuses H of the last computed step; a reused module
  returns its last computed output. Written as ``invardiff-plan/1`` (``plan_schema.json``), byte for byte
  what earlier versions wrote, so existing plans, stores and checksums stay valid.
* ``forecast``: a gated step is filled by forecasting from the last two computed steps
  (``invardiff.forecast``), either the block stack's residual ``H - E`` (``target: residual``) or every
  cached module's output (``target: modules``), with one order per gated step. Written as
  ``invardiff-plan/2`` (``plan_schema_v2.json``), which adds ``mode`` and ``forecast``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import fsspec
import jsonschema
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from invardiff.forecast import ForecastSchedule, orders_text, parse_orders
from invardiff.calibration import (
    STEP,
    Books,
    bits,
    build_books,
    gated_steps,
    ideal_speedup,
    longest_run,
    reuse_share,
    warmup_steps,
)

FORMAT = "invardiff-plan/1"  # paper-mode plans
FORMAT_V2 = "invardiff-plan/2"  # plans with a forecast section
FORMATS = (FORMAT, FORMAT_V2)
MODES = ("paper", "forecast")
FORECAST_TARGETS = ("residual", "modules")
ARCHITECTURES = ("dit", "flux")
GUIDANCE_MODES = ("cfg-batched", "cfg-separate", "distilled", "none")
DTYPES = ("float32", "bfloat16", "float16")
SCHEMA_PATH = Path(__file__).with_name("plan_schema.json")
SCHEMA_PATHS = {FORMAT: SCHEMA_PATH, FORMAT_V2: Path(__file__).with_name("plan_schema_v2.json")}
# created_at as the schema accepts it: ISO-8601, UTC
_UTC_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|\+00:00)")


class PlanError(ValueError):
    """A plan (file or object) that is malformed, internally inconsistent or modified after it was written."""


class PlanMismatchError(ValueError):
    """A valid plan offered to a pipeline it was not calibrated for.

    ``mismatches`` holds ``(field, plan_value, pipeline_value)`` for every differing signature field.
    """

    def __init__(self, plan_id: str, mismatches: Sequence[tuple[str, Any, Any]]):
        self.plan_id = plan_id
        self.mismatches = tuple(mismatches)
        details = "; ".join(
            f"{name}: plan has {planned!r}, pipeline has {actual!r}" for name, planned, actual in mismatches
        )
        count = len(self.mismatches)
        super().__init__(f"plan {plan_id} was calibrated for a different pipeline ({count} field(s) differ): {details}")

    def __reduce__(self):  # keeps the exception picklable (Ray ships exceptions between processes)
        return type(self), (self.plan_id, self.mismatches)


# --------------------------------------------------------------------------------------------------
# Signature


@dataclass(frozen=True)
class PipelineSignature:
    """Everything a plan depends on. Two pipelines may share a plan only if all fields but ``model_id`` match."""

    architecture: str  # "dit" | "flux"
    model_id: str  # informative only
    model_fingerprint: str  # "sha256:..." of the weights (LoRA included)
    scheduler: str  # scheduler class name
    num_inference_steps: int
    height: int
    width: int
    guidance_mode: str  # "cfg-batched" | "cfg-separate" | "distilled" | "none"
    guidance_scale: float
    dtype: str  # "float32" | "bfloat16" | "float16"
    layers: Mapping[str, int]  # {family: L}, families in forward order

    def __post_init__(self):
        _require_choice("signature.architecture", self.architecture, ARCHITECTURES)
        _require_choice("signature.guidance_mode", self.guidance_mode, GUIDANCE_MODES)
        _require_choice("signature.dtype", self.dtype, DTYPES)
        if not str(self.model_fingerprint).startswith("sha256:"):
            raise ValueError(f"signature.model_fingerprint: expected 'sha256:<hex>', got {self.model_fingerprint!r}")
        for name in ("num_inference_steps", "height", "width"):
            object.__setattr__(self, name, _positive_int(f"signature.{name}", getattr(self, name)))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        # A plain dict (not a read-only proxy) so the signature pickles; the frozen dataclass guards the rest.
        layers = {str(f): _positive_int(f"signature.layers.{f}", n) for f, n in dict(self.layers).items()}
        if STEP in layers:
            raise ValueError(f"signature.layers: {STEP!r} is reserved for the step gate, not a module family")
        object.__setattr__(self, "layers", layers)

    def __hash__(self) -> int:
        # frozenset: dict equality ignores key order, so the hash must too
        values = {**self.to_dict(), "layers": frozenset(self.layers.items())}
        return hash(tuple(values.items()))

    def mismatches(self, other: PipelineSignature) -> list[tuple[str, Any, Any]]:
        """``(field, self_value, other_value)`` for every field but ``model_id`` that differs."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if f.name != "model_id" and getattr(self, f.name) != getattr(other, f.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dict(self.layers) if f.name == "layers" else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineSignature:
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True, eq=False, repr=False)
class Plan:
    """A cache plan. Arrays are copied and made read-only on construction so ``checksum`` stays true."""

    signature: PipelineSignature
    taus: Mapping[str, float]  # {"step": tau, family: tau, ...}
    nonskip_rate: float
    step_gate: np.ndarray  # bool (T,)
    modules: Mapping[str, np.ndarray]  # {family: bool (T, L)}
    rho_phase1: Mapping[str, np.ndarray] | None = None  # {"step": (T,), family: (T, L)}, or None if not recorded
    rho_phase2: Mapping[str, np.ndarray] | None = None
    calibration: Mapping[str, Any] = field(default_factory=dict)  # inputs, seeds, runs, phases, modes, preset...
    created_at: str | None = None  # ISO-8601 UTC; None means now
    mode: str = "paper"  # "paper" | "forecast"
    forecast: Mapping[str, Any] | None = None  # forecast mode: {"target": "residual"|"modules", "orders": "-1-0..."}
    plan_id: str = field(init=False)  # first 12 hex digits of the checksum
    checksum: str = field(init=False)  # "sha256:<hex>" of the canonical JSON without plan_id and checksum

    def __post_init__(self):
        def set_(name: str, value: Any) -> None:  # the dataclass is frozen; normalise once, here
            object.__setattr__(self, name, value)

        signature = self.signature
        if not isinstance(signature, PipelineSignature):
            raise PlanError(f"signature: expected a PipelineSignature, got {type(signature).__name__}")
        num_steps, families = signature.num_inference_steps, list(signature.layers)
        names = [STEP, *families]
        shapes = {STEP: (num_steps,), **{family: (num_steps, n) for family, n in signature.layers.items()}}

        set_("step_gate", _frozen(self.step_gate, bool, "step_gate", shapes[STEP]))
        _require_keys("modules", self.modules, families)
        set_("modules", {f: _frozen(self.modules[f], bool, f"modules.{f}", shapes[f]) for f in families})
        _require_keys("taus", self.taus, names)
        set_("taus", {name: _fraction(f"taus.{name}", self.taus[name]) for name in names})
        set_("nonskip_rate", _fraction("nonskip_rate", self.nonskip_rate))
        for phase in ("rho_phase1", "rho_phase2"):
            rho = getattr(self, phase)
            if rho is not None:
                _require_keys(phase, rho, names)
                rho = {name: _frozen(rho[name], np.float64, f"{phase}.{name}", shapes[name]) for name in names}
            set_(phase, rho)
        set_("calibration", _json_copy("calibration", self.calibration))
        set_("created_at", _utc_timestamp(self.created_at))
        set_("forecast", _check_forecast(self.mode, self.forecast, self.step_gate))

        checksum = "sha256:" + hashlib.sha256(_canonical_json(self._content())).hexdigest()
        set_("checksum", checksum)
        set_("plan_id", checksum.removeprefix("sha256:")[:12])

    # ---- constructors

    @classmethod
    def all_compute(cls, signature: PipelineSignature, *, created_at: str | None = None) -> Plan:
        """A plan that reuses nothing: runs through the cache machinery must match uncached runs exactly."""
        steps = signature.num_inference_steps
        return cls(
            signature=signature,
            taus={STEP: 0.0, **{family: 0.0 for family in signature.layers}},
            nonskip_rate=0.0,
            step_gate=np.zeros(steps, dtype=bool),
            modules={family: np.zeros((steps, n), dtype=bool) for family, n in signature.layers.items()},
            calibration={"method": "all-compute"},
            created_at=created_at,
        )

    @classmethod
    def from_forecast(
        cls,
        signature: PipelineSignature,
        schedule: ForecastSchedule,
        *,
        target: str,
        modules: Mapping[str, np.ndarray] | None = None,
        taus: Mapping[str, float] | None = None,
        calibration: Mapping[str, Any] | None = None,
        created_at: str | None = None,
    ) -> Plan:
        """A forecast-mode plan: ``schedule`` says which steps compute and each gated step's order; ``modules``
        (default: reuse nothing) are the paper's layer-wise books applied on computed steps."""
        steps = signature.num_inference_steps
        if schedule.num_steps != steps:
            raise PlanError(f"forecast schedule has {schedule.num_steps} steps, the signature {steps}")
        if modules is None:
            modules = {family: np.zeros((steps, n), dtype=bool) for family, n in signature.layers.items()}
        return cls(
            signature=signature,
            taus=taus or {STEP: 0.0, **{family: 0.0 for family in signature.layers}},
            nonskip_rate=0.0,
            step_gate=~schedule.compute,
            modules=modules,
            calibration=calibration or {},
            created_at=created_at,
            mode="forecast",
            forecast={"target": target, "orders": orders_text(schedule)},
        )

    @classmethod
    def from_books(
        cls,
        signature: PipelineSignature,
        books: Books,
        *,
        taus: Mapping[str, float],
        nonskip_rate: float,
        rho_phase1: Mapping[str, np.ndarray] | None = None,
        rho_phase2: Mapping[str, np.ndarray] | None = None,
        calibration: Mapping[str, Any] | None = None,
        created_at: str | None = None,
    ) -> Plan:
        """A plan from ``(step_gate, modules)`` as returned by :func:`invardiff.calibration.build_books`."""
        step_gate, modules = books
        return cls(
            signature=signature,
            taus=taus,
            nonskip_rate=nonskip_rate,
            step_gate=step_gate,
            modules=modules,
            rho_phase1=rho_phase1,
            rho_phase2=rho_phase2,
            calibration=calibration or {},
            created_at=created_at,
        )

    @classmethod
    def from_rates(
        cls,
        signature: PipelineSignature,
        rho_phase2: Mapping[str, np.ndarray],
        *,
        taus: Mapping[str, float],
        nonskip_rate: float,
        rho_phase1: Mapping[str, np.ndarray] | None = None,
        calibration: Mapping[str, Any] | None = None,
        created_at: str | None = None,
    ) -> Plan:
        """The final plan of §5: threshold the corrected rates, force, consolidate."""
        books = build_books(rho_phase2, taus, nonskip_rate, mode="full")
        return cls.from_books(
            signature,
            books,
            taus=taus,
            nonskip_rate=nonskip_rate,
            rho_phase1=rho_phase1,
            rho_phase2=rho_phase2,
            calibration=calibration,
            created_at=created_at,
        )

    # ---- use

    @property
    def num_steps(self) -> int:
        return self.signature.num_inference_steps

    @property
    def format(self) -> str:
        return FORMAT if self.mode == "paper" else FORMAT_V2

    @property
    def forecast_schedule(self) -> ForecastSchedule | None:
        """The compute mask and per-step orders of a forecast-mode plan; None in paper mode."""
        return None if self.forecast is None else parse_orders(self.forecast["orders"])

    def check_compatible(self, signature: PipelineSignature) -> None:
        """Raise :class:`PlanMismatchError` naming every field (but ``model_id``) where ``signature`` differs."""
        mismatches = self.signature.mismatches(signature)
        if mismatches:
            raise PlanMismatchError(self.plan_id, mismatches)

    def summary(self) -> dict[str, Any]:
        """The numbers one looks at first (§4.6): gated steps, reuse shares, longest gated run, ideal speedup."""
        return {
            "plan_id": self.plan_id,
            "mode": self.mode,
            "forecast": dict(self.forecast) if self.forecast else None,
            "architecture": self.signature.architecture,
            "steps": self.num_steps,
            "nonskip_rate": self.nonskip_rate,
            "warmup_steps": warmup_steps(self.num_steps, self.nonskip_rate),
            "taus": dict(self.taus),
            "gated_steps": len(gated_steps(self.step_gate)),
            "step_gate": bits(self.step_gate),
            "longest_gated_run": longest_run(self.step_gate),
            "reuse_share": reuse_share(self.step_gate, self.modules),
            "ideal_speedup": ideal_speedup(self.step_gate, self.modules),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickling (Ray's object store) bypasses __post_init__; keep the arrays read-only on the other side
        self.__dict__.update(state)
        rates = [*(self.rho_phase1 or {}).values(), *(self.rho_phase2 or {}).values()]
        for array in (self.step_gate, *self.modules.values(), *rates):
            array.setflags(write=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and other.checksum == self.checksum

    def __hash__(self) -> int:
        return hash(self.checksum)

    def __repr__(self) -> str:
        if self.forecast is not None:
            return (
                f"Plan(plan_id={self.plan_id!r}, mode='forecast', target={self.forecast['target']!r}, "
                f"architecture={self.signature.architecture!r}, steps={self.num_steps}, "
                f"orders={self.forecast['orders']!r})"
            )
        return (
            f"Plan(plan_id={self.plan_id!r}, architecture={self.signature.architecture!r}, steps={self.num_steps}, "
            f"gated={bits(self.step_gate)!r}, taus={dict(self.taus)!r}, nonskip_rate={self.nonskip_rate!r})"
        )

    # ---- JSON

    def _content(self) -> dict[str, Any]:
        """The document without ``plan_id`` and ``checksum``: exactly what the checksum covers. Paper-mode plans
        have no ``mode``/``forecast`` keys, so their documents and checksums are those of format 1."""
        forecast_keys = {} if self.mode == "paper" else {"mode": self.mode, "forecast": dict(self.forecast)}
        return {
            "format": self.format,
            **forecast_keys,
            "created_at": self.created_at,
            "signature": self.signature.to_dict(),
            "taus": dict(self.taus),
            "nonskip_rate": self.nonskip_rate,
            "step_gate": bits(self.step_gate),
            "modules": {family: [bits(row) for row in book] for family, book in self.modules.items()},
            "calibration": self.calibration,
            "rho_phase1": _encode_rates(self.rho_phase1),
            "rho_phase2": _encode_rates(self.rho_phase2),
        }

    def to_dict(self) -> dict[str, Any]:
        """The plan document (format 1 in paper mode, 2 in forecast mode) as plain JSON values."""
        content = self._content()
        return {"format": content.pop("format"), "plan_id": self.plan_id, "checksum": self.checksum, **content}

    def to_json(self) -> str:
        """Readable JSON: one bit string per step and one rate row per line."""
        return _readable_json(self.to_dict()) + "\n"

    @classmethod
    def from_dict(cls, doc: Any, *, source: str = "<dict>") -> Plan:
        """Validate (schema, consistency, checksum) and decode a plan document of either format."""
        if not isinstance(doc, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(doc).__name__}")
        if doc.get("format") not in FORMATS:
            hint = " (a paper-era cache-book file? convert it first)" if "step_cache_book" in doc else ""
            raise PlanError(f"{source}: format: expected one of {list(FORMATS)}, got {doc.get('format')!r}{hint}")
        _validate_schema(doc, source)
        try:
            plan = cls(
                signature=PipelineSignature.from_dict(doc["signature"]),
                taus=doc["taus"],
                nonskip_rate=doc["nonskip_rate"],
                step_gate=_decode_bits(doc["step_gate"]),
                modules={f: _decode_bit_rows(f"modules.{f}", rows) for f, rows in doc["modules"].items()},
                rho_phase1=_decode_rates("rho_phase1", doc["rho_phase1"]),
                rho_phase2=_decode_rates("rho_phase2", doc["rho_phase2"]),
                calibration=doc["calibration"],
                created_at=doc["created_at"],
                mode=doc.get("mode", "paper"),
                forecast=doc.get("forecast"),
            )
        except ValueError as error:  # PlanError included
            raise PlanError(f"{source}: {error}") from error
        if plan.format != doc["format"]:
            raise PlanError(f"{source}: format: a {plan.mode}-mode plan is written as {plan.format!r}, got {doc['format']!r}")
        if plan.checksum != doc["checksum"]:
            raise PlanError(
                f"{source}: checksum: the file records {doc['checksum']} but its content hashes to {plan.checksum}; "
                "the plan was modified after it was written (recalibrate or rebuild it instead of editing it)"
            )
        if plan.plan_id != doc["plan_id"]:
            raise PlanError(f"{source}: plan_id: expected {plan.plan_id!r} (from the checksum), got {doc['plan_id']!r}")
        return plan

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<string>") -> Plan:
        try:
            doc = json.loads(text, parse_constant=_reject_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, PlanError, RecursionError) as error:
            raise PlanError(f"{source}: not a valid JSON document: {error}") from error
        return cls.from_dict(doc, source=source)

    # ---- storage

    def save(self, uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Write the plan to a local path or any fsspec URI (``s3://...``, ``memory://...``).

        The document is serialised and schema-checked before anything is opened, so a failure leaves
        the target untouched. Local files are written to a temporary file in the same directory and
        renamed over the target (atomic on POSIX); remote stores get one whole-object write.
        """
        doc = self.to_dict()
        _validate_schema(doc, "plan being saved")
        data = (_readable_json(doc) + "\n").encode("utf-8")
        fs, path = fsspec.core.url_to_fs(os.fspath(uri), **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):
            _write_atomically(Path(path), data)
        else:
            fs.pipe_file(path, data)

    @classmethod
    def load(cls, uri: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> Plan:
        """Read and validate a plan; :class:`PlanError` if the file is malformed, inconsistent or edited."""
        fs, path = fsspec.core.url_to_fs(os.fspath(uri), **(storage_options or {}))
        return cls.from_json(fs.cat_file(path), source=os.fspath(uri))


# --------------------------------------------------------------------------------------------------
# Validation helpers


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _fraction(name: str, value: Any) -> float:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not is_number or not 0.0 <= value <= 1.0:
        raise PlanError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def _require_keys(name: str, mapping: Mapping[str, Any], expected: list[str]) -> None:
    if not isinstance(mapping, Mapping) or set(mapping) != set(expected):
        actual = list(mapping) if isinstance(mapping, Mapping) else type(mapping).__name__
        raise PlanError(f"{name}: expected keys {expected} (from signature.layers), got {actual}")


def _frozen(values: Any, dtype: type, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = np.array(values, dtype=dtype)  # a copy: later edits to the caller's array cannot reach the plan
    if array.shape != shape:
        where = "T = signature.num_inference_steps, L = signature.layers"
        raise PlanError(f"{name}: expected shape {shape} ({where}), got {array.shape}")
    array.setflags(write=False)
    return array


def _json_copy(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanError(f"{name}: expected a JSON object, got {type(value).__name__}")
    try:  # a deep copy that keeps the caller's key order (the checksum sorts keys itself)
        return json.loads(json.dumps(dict(value), ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise PlanError(f"{name}: not JSON-serialisable ({error})") from error


def _utc_timestamp(value: str | None) -> str:
    if value is None:
        return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        valid = _UTC_TIMESTAMP.fullmatch(value) is not None and datetime.fromisoformat(value) is not None
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise PlanError(f"created_at: expected an ISO-8601 UTC timestamp such as '2026-01-31T12:00:00Z', got {value!r}")
    return value


@lru_cache(maxsize=2)
def _schema_validator(fmt: str = FORMAT) -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATHS[fmt].read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _validate_schema(doc: Mapping[str, Any], source: str) -> None:
    fmt = doc.get("format") if doc.get("format") in FORMATS else FORMAT
    errors = sorted(_schema_validator(fmt).iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        shown = "; ".join(f"{_json_path(e.absolute_path)}: {e.message}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise PlanError(f"{source}: does not match the {fmt} schema: {shown}{more}")


def _check_forecast(mode: str, forecast: Mapping[str, Any] | None, step_gate: np.ndarray) -> dict[str, Any] | None:
    if mode not in MODES:
        raise PlanError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if mode == "paper":
        if forecast is not None:
            raise PlanError("forecast: a paper-mode plan has no forecast section")
        return None
    if not isinstance(forecast, Mapping) or set(forecast) != {"target", "orders"}:
        raise PlanError("forecast: expected an object with 'target' and 'orders'")
    if forecast["target"] not in FORECAST_TARGETS:
        raise PlanError(f"forecast.target: expected one of {list(FORECAST_TARGETS)}, got {forecast['target']!r}")
    try:
        schedule = parse_orders(forecast["orders"]) if isinstance(forecast["orders"], str) else None
    except ValueError as error:
        raise PlanError(f"forecast.orders: {error}") from error
    if schedule is None or schedule.num_steps != step_gate.size:
        raise PlanError(f"forecast.orders: expected one character per step ({step_gate.size})")
    if not np.array_equal(~schedule.compute, step_gate):
        raise PlanError("forecast.orders: its computed steps ('-') must be exactly the steps step_gate does not gate")
    return {"target": str(forecast["target"]), "orders": str(forecast["orders"])}


def _json_path(path) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return text or "(document)"


def _reject_constant(token: str):
    raise PlanError(f"non-standard JSON constant {token}: rates store NaN as null and infinities as 'inf'/'-inf'")


# --------------------------------------------------------------------------------------------------
# Encoding


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _decode_bits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def _decode_bit_rows(name: str, rows: list[str]) -> np.ndarray:
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise PlanError(f"{name}: every step needs the same number of layer bits, got lengths {sorted(lengths)}")
    width = lengths.pop() if lengths else 0
    return np.array([_decode_bits(row) for row in rows], dtype=bool).reshape(len(rows), width)


def _encode_float(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x  # json writes repr(), the shortest string that reads back to the same double


def _decode_float(x: float | str | None) -> float:
    return math.nan if x is None else float(x)


def _encode_rates(rho: Mapping[str, np.ndarray] | None) -> dict[str, list] | None:
    if rho is None:
        return None
    return {name: _map_nested(_encode_float, values.tolist()) for name, values in rho.items()}


def _decode_rates(name: str, doc: Mapping[str, list] | None) -> dict[str, np.ndarray] | None:
    if doc is None:
        return None
    rho = {}
    for family, values in doc.items():
        try:
            rho[family] = np.array(_map_nested(_decode_float, values), dtype=np.float64)
        except ValueError as error:
            raise PlanError(f"{name}.{family}: rows have different lengths") from error
    return rho


def _map_nested(fn, values):
    return [_map_nested(fn, v) if isinstance(v, list) else fn(v) for v in values]


def _inline(value: list) -> bool:
    # Rate rows stay on one line; lists of strings (bit strings, prompts) get a line per item.
    return all(v is None or v in ("inf", "-inf") or isinstance(v, (bool, int, float)) for v in value)


def _readable_json(value: Any, indent: int = 0) -> str:
    inner, outer = "  " * (indent + 1), "  " * indent
    if isinstance(value, dict) and value:
        items = (f"{inner}{json.dumps(k)}: {_readable_json(v, indent + 1)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list) and value and not _inline(value):
        items = (inner + _readable_json(v, indent + 1) for v in value)
        return "[\n" + ",\n".join(items) + f"\n{outer}]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; plans are read by other workers
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
