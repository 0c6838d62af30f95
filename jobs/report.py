"""Cost per image, speedup and quality of a generation run, from its output Parquet.

`invardiff report OUT_DIR_OR_URI --out REPORT_DIR` reads the rows `invardiff generate` wrote (local or
s3://, the columns of docs/contracts.md) and writes report.md, report.html (self-contained) and PNG plots.

How the numbers are made (everything comes from what the rows measured, nothing is estimated):
  * images: rows without an error. Error rows are counted and their reasons listed.
  * device time: the sum of `latency_s` over all rows. `latency_s` is a batch's generation time divided
    by its size, i.e. each image's share of its device's time. Error rows' time is included: it was paid.
  * cost: device time x the device's price per hour (jobs/prices.yaml, by `device_name`, `cpu` for
    CPU rows). $ per image = total cost / images.
  * wall time: first batch start to last finish. A batch started at finished_at - latency_s x batch_size.
  * throughput: end-to-end and steady-state images/s, defined in jobs/throughput.py; `invardiff generate`
    prints the same two figures for the rows it wrote.
  * speedup (with a baseline run of the same manifest, uncached): rows paired on `id`, and only when both
    rows were made from the same request (seed, class_label / prompt), else the report is refused; the
    ratio of summed device time, the median of per-image ratios, the cost ratio, and PSNR/SSIM of the cached
    PNGs against the baseline PNGs on a deterministic sample of ids, with the worst, median and best pair
    shown side by side.
  * fidelity from shadow rows (a run generated with `--shadow F`): per plan, the shadow rows' PSNR/SSIM/rel err
    to the same request generated uncached, a 95 % interval for the mean PSNR, the worst rows, and the shadows'
    own device time and cost, which is not in $ per image; `--min-psnr X` flags a plan below X and exits 4
    (jobs/report_shadow.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import typer

from jobs.hf_features import png_bytes
from jobs.throughput import Throughput, throughput

if TYPE_CHECKING:  # pandas costs about a second to import; the CLI loads this module on every call.
    import pandas as pd

    from jobs.report_shadow import ShadowReport

REQUIRED_COLUMNS: tuple[str, ...] = (
    "id",
    "latency_s",
    "batch_size",
    "steps_total",
    "steps_computed",
    "module_evals_total",
    "module_evals_computed",
    "device",
    "device_name",
    "node_id",
    "finished_at",
    "error",
)
# Shown when present; the report does not depend on them.
DESCRIPTIVE_COLUMNS: tuple[str, ...] = ("model_id", "policy", "plan_id", "worker_id", "seed", "peak_memory_bytes")
# What a row was made from: a baseline row stands for the same image only if all of these agree.
REQUEST_COLUMNS: tuple[str, ...] = ("seed", "class_label", "prompt")
# Per-image quality columns a generation job may add (e.g. fidelity to a reference computed in the job).
FIDELITY_COLUMNS: tuple[str, ...] = ("psnr", "ssim", "ms_ssim", "lpips")

# Package data (pyproject: jobs/*.yaml), so that a non-editable install, such as a cluster image, finds it.
DEFAULT_PRICES_PATH = Path(__file__).resolve().parent / "prices.yaml"
DEFAULT_FIDELITY_SAMPLE = 1000
CPU_PRICE_KEY = "cpu"


class ReportInputError(ValueError):
    """The run (or its baseline, or a price table) cannot be reported on; the message says why."""


# ----------------------------------------------------------------------------------------------------
# Prices


def load_prices(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, float]:
    """USD per device-hour by device key, from a prices YAML (default jobs/prices.yaml) plus
    `DEVICE=USD_PER_HOUR` overrides."""
    import yaml

    source = Path(path) if path is not None else DEFAULT_PRICES_PATH
    try:
        document = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ReportInputError(f"cannot read prices from {source}: {error}") from error
    table = document.get("usd_per_hour") if isinstance(document, dict) else None
    if not isinstance(table, dict):
        raise ReportInputError(f"{source}: expected a mapping 'usd_per_hour: {{DEVICE: USD_PER_HOUR}}'")
    prices = {str(key): _price_value(value, f"{source}: {key}") for key, value in table.items()}
    prices.update(parse_price_override(text) for text in overrides)
    return prices


def parse_price_override(text: str) -> tuple[str, float]:
    """'H100=2.10' -> ('H100', 2.1)."""
    key, sep, value = text.rpartition("=")
    if not sep or not key.strip():
        raise ReportInputError(f"--price {text!r}: expected DEVICE=USD_PER_HOUR, e.g. H100=2.10")
    return key.strip(), _price_value(value, f"--price {text}")


def _price_value(value: Any, where: str) -> float:
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise ReportInputError(f"{where}: price {value!r} is not a number") from None
    if not math.isfinite(price) or price < 0:
        raise ReportInputError(f"{where}: price must be a non-negative number, got {value!r}")
    return price


def price_key_for(device: str, device_name: str, prices: Mapping[str, float]) -> str | None:
    """The price-table key for a row's device, or None when the table has no price for it.

    Exact device name first; `cpu` for CPU rows; otherwise the longest key found in the device name
    as a whole token ("A100" in "NVIDIA A100-SXM4-80GB", but "L4" not in "NVIDIA L40S").
    """
    by_lower = {key.lower(): key for key in prices}
    name = (device_name or "").strip()
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    if (device or "").lower().startswith("cpu"):
        return by_lower.get(CPU_PRICE_KEY)
    lowered_name = name.lower()
    matches = [
        key
        for lower, key in by_lower.items()
        if lower != CPU_PRICE_KEY and re.search(rf"(?<![a-z0-9]){re.escape(lower)}(?![a-z0-9])", lowered_name)
    ]
    return max(matches, key=len) if matches else None


# ----------------------------------------------------------------------------------------------------
# Reading the output


@dataclass(frozen=True)
class OutputFiles:
    """The Parquet files of one run, and their merged schema."""

    uri: str
    filesystem: Any
    paths: tuple[str, ...]
    columns: frozenset[str]
    schema: Any  # pyarrow.Schema

    def dataset(self):
        import pyarrow.dataset as ds

        return ds.dataset(list(self.paths), schema=self.schema, filesystem=self.filesystem, format="parquet")

    def read(self, columns: Sequence[str], ids: Sequence[str] | None = None) -> pd.DataFrame:
        """The given columns (those present), optionally only for some ids. Never the whole PNG column
        unless asked: a million-image run holds tens of GB of PNG bytes."""
        import pyarrow.compute as pc

        wanted = [name for name in columns if name in self.columns]
        row_filter = pc.field("id").isin(list(ids)) if ids is not None else None
        table = self.dataset().to_table(columns=wanted, filter=row_filter)
        # Each Arrow column is freed as soon as it is converted, so the peak is one copy of the rows, not two
        # (a million rows of the report's columns are about half a GB as pandas objects).
        return table.to_pandas(self_destruct=True, split_blocks=True)


def _is_data_file(relative: str) -> bool:
    # Ray and Spark leave _SUCCESS, .crc and _checkpoint/ entries next to the data; skip hidden parts.
    parts = relative.split("/")
    return relative.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in parts)


def open_output(uri: str, storage_options: Mapping[str, Any] | None = None, role: str = "output") -> OutputFiles:
    """Find the Parquet files of a run (a directory/prefix or one file) and check the contract columns."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, root = fsspec.core.url_to_fs(str(uri), **dict(storage_options or {}))
    if not filesystem.exists(root):
        raise ReportInputError(f"{role} {uri} does not exist")
    if filesystem.isdir(root):
        prefix = root.rstrip("/") + "/"
        paths = sorted(p for p in filesystem.find(root) if _is_data_file(p[len(prefix) :]))
    else:
        paths = [root]
    if not paths:
        raise ReportInputError(f"{role} {uri} holds no .parquet files")

    # A large run is thousands of files; reading their footers one by one from S3 would take minutes.
    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(lambda path: pq.read_schema(path, filesystem=filesystem), paths))
    _check_required_columns(uri, role, paths, schemas)
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ReportInputError(f"{role} {uri}: files disagree on column types: {error}") from error
    return OutputFiles(str(uri), filesystem, tuple(paths), frozenset(schema.names), schema)


