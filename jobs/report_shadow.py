"""The report's fidelity-from-shadows part: per plan, what the shadow rows of a run measured.

`invardiff generate --shadow F` generates a hash-chosen fraction F of the rows again uncached and writes their
fidelity into shadow_* columns (pipelines/shadow.py). Here, per plan_id:
  * the distribution of shadow PSNR / SSIM / rel err, and a 95 % Student-t interval for the mean PSNR, which says
    how far the run's mean over all its images may lie from the shadows' for this many shadows (shadows are a
    random sample of the rows: a hash of id and seed, blind to the image);
  * the worst shadow rows, with their uncached images when the run kept them (--keep-shadow-images);
  * the shadows' own device time and cost (shadow_latency_s), which cost per image does not include;
  * with --min-psnr X, a plan whose shadows' mean PSNR is below X is flagged (`invardiff report` exits 4).

Only the shadow rows are read (a filter on shadow_psnr), and PNG bytes only for the few worst rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from jobs.hf_features import png_bytes

if TYPE_CHECKING:
    import pandas as pd

    from jobs.report import MetricSummary, OutputFiles
    from pipelines.shadow import Interval

SHADOW_COLUMNS: tuple[str, ...] = ("shadow_psnr", "shadow_ssim", "shadow_rel_err", "shadow_latency_s")
WORST_SHOWN = 3
NO_PLAN = "none"  # the plan_id shown for rows generated without a plan


@dataclass(frozen=True)
class WorstRow:
    image_id: str
    psnr: float
    ssim: float
    rel_err: float
    cached_png: bytes | None
    uncached_png: bytes | None  # None unless the run kept shadow images


@dataclass(frozen=True)
class PlanShadows:
    plan_id: str
    images: int  # this plan's rows without error
    shadows: int
    psnr: MetricSummary
    ssim: MetricSummary
    rel_err: MetricSummary
    interval: Interval | None  # the mean PSNR and its 95 % interval
    device_seconds: float  # the shadows' own generation time, not in the run's cost per image
    cost_usd: float | None  # None when a shadow row's device has no price
    worst: tuple[WorstRow, ...]
    psnrs: tuple[float, ...]
    flagged: bool  # mean PSNR below the report's --min-psnr


@dataclass(frozen=True)
class ShadowReport:
    plans: tuple[PlanShadows, ...]
    min_psnr: float | None

    @property
    def flagged(self) -> tuple[PlanShadows, ...]:
        return tuple(plan for plan in self.plans if plan.flagged)

    def flag_lines(self) -> list[str]:
        return [
            f"plan {plan.plan_id}: shadow mean PSNR {plan.interval.mean:.2f} dB (95% interval "
            f"{plan.interval.low:.2f} to {plan.interval.high:.2f}, {plan.shadows} shadows) is below --min-psnr "
            f"{self.min_psnr:g}"
            for plan in self.flagged
        ]


def read_shadow_rows(files: OutputFiles) -> pd.DataFrame | None:
    """The shadow rows' ids, plans, devices and shadow_* columns; None when the run has no shadow columns."""
    import pyarrow.compute as pc

    if "shadow_psnr" not in files.columns:
        return None
    wanted = [c for c in ("id", "plan_id", "device", "device_name", "error", *SHADOW_COLUMNS) if c in files.columns]
    table = files.dataset().to_table(columns=wanted, filter=pc.field("shadow_psnr").is_valid())
    return table.to_pandas()


def summarize_shadows(files: OutputFiles, rows: pd.DataFrame, prices: Mapping[str, float],
                      min_psnr: float | None = None) -> ShadowReport | None:
    """Per plan, the fidelity its shadow rows measured; None when the run has no shadow row. `rows` are the
    report's annotated rows (for each plan's image count)."""
    from jobs.report import price_key_for, summarize_metric
    from pipelines.shadow import IDENTICAL_PSNR_DB, mean_interval

    shadows = read_shadow_rows(files)
    if shadows is None or shadows.empty:
        return None
    shadows = shadows.drop_duplicates("id", keep="last")
    shadows["plan"] = shadows["plan_id"].fillna(NO_PLAN).astype(str) if "plan_id" in shadows else NO_PLAN
    ok = rows[rows["ok"]]
    images_by_plan = (ok["plan_id"].fillna(NO_PLAN).astype(str) if "plan_id" in ok else
                      np.full(len(ok), NO_PLAN)).value_counts() if len(ok) else {}
    plans = []
    for plan_id, group in shadows.groupby("plan", sort=True):
        psnr = np.minimum(group["shadow_psnr"].to_numpy(float), IDENTICAL_PSNR_DB)
        interval = mean_interval(psnr)
        seconds = group["shadow_latency_s"].fillna(0.0).to_numpy(float)
        keys = [price_key_for(str(d or ""), str(n or ""), prices) for d, n in zip(group["device"], group["device_name"])]
        cost = None if any(k is None for k in keys) else float(sum(s / 3600.0 * prices[k] for s, k in zip(seconds, keys)))
        plans.append(PlanShadows(
            plan_id=str(plan_id),
            images=int(images_by_plan.get(plan_id, 0)),
            shadows=len(group),
            psnr=summarize_metric(psnr),
            ssim=summarize_metric(group["shadow_ssim"]),
            rel_err=summarize_metric(group["shadow_rel_err"]),
            interval=interval,
            device_seconds=float(seconds.sum()),
            cost_usd=cost,
            worst=worst_rows(files, group),
            psnrs=tuple(float(p) for p in psnr),
            flagged=min_psnr is not None and interval is not None and interval.mean < min_psnr,
        ))
    return ShadowReport(tuple(plans), min_psnr)


def worst_rows(files: OutputFiles, group: pd.DataFrame, count: int = WORST_SHOWN) -> tuple[WorstRow, ...]:
    """The `count` shadow rows of lowest PSNR (ties by id), with their PNGs."""
    worst = group.sort_values(["shadow_psnr", "id"], kind="stable").head(count)
    columns = ["id", "png"] + (["shadow_png"] if "shadow_png" in files.columns else [])
    images = files.read(columns, list(worst["id"])).drop_duplicates("id", keep="last").set_index("id")
    return tuple(
        WorstRow(
            image_id=str(row.id),
            psnr=float(row.shadow_psnr),
            ssim=float(row.shadow_ssim),
            rel_err=float(row.shadow_rel_err),
            cached_png=png_bytes(images["png"].get(row.id)) if "png" in images else None,
            uncached_png=_binary(images["shadow_png"].get(row.id)) if "shadow_png" in images else None,
        )
        for row in worst.itertuples(index=False)
    )


def _binary(value) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