def _check_required_columns(uri: str, role: str, paths: Sequence[str], schemas: Sequence[Any]) -> None:
    missing_by_file = {
        path: [c for c in REQUIRED_COLUMNS if c not in schema.names]
        for path, schema in zip(paths, schemas, strict=True)
    }
    incomplete = {path: missing for path, missing in missing_by_file.items() if missing}
    if not incomplete:
        return
    missing = sorted({column for columns in incomplete.values() for column in columns}, key=REQUIRED_COLUMNS.index)
    example = next(iter(incomplete))
    raise ReportInputError(
        f"{role} {uri} lacks required column(s) {', '.join(missing)} "
        f"({len(incomplete)} of {len(paths)} file(s), e.g. {example.rsplit('/', 1)[-1]}). "
        f"A report needs: {', '.join(REQUIRED_COLUMNS)} (docs/contracts.md, 'Output rows')."
    )


def read_rows(files: OutputFiles) -> pd.DataFrame:
    """Every column the report uses, except the PNG bytes."""
    return files.read(list(dict.fromkeys([*REQUIRED_COLUMNS, *DESCRIPTIVE_COLUMNS, *REQUEST_COLUMNS, *FIDELITY_COLUMNS])))


# ----------------------------------------------------------------------------------------------------
# Per-row accounting


def annotate_rows(rows: pd.DataFrame, prices: Mapping[str, float]) -> pd.DataFrame:
    """Add ok, started_at, price_key, usd_per_hour and cost_usd to each row."""
    import pandas as pd

    rows = rows.copy()
    error_text = rows["error"].astype("string")
    rows["ok"] = (error_text.isna() | (error_text.str.len() == 0)).astype(bool)
    rows["latency_s"] = pd.to_numeric(rows["latency_s"], errors="coerce").fillna(0.0).astype(float)
    rows["batch_size"] = pd.to_numeric(rows["batch_size"], errors="coerce").fillna(1).clip(lower=1)
    rows["finished_at"] = pd.to_datetime(rows["finished_at"], utc=True)
    # Every image of a batch finishes together; the batch took latency_s x batch_size of wall time.
    rows["started_at"] = rows["finished_at"] - pd.to_timedelta(rows["latency_s"] * rows["batch_size"], unit="s")
    rows["device"] = rows["device"].fillna("").astype(str)
    rows["device_name"] = rows["device_name"].fillna("unknown").astype(str)
    rows["node_id"] = rows["node_id"].fillna("unknown").astype(str)
    pairs = rows[["device", "device_name"]].drop_duplicates().itertuples(index=False)
    key_of = {(pair.device, pair.device_name): price_key_for(pair.device, pair.device_name, prices) for pair in pairs}
    keys = [key_of[(d, n)] for d, n in zip(rows["device"], rows["device_name"], strict=True)]
    rows["price_key"] = keys
    rows["usd_per_hour"] = np.array([prices[key] if key is not None else np.nan for key in keys], dtype=float)
    rows["cost_usd"] = rows["latency_s"] / 3600.0 * rows["usd_per_hour"]
    return rows


def _total_cost(costs: pd.Series) -> float | None:
    """The sum, or None when any row is unpriced: a partial sum would understate the cost."""
    return None if costs.isna().any() else float(costs.sum())


def _per_image(total: float | None, images: int) -> float | None:
    return total / images if total is not None and images > 0 else None


# ----------------------------------------------------------------------------------------------------
# Report model


@dataclass(frozen=True)
class GroupCost:
    """Images, device time and cost of the rows sharing one device name or one node."""

    name: str
    images: int
    errors: int
    device_seconds: float
    mean_latency_s: float | None
    cost_usd: float | None
    cost_per_image_usd: float | None
    usd_per_hour: float | None  # None when unpriced or when the group mixes prices
    devices: tuple[str, ...]


@dataclass(frozen=True)
class MetricSummary:
    """count, and mean/median/min/max over finite values; `identical` counts infinite PSNRs."""

    count: int
    mean: float | None
    median: float | None
    minimum: float | None
    maximum: float | None
    identical: int = 0


@dataclass(frozen=True)
class SamplePair:
    """One compared image, as PNG bytes from both runs, for the report's picture of cached vs baseline."""

    label: str  # "worst PSNR", "median PSNR", "best PSNR"
    image_id: str
    psnr: float  # inf when identical
    baseline_png: bytes
    cached_png: bytes


@dataclass(frozen=True)
class BaselineComparison:
    uri: str
    matched_images: int
    latency_speedup: float  # summed baseline device time / summed cached device time, same ids
    median_image_speedup: float | None
    cost_ratio: float | None  # cached cost / baseline cost, same ids
    baseline_cost_per_image_usd: float | None
    cached_cost_per_image_usd: float | None
    fidelity: dict[str, MetricSummary]
    fidelity_images: int
    notes: tuple[str, ...]
    samples: tuple[SamplePair, ...] = ()


@dataclass(frozen=True)
class Report:
    out_uri: str
    rows: int
    images: int
    error_rows: int
    error_reasons: tuple[tuple[str, int], ...]
    duplicate_ids: int
    started_at: pd.Timestamp | None
    finished_at: pd.Timestamp | None
    wall_seconds: float | None
    device_seconds: float
    total_cost_usd: float | None
    cost_per_image_usd: float | None
    throughput: Throughput
    images_per_device_hour: float | None
    steps_computed: int
    steps_total: int
    module_evals_computed: int
    module_evals_total: int
    by_device: tuple[GroupCost, ...]
    by_node: tuple[GroupCost, ...]
    quality: dict[str, MetricSummary]
    baseline: BaselineComparison | None
    unpriced_devices: tuple[str, ...]
    prices_used: dict[str, float]
    models: tuple[str, ...] = ()
    policies: tuple[str, ...] = ()
    plan_ids: tuple[str, ...] = ()
    files: dict[str, Path] = field(default_factory=dict)
    shadow: ShadowReport | None = None  # fidelity from the run's shadow rows (jobs/report_shadow.py)

    @property
    def images_per_second(self) -> float | None:
        """End-to-end images/s (jobs/throughput.py)."""
        return self.throughput.end_to_end

    @property
    def step_reuse(self) -> float | None:
        return 1.0 - self.steps_computed / self.steps_total if self.steps_total else None

    @property
    def module_reuse(self) -> float | None:
        return 1.0 - self.module_evals_computed / self.module_evals_total if self.module_evals_total else None


# ----------------------------------------------------------------------------------------------------
# Summaries


def summarize_group(name: str, group: pd.DataFrame) -> GroupCost:
    ok = group[group["ok"]]
    images = len(ok)
    cost = _total_cost(group["cost_usd"])
    rates = group["usd_per_hour"].unique()
    single_rate = float(rates[0]) if len(rates) == 1 and not np.isnan(rates[0]) else None
    return GroupCost(
        name=name,
        images=images,
        errors=int((~group["ok"]).sum()),
        device_seconds=float(group["latency_s"].sum()),
        mean_latency_s=float(ok["latency_s"].mean()) if images else None,
        cost_usd=cost,
        cost_per_image_usd=_per_image(cost, images),
        usd_per_hour=single_rate,
        devices=tuple(sorted(group["device_name"].unique())),
    )


def summarize_groups(rows: pd.DataFrame, column: str) -> tuple[GroupCost, ...]:
    return tuple(summarize_group(str(name), group) for name, group in rows.groupby(column, sort=True))


def summarize_metric(values: Iterable[float]) -> MetricSummary:
    array = np.asarray(list(values), dtype=float)
    array = array[~np.isnan(array)]
    finite = array[np.isfinite(array)]
    identical = int(np.isposinf(array).sum())
    if not len(finite):
        return MetricSummary(len(array), None, None, None, None, identical)
    return MetricSummary(
        count=len(array),
        mean=float(finite.mean()),
        median=float(np.median(finite)),
        minimum=float(finite.min()),
        maximum=float(finite.max()),
        identical=identical,
    )


def _throughput(ok: pd.DataFrame) -> Throughput:
    import pandas as pd

    timed = ok.dropna(subset=["finished_at"])
    finished = (timed["finished_at"] - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    return throughput(finished, timed["latency_s"].to_numpy(), timed["batch_size"].to_numpy())


def _distinct(rows: pd.DataFrame, column: str) -> tuple[str, ...]:
    if column not in rows:
        return ()
    return tuple(sorted(str(value) for value in rows[column].dropna().unique()))


def summarize_run(uri: str, rows: pd.DataFrame, prices: Mapping[str, float]) -> Report:
    ok = rows[rows["ok"]]
    images = len(ok)
    timed = rows.dropna(subset=["finished_at"])
    started = timed["started_at"].min() if len(timed) else None
    finished = timed["finished_at"].max() if len(timed) else None
    wall = (finished - started).total_seconds() if started is not None else None
    device_seconds = float(rows["latency_s"].sum())
    total_cost = _total_cost(rows["cost_usd"])
    errors = rows.loc[~rows["ok"], "error"].astype(str).value_counts()
    unpriced = rows.loc[rows["price_key"].isna(), "device_name"].unique()
    return Report(
        out_uri=uri,
        rows=len(rows),
        images=images,
        error_rows=len(rows) - images,
        error_reasons=tuple((str(reason), int(count)) for reason, count in errors.items()),
        duplicate_ids=int(ok["id"].duplicated().sum()),
        started_at=started,
        finished_at=finished,
        wall_seconds=wall,
        device_seconds=device_seconds,
        total_cost_usd=total_cost,
        cost_per_image_usd=_per_image(total_cost, images),
        throughput=_throughput(ok),
        images_per_device_hour=images / (device_seconds / 3600.0) if device_seconds > 0 else None,
        steps_computed=int(ok["steps_computed"].sum()),
        steps_total=int(ok["steps_total"].sum()),
        module_evals_computed=int(ok["module_evals_computed"].sum()),
        module_evals_total=int(ok["module_evals_total"].sum()),
        by_device=summarize_groups(rows, "device_name"),
        by_node=summarize_groups(rows, "node_id"),
        quality={name: summarize_metric(ok[name]) for name in FIDELITY_COLUMNS if name in ok},
        baseline=None,
        unpriced_devices=tuple(sorted(unpriced)),
        prices_used={key: prices[key] for key in sorted(rows["price_key"].dropna().unique())},
        models=_distinct(ok, "model_id"),
        policies=_distinct(ok, "policy"),
        plan_ids=_distinct(ok, "plan_id"),
    )


# ----------------------------------------------------------------------------------------------------
# Image fidelity (numpy): cached vs baseline PNG of the same id


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array (H, W, C); grayscale stays one channel, alpha is dropped."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        mode = "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        array = np.asarray(image.convert(mode))
    return array[:, :, None] if array.ndim == 2 else array


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of one uint8 image (H, W, C) against its reference; inf when they are identical."""
    return float(_batch_metrics([reference], [test])[0][0])


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """SSIM of one uint8 image (H, W, C) against its reference (evaluation.fidelity.ssim)."""
    return float(_batch_metrics([reference], [test])[1][0])


def _batch_metrics(references: Sequence[np.ndarray], tests: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """PSNR and SSIM of same-shaped uint8 (H, W, C) pairs, computed by evaluation.fidelity: the report
    and the benchmarks must agree on what a dB or an SSIM point means, so there is one implementation.

    One difference is kept on purpose: fidelity caps identical images at 100 dB (the InvarDiff paper's
    protocol); the report counts them apart (MetricSummary.identical) and gives them an infinite PSNR.
    Exact equality decides, since for large images a one-level difference can also exceed 100 dB."""
    from evaluation import fidelity  # torch: loaded only when a baseline is compared

    x, y = np.stack(references), np.stack(tests)
    psnrs = fidelity.psnr(x, y).astype(np.float64)
    identical = (x == y).reshape(len(x), -1).all(axis=1)
    psnrs[identical] = math.inf
    return psnrs, fidelity.ssim(x, y).astype(np.float64)


def fidelity_sample(ids: Iterable[str], size: int | None) -> list[str]:
    """A deterministic, well-spread subset: ids ordered by a hash of themselves, first `size`."""
    ordered = sorted((str(i) for i in ids), key=lambda i: hashlib.sha256(i.encode()).digest())
    return ordered if size is None else ordered[:size]


def image_fidelity(
    current: OutputFiles, baseline: OutputFiles, ids: Sequence[str]
) -> tuple[dict[str, MetricSummary], dict[str, float], list[str]]:
    """PSNR and SSIM of the cached images against the baseline's, for the given ids: the summaries, each
    compared id's PSNR, and notes."""
    cached_png = current.read(["id", "png"], ids).drop_duplicates("id", keep="last").set_index("id")["png"]
    baseline_png = baseline.read(["id", "png"], ids).drop_duplicates("id", keep="last").set_index("id")["png"]
    psnrs, ssims, notes = [], [], []
    compared_ids: list[str] = []
    shape_mismatches = 0
    pairs_by_shape: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray], list[str]]] = {}
    for image_id in ids:
        cached_bytes, baseline_bytes = png_bytes(cached_png.get(image_id)), png_bytes(baseline_png.get(image_id))
        if cached_bytes is None or baseline_bytes is None:
            continue
        cached, reference = decode_png(cached_bytes), decode_png(baseline_bytes)
        if cached.shape != reference.shape:
            shape_mismatches += 1
            continue
        references, tests, shape_ids = pairs_by_shape.setdefault(cached.shape, ([], [], []))
        references.append(reference)
        tests.append(cached)
        shape_ids.append(image_id)
    for references, tests, shape_ids in pairs_by_shape.values():
        compared_ids.extend(shape_ids)
        # Batches of a bounded size: a 1000-image sample of 1024 px RGB would be GBs as float tensors.
        for start in range(0, len(references), 64):
            batch_psnr, batch_ssim = _batch_metrics(references[start : start + 64], tests[start : start + 64])
            psnrs.extend(batch_psnr.tolist())
            ssims.extend(batch_ssim.tolist())
    if shape_mismatches:
        notes.append(f"{shape_mismatches} image(s) differ in size from the baseline and were not compared")
    summaries = {"psnr": summarize_metric(psnrs), "ssim": summarize_metric(ssims)} if psnrs else {}
    return summaries, dict(zip(compared_ids, psnrs, strict=True)), notes


SAMPLE_LABELS = ("worst PSNR", "median PSNR", "best PSNR")


def sample_pairs(current: OutputFiles, baseline: OutputFiles, psnr_by_id: Mapping[str, float]) -> tuple[SamplePair, ...]:
    """The compared images with the worst, median and best PSNR (ties broken by id), as PNG bytes."""
    if not psnr_by_id:
        return ()
    ranked = sorted(psnr_by_id, key=lambda image_id: (psnr_by_id[image_id], image_id))
    picks = dict(zip(SAMPLE_LABELS, (ranked[0], ranked[len(ranked) // 2], ranked[-1]), strict=True))
    ids = sorted(set(picks.values()))
    cached = current.read(["id", "png"], ids).drop_duplicates("id", keep="last").set_index("id")["png"]
    reference = baseline.read(["id", "png"], ids).drop_duplicates("id", keep="last").set_index("id")["png"]
    shown, pairs = set(), []
    for label, image_id in picks.items():
        if image_id in shown:  # fewer than three images compared
            continue
        shown.add(image_id)
        pairs.append(SamplePair(label, image_id, psnr_by_id[image_id], png_bytes(reference[image_id]),
                                png_bytes(cached[image_id])))
    return tuple(pairs)


# ----------------------------------------------------------------------------------------------------
# Baseline comparison


def compare_with_baseline(
    current_rows: pd.DataFrame,
    baseline_rows: pd.DataFrame,
    current: OutputFiles,
    baseline: OutputFiles,
    max_fidelity_images: int | None = DEFAULT_FIDELITY_SAMPLE,
) -> BaselineComparison:
    cached = current_rows[current_rows["ok"]].drop_duplicates("id", keep="last").set_index("id")
    reference = baseline_rows[baseline_rows["ok"]].drop_duplicates("id", keep="last").set_index("id")
    ids = cached.index.intersection(reference.index)
    if not len(ids):
        raise ReportInputError(
            f"baseline {baseline.uri} shares no successful image id with {current.uri}; "
            "it must be a run of the same manifest"
        )
    cached, reference = cached.loc[ids], reference.loc[ids]
    notes = _baseline_notes(cached, reference, len(current_rows[current_rows["ok"]]), len(ids))
    notes.extend(check_pairing(cached, reference, current.uri, baseline.uri))

    cached_seconds = float(cached["latency_s"].sum())
    positive = cached["latency_s"] > 0
    per_image = reference.loc[positive, "latency_s"] / cached.loc[positive, "latency_s"]
    cached_cost, baseline_cost = _total_cost(cached["cost_usd"]), _total_cost(reference["cost_usd"])

    fidelity, psnr_by_id, samples = {}, {}, ()
    if "png" in current.columns and "png" in baseline.columns:
        sample = fidelity_sample(ids, max_fidelity_images)
        fidelity, psnr_by_id, fidelity_notes = image_fidelity(current, baseline, sample)
        notes.extend(fidelity_notes)
        samples = sample_pairs(current, baseline, psnr_by_id)
    else:
        notes.append("no png column in both runs: image fidelity not computed")

    return BaselineComparison(
        uri=baseline.uri,
        matched_images=len(ids),
        latency_speedup=float(reference["latency_s"].sum()) / cached_seconds if cached_seconds > 0 else math.inf,
        median_image_speedup=float(per_image.median()) if len(per_image) else None,
        cost_ratio=cached_cost / baseline_cost if cached_cost is not None and baseline_cost else None,
        baseline_cost_per_image_usd=_per_image(baseline_cost, len(ids)),
        cached_cost_per_image_usd=_per_image(cached_cost, len(ids)),
        fidelity=fidelity,
        fidelity_images=len(psnr_by_id),
        notes=tuple(notes),
        samples=samples,
    )


def _baseline_notes(cached: pd.DataFrame, reference: pd.DataFrame, cached_images: int, matched: int) -> list[str]:
    notes = []
    if cached_images > matched:
        notes.append(f"{cached_images - matched} image(s) of this run have no successful baseline row")
    if "policy" in reference:
        baseline_policies = sorted({str(p) for p in reference["policy"].dropna().unique()} - {"none"})
        if baseline_policies:
            notes.append(f"baseline rows use cache policy {', '.join(baseline_policies)}, not 'none'")
    return notes


def _shown(value: Any) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    return repr(value) if isinstance(value, str) else str(value)


def check_pairing(cached: pd.DataFrame, reference: pd.DataFrame, current_uri: str, baseline_uri: str) -> list[str]:
    """Refuse pairs of rows (same id, indexed by id) that were made from different requests: the seed, class
    label or prompt differ, so the two images are not the same image with and without caching. Returns notes
    for what could not be checked (a column one run lacks)."""
    import pandas as pd

    notes, differing = [], pd.Series(False, index=cached.index)
    for column in REQUEST_COLUMNS:
        present = [column in cached, column in reference]
        if not any(present):
            continue
        if not all(present):
            lacking = baseline_uri if present[0] else current_uri
            notes.append(f"UNCHECKED PAIRING: {lacking} has no {column} column, so pairs agree on id only")
            continue
        mine, theirs = cached[column], reference[column]
        differing |= ~((mine == theirs) | (mine.isna() & theirs.isna()))
    if differing.any():
        examples = []
        for image_id in differing[differing].index[:2]:
            fields = [c for c in REQUEST_COLUMNS if c in cached and c in reference
                      and not (cached.at[image_id, c] == reference.at[image_id, c]
                               or (pd.isna(cached.at[image_id, c]) and pd.isna(reference.at[image_id, c])))]
            examples.append(f"{image_id}: " + ", ".join(
                f"{c} {_shown(cached.at[image_id, c])} here, {_shown(reference.at[image_id, c])} in the baseline"
                for c in fields))
        raise ReportInputError(
            f"baseline {baseline_uri}: {int(differing.sum())} of {len(differing)} shared id(s) were made from another "
            f"request (e.g. {'; '.join(examples)}); compare runs of the same manifest"
        )
    return notes


# ----------------------------------------------------------------------------------------------------
# Entry point


def build_report(
    out_uri: str,
    report_dir: str | Path,
    prices: Mapping[str, float] | None = None,
    baseline_uri: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_fidelity_images: int | None = DEFAULT_FIDELITY_SAMPLE,
    min_psnr: float | None = None,
) -> Report:
    """Read a run's output (and optionally an uncached baseline run), write report.md, report.html and
    PNG plots to report_dir, and return the numbers. Inputs are checked before anything is written.
    `min_psnr`: flag each plan whose shadow rows' mean PSNR is below it (`report.shadow.flagged`)."""
    from jobs import report_render

    prices = dict(prices) if prices is not None else load_prices()
    current = open_output(out_uri, storage_options)
    baseline = open_output(baseline_uri, storage_options, role="baseline") if baseline_uri else None

    rows = annotate_rows(read_rows(current), prices)
    report = summarize_run(str(out_uri), rows, prices)
    if baseline is not None:
        baseline_rows = annotate_rows(read_rows(baseline), prices)
        comparison = compare_with_baseline(rows, baseline_rows, current, baseline, max_fidelity_images)
        report = dataclasses.replace(report, baseline=comparison)
    report = dataclasses.replace(report, shadow=_shadow_fidelity(current, rows, prices, min_psnr))

    plots = report_render.render_plots(report, rows)
    documents = {
        "report.md": report_render.render_markdown(report, plots).encode(),
        "report.html": report_render.render_html(report, plots).encode(),
    }
    return dataclasses.replace(report, files=_write_outputs(Path(report_dir), {**plots, **documents}))


def _shadow_fidelity(current: OutputFiles, rows: pd.DataFrame, prices: Mapping[str, float],
                     min_psnr: float | None) -> ShadowReport | None:
    from jobs.report_shadow import summarize_shadows

    shadow = summarize_shadows(current, rows, prices, min_psnr)
    if min_psnr is not None and shadow is None:
        raise ReportInputError(
            f"--min-psnr {min_psnr:g}: {current.uri} has no shadow rows to measure fidelity on "
            "(generate with --shadow FRACTION)"
        )
    return shadow


# Exit code of `invardiff report --min-psnr X` when a plan's shadow fidelity is below X (jobs/cli.py).
EXIT_BELOW_MIN_PSNR = 4


def _write_outputs(report_dir: Path, contents: Mapping[str, bytes]) -> dict[str, Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, data in contents.items():
        path = report_dir / name
        path.write_bytes(data)
        written[name] = path
    return written


def parse_storage_option(text: str) -> tuple[str, Any]:
    """'endpoint_url=http://127.0.0.1:9000' -> ('endpoint_url', 'http://...'); values are YAML scalars
    (anon=true -> True)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ReportInputError(f"--storage-option {text!r}: expected KEY=VALUE")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed if isinstance(parsed, (bool, int, float)) else value


def report_command(
    out: str = typer.Argument(..., help="Run output: a directory, a .parquet file or an s3:// prefix"),
    report_dir: Path = typer.Option(..., "--out", help="Directory for report.md, report.html and PNGs"),
    prices_file: Path | None = typer.Option(
        None, "--prices", help="Prices YAML (default: jobs/prices.yaml, shipped with the package)"
    ),
    price: list[str] | None = typer.Option(None, "--price", help="Override one price: DEVICE=USD_PER_HOUR"),
    baseline: str | None = typer.Option(None, "--baseline", help="Uncached run of the same manifest"),
    storage_option: list[str] | None = typer.Option(
        None, "--storage-option", help="fsspec option KEY=VALUE, e.g. endpoint_url=http://minio:9000"
    ),
    fidelity_images: int = typer.Option(
        DEFAULT_FIDELITY_SAMPLE, "--fidelity-images", min=1, help="Images compared with the baseline (sample)"
    ),
    min_psnr: float | None = typer.Option(
        None, "--min-psnr", help="Flag each plan whose shadow rows' mean PSNR to uncached is below this (dB), "
        "and exit 4; needs a run generated with --shadow"
    ),
) -> None:
    """Cost per image, throughput, caching and quality of a generation run."""
    try:
        if report_dir.exists() and not report_dir.is_dir():  # found now, not after reading the whole run
            raise ReportInputError(f"--out {report_dir} is a file; give a folder for the report")
        prices = load_prices(prices_file, price or [])
        # Same defaults as generate (AWS_ENDPOINT_URL etc. from the environment); --storage-option wins.
        from jobs.ray_runtime import storage_options_for

        options = {**storage_options_for(out), **dict(parse_storage_option(item) for item in storage_option or [])}
        report = build_report(out, report_dir, prices, baseline, options, fidelity_images, min_psnr)
    except ReportInputError as error:
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    from jobs.report_render import format_usd

    typer.echo(
        f"{report.images} images, {report.error_rows} error rows, "
        f"{format_usd(report.cost_per_image_usd)} per image -> {report.files['report.html']}"
    )
    if report.shadow is not None and report.shadow.flagged:
        for line in report.shadow.flag_lines():
            typer.secho(f"FIDELITY BELOW BOUND: {line}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=EXIT_BELOW_MIN_PSNR)
