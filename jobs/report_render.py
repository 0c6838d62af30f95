"""Turn a `jobs.report.Report` into Markdown, self-contained HTML and PNG plots.

Both documents are rendered from one list of sections by Jinja2 templates (jobs/templates/), so they always
say the same thing. The HTML embeds its plots as data URIs and its styles inline: one file that can be
mailed or attached to a ticket, with no network access needed to open it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from jobs.report import GroupCost, MetricSummary, Report, SamplePair, decode_png

if TYPE_CHECKING:
    import pandas as pd

PLOT_FILES = {
    "latency_hist.png": "Per-image latency (device time per image) by device",
    "cost_per_image.png": "Cost per image by device and by node",
    "images_per_node.png": "Images finished per node over time",
}
SAMPLES_FILE = "samples.png"
SAMPLES_CAPTION = (
    "Baseline and cached image of the same request, for the compared images with the worst, median and best "
    "PSNR; the third column is their absolute difference, amplified"
)
# Differences of a few grey levels are what caching causes; unamplified they would look black.
DIFFERENCE_GAIN = 4


# ----------------------------------------------------------------------------------------------------
# Number formatting


def format_usd(value: float | None) -> str:
    """Dollars with three significant digits below $1 (per-image costs are fractions of a cent)."""
    if value is None:
        return "n/a"
    if value >= 100:
        return f"${value:,.0f}"
    if value >= 1:
        return f"${value:,.2f}"
    if value == 0:
        return "$0"
    return "$" + np.format_float_positional(value, precision=3, unique=False, fractional=False, trim="-")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1:  # a per-image latency on a GPU, or a tiny test run: "0.0 s" would hide it
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_count(value: int) -> str:
    return f"{value:,}"


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def format_fraction(part: int, whole: int) -> str:
    """'30 of 50 (40.0% reused)'."""
    if not whole:
        return "n/a"
    return f"{format_count(part)} of {format_count(whole)} ({100 * (1 - part / whole):.1f}% reused)"


def format_metric(value: float | None, name: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if name == "psnr" else f"{value:.4f}"


# ----------------------------------------------------------------------------------------------------
# Document model: what both renderers draw


@dataclass(frozen=True)
class KeyValues:
    items: Sequence[tuple[str, str, str]]  # (html id, label, value)
    kind: ClassVar[str] = "key_values"


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    table_id: str
    kind: ClassVar[str] = "table"


@dataclass(frozen=True)
class Paragraph:
    text: str
    kind: ClassVar[str] = "paragraph"


@dataclass(frozen=True)
class Figure:
    file_name: str
    caption: str
    kind: ClassVar[str] = "figure"


@dataclass(frozen=True)
class Section:
    title: str
    blocks: Sequence[KeyValues | Table | Paragraph | Figure]


def build_sections(report: Report, plot_names: Sequence[str]) -> list[Section]:
    sections = [summary_section(report), caching_section(report), device_section(report), node_section(report)]
    if report.quality:
        sections.append(quality_section(report.quality))
    if report.baseline is not None:
        sections.append(baseline_section(report, SAMPLES_FILE in plot_names))
    if report.shadow is not None:
        sections.append(shadow_section(report, plot_names))
    if report.error_reasons:
        sections.append(errors_section(report))
    sections.append(Section("Plots", [Figure(name, PLOT_FILES[name]) for name in plot_names if name in PLOT_FILES]))
    sections.append(method_section(report))
    return sections


def _joined(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "n/a"


def _format_period(report: Report) -> str:
    if report.started_at is None or report.finished_at is None:
        return "n/a"
    return f"{report.started_at:%Y-%m-%d %H:%M:%S} to {report.finished_at:%Y-%m-%d %H:%M:%S}"


def summary_section(report: Report) -> Section:
    per_thousand = report.cost_per_image_usd * 1000 if report.cost_per_image_usd is not None else None
    per_device_hour = f"{report.images_per_device_hour:,.0f}" if report.images_per_device_hour is not None else "n/a"
    items = [
        ("run", "Run", report.out_uri),
        ("models", "Models", _joined(report.models)),
        ("policies", "Cache policies", _joined(report.policies)),
        ("plans", "Plans", _joined(report.plan_ids)),
        ("images", "Images", format_count(report.images)),
        ("error-rows", "Error rows", format_count(report.error_rows)),
        ("period", "Period (UTC)", _format_period(report)),
        ("wall-time", "Wall time", format_duration(report.wall_seconds)),
        # The wording `invardiff generate` prints when it ends (jobs/throughput.py).
        ("throughput", "Throughput", report.throughput.describe()),
        ("device-time", "Device time", format_duration(report.device_seconds)),
        ("images-per-device-hour", "Images per device-hour", per_device_hour),
        ("total-cost", "Total cost", format_usd(report.total_cost_usd)),
        ("cost-per-image", "Cost per image", format_usd(report.cost_per_image_usd)),
        ("cost-per-1k", "Cost per 1,000 images", format_usd(per_thousand)),
    ]
    blocks: list = [KeyValues(items)]
    if report.unpriced_devices:
        blocks.append(
            Paragraph(
                f"No price for {_joined(report.unpriced_devices)}, so costs that include them are n/a. "
                "Add a price with --price 'NAME=USD_PER_HOUR' or in a --prices file."
            )
        )
    if report.duplicate_ids:
        blocks.append(Paragraph(f"{report.duplicate_ids} image id(s) appear more than once; each row was counted."))
    return Section("Summary", blocks)


def caching_section(report: Report) -> Section:
    return Section(
        "Caching",
        [
            KeyValues(
                [
                    ("steps", "Denoising steps computed", format_fraction(report.steps_computed, report.steps_total)),
                    (
                        "module-evals",
                        "Module evaluations computed",
                        format_fraction(report.module_evals_computed, report.module_evals_total),
                    ),
                ]
            )
        ],
    )


def _group_row(group: GroupCost, first: str) -> list[str]:
    return [
        first,
        format_count(group.images),
        format_count(group.errors),
        format_duration(group.device_seconds),
        format_duration(group.mean_latency_s),
        format_usd(group.cost_usd),
        format_usd(group.cost_per_image_usd),
    ]


_GROUP_HEADERS = ["Images", "Errors", "Device time", "Mean latency / image", "Cost", "Cost / image"]


def device_section(report: Report) -> Section:
    rows = []
    for group in report.by_device:
        row = _group_row(group, group.name)
        row.insert(1, format_usd(group.usd_per_hour) + "/h" if group.usd_per_hour is not None else "n/a")
        rows.append(row)
    return Section("Cost by device", [Table(["Device", "Price", *_GROUP_HEADERS], rows, "by-device")])


def node_section(report: Report) -> Section:
    rows = []
    for group in report.by_node:
        row = _group_row(group, group.name)
        row.insert(1, _joined(group.devices))
        rows.append(row)
    return Section("Cost by node", [Table(["Node", "Devices", *_GROUP_HEADERS], rows, "by-node")])


def _metric_rows(metrics: Mapping[str, MetricSummary]) -> list[list[str]]:
    return [
        [
            name,
            format_count(summary.count),
            format_metric(summary.mean, name),
            format_metric(summary.median, name),
            format_metric(summary.minimum, name),
            format_metric(summary.maximum, name),
            # Only PSNR can tell identical images apart (it is infinite for them).
            format_count(summary.identical) if name == "psnr" else "–",
        ]
        for name, summary in metrics.items()
    ]


_METRIC_HEADERS = ["Metric", "Images", "Mean", "Median", "Min", "Max", "Identical"]


def quality_section(quality: Mapping[str, MetricSummary]) -> Section:
    return Section(
        "Quality",
        [
            Paragraph(
                "Per-image quality columns of the output rows. Identical images (infinite PSNR) are "
                "counted apart and left out of the mean."
            ),
            Table(_METRIC_HEADERS, _metric_rows(quality), "quality"),
        ],
    )


def baseline_section(report: Report, with_samples: bool = False) -> Section:
    baseline = report.baseline
    assert baseline is not None
    blocks: list = [
        KeyValues(
            [
                ("baseline", "Baseline run", baseline.uri),
                ("matched", "Images compared", format_count(baseline.matched_images)),
                ("speedup", "Device-time speedup", format_ratio(baseline.latency_speedup)),
                ("median-speedup", "Median per-image speedup", format_ratio(baseline.median_image_speedup)),
                ("cost-ratio", "Cost vs baseline", format_ratio(baseline.cost_ratio)),
                (
                    "baseline-cost-per-image",
                    "Baseline cost per image",
                    format_usd(baseline.baseline_cost_per_image_usd),
                ),
                ("cached-cost-per-image", "This run's cost per image", format_usd(baseline.cached_cost_per_image_usd)),
            ]
        )
    ]
    if baseline.fidelity:
        blocks.append(
            Paragraph(
                f"Fidelity of this run's images to the baseline's, on {format_count(baseline.fidelity_images)} "
                "image(s) of the same ids (PSNR in dB; SSIM with an 11-px Gaussian window)."
            )
        )
        blocks.append(Table(_METRIC_HEADERS, _metric_rows(baseline.fidelity), "fidelity"))
    if with_samples:
        blocks.append(Figure(SAMPLES_FILE, SAMPLES_CAPTION))
    blocks.extend(Paragraph(f"Note: {note}.") for note in baseline.notes)
    return Section("Against the uncached baseline", blocks)


SHADOW_HIST_FILE = "shadow_psnr.png"
SHADOW_WORST_FILE = "shadow_worst.png"


def shadow_section(report: Report, plot_names: Sequence[str] = ()) -> Section:
    """Fidelity per plan from the shadow rows (jobs/report_shadow.py)."""
    shadow = report.shadow
    assert shadow is not None
    blocks: list = [
        Paragraph(
            "Shadow rows were also generated uncached on the same actor (a fraction of the rows chosen by a hash of "
            "id and seed, blind to the image). Their PSNR/SSIM to the uncached image and the relative error of the "
            "final sample estimate the whole run's fidelity; the interval is a 95% Student-t interval for the mean "
            "PSNR over all of the plan's images, for this many shadows. Their device time is not in the cost per "
            "image above."
        )
    ]
    rows = []
    for plan in shadow.plans:
        interval = plan.interval
        ci = (f"{interval.low:.2f} to {interval.high:.2f}" if interval is not None and interval.count > 1 else "n/a")
        share = f"{plan.cost_usd / report.total_cost_usd:.1%}" if plan.cost_usd is not None and report.total_cost_usd else "n/a"
        rows.append([
            plan.plan_id, f"{format_count(plan.shadows)} of {format_count(plan.images)}",
            format_metric(plan.psnr.mean, "psnr"), ci, format_metric(plan.psnr.minimum, "psnr"),
            format_metric(plan.ssim.mean, "ssim"), format_metric(plan.rel_err.mean, "rel_err"),
            format_duration(plan.device_seconds), f"{format_usd(plan.cost_usd)} ({share})",
            ("BELOW " if plan.flagged else "ok, ≥ ") + f"{shadow.min_psnr:g} dB" if shadow.min_psnr is not None else "–",
        ])
    blocks.append(Table(["Plan", "Shadows", "Mean PSNR", "95% interval", "Min PSNR", "Mean SSIM", "Mean rel err",
                         "Shadow device time", "Shadow cost (of total)", "--min-psnr"], rows, "shadow-fidelity"))
    blocks.extend(Paragraph(f"FIDELITY BELOW BOUND: {line}.") for line in shadow.flag_lines())
    worst = [[plan.plan_id, row.image_id, format_metric(row.psnr, "psnr"), format_metric(row.ssim, "ssim"),
              format_metric(row.rel_err, "rel_err")] for plan in shadow.plans for row in plan.worst]
    blocks.append(Table(["Plan", "Worst shadow rows", "PSNR", "SSIM", "Rel err"], worst, "shadow-worst"))
    if SHADOW_HIST_FILE in plot_names:
        blocks.append(Figure(SHADOW_HIST_FILE, "Shadow PSNR to uncached, by plan"))
    if SHADOW_WORST_FILE in plot_names:
        blocks.append(Figure(SHADOW_WORST_FILE, "The worst shadow rows: uncached image, cached image, and their "
                                                "absolute difference, amplified"))
    else:
        blocks.append(Paragraph("Generate with --keep-shadow-images to see the worst rows beside their uncached "
                                "images here."))
    return Section("Fidelity from shadow rows", blocks)


def plot_shadow_psnr(shadow) -> bytes:
    figure = _new_figure()
    axes = figure.subplots()
    values = [v for plan in shadow.plans for v in plan.psnrs]
    edges = np.histogram_bin_edges(values, bins=min(40, max(5, len(values) // 3)))
    for plan in shadow.plans:
        axes.hist(plan.psnrs, bins=edges, alpha=0.6, label=f"{plan.plan_id} ({plan.shadows})")
    if shadow.min_psnr is not None:
        axes.axvline(shadow.min_psnr, color="#c44e52", linestyle="--", label=f"--min-psnr {shadow.min_psnr:g}")
    axes.set_xlabel("PSNR to uncached (dB)")
    axes.set_ylabel("shadow rows")
    axes.legend(fontsize="small")
    axes.set_title("Fidelity of the shadow rows")
    return _png(figure)


def _shadow_worst_pairs(shadow) -> list[SamplePair]:
    return [SamplePair(f"{plan.plan_id} worst {rank + 1}", row.image_id, row.psnr, row.uncached_png, row.cached_png)
            for plan in shadow.plans for rank, row in enumerate(plan.worst)
            if row.uncached_png is not None and row.cached_png is not None]


def errors_section(report: Report) -> Section:
    rows = [[reason, format_count(count)] for reason, count in report.error_reasons[:20]]
    blocks: list = [Table(["Error", "Rows"], rows, "errors")]
    if len(report.error_reasons) > 20:
        blocks.append(Paragraph(f"… and {len(report.error_reasons) - 20} more distinct errors."))
    return Section("Errors", blocks)


def method_section(report: Report) -> Section:
    prices = ", ".join(f"{key} {format_usd(value)}/h" for key, value in report.prices_used.items()) or "none"
    return Section(
        "How these numbers are made",
        [
            Paragraph(
                "Device time is the sum of each row's latency_s (its batch's generation time divided by the "
                "batch size), error rows included because their time was paid for. Cost is device time times "
                f"the device's hourly price ({prices}); cost per image divides it by the images without error."
            ),
            Paragraph(
                "Wall time runs from the first batch's start (finished_at minus latency_s × batch_size) to "
                "the last row's finished_at. Speedups compare the same image ids in both runs."
            ),
        ],
    )


# ----------------------------------------------------------------------------------------------------
# Markdown and HTML (Jinja2 templates in jobs/templates/, shipped as package data)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _looks_numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] == "$")


def _templates(autoescape: bool):
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("jobs", "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the render instead of printing nothing
        keep_trailing_newline=True,
    )
    environment.filters["md_cell"] = _md_cell
    environment.filters["md_key_value"] = lambda item: [f"**{item[1]}**", item[2]]
    environment.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    environment.tests["numeric_text"] = lambda text: _looks_numeric(str(text))
    return environment


def render_markdown(report: Report, plots: Mapping[str, bytes]) -> str:
    template = _templates(autoescape=False).get_template("report.md.j2")
    return template.render(report=report, sections=build_sections(report, list(plots))).rstrip("\n") + "\n"


def render_html(report: Report, plots: Mapping[str, bytes]) -> str:
    template = _templates(autoescape=True).get_template("report.html.j2")
    return template.render(report=report, sections=build_sections(report, list(plots)), plots=plots).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot state, no display needed)


def _new_figure(width: float = 7.5, height: float = 4.0):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _empty_note(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="#5a6272")
    axes.set_xticks([])
    axes.set_yticks([])


def plot_latency_histogram(rows: pd.DataFrame) -> bytes:
    figure = _new_figure()
    axes = figure.subplots()
    ok = rows[rows["ok"]]
    if ok.empty:
        _empty_note(axes, "no images")
    else:
        edges = np.histogram_bin_edges(ok["latency_s"], bins=min(50, max(5, len(ok) // 4)))
        for device_name, group in ok.groupby("device_name", sort=True):
            axes.hist(group["latency_s"], bins=edges, alpha=0.6, label=f"{device_name} ({len(group)})")
        axes.set_xlabel("latency per image (s)")
        axes.set_ylabel("images")
        axes.legend(fontsize="small")
    axes.set_title("Latency per image")
    return _png(figure)


def _cost_bars(axes, groups: Sequence[GroupCost], title: str) -> None:
    if not groups:
        _empty_note(axes, "no rows")
        axes.set_title(title)
        return
    labels = [_short(group.name, 22) for group in groups]
    values = [group.cost_per_image_usd or 0.0 for group in groups]
    positions = np.arange(len(groups))
    axes.barh(positions, values, color="#4c72b0")
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    for position, group in zip(positions, groups, strict=True):
        axes.text(values[position], position, " " + format_usd(group.cost_per_image_usd), va="center", fontsize="small")
    axes.set_xlabel("USD per image")
    axes.set_xlim(0, max(values) * 1.35 or 1)
    axes.set_title(title)


def plot_cost_per_image(report: Report) -> bytes:
    figure = _new_figure(width=10, height=max(3.0, 0.45 * max(len(report.by_device), len(report.by_node)) + 1.5))
    device_axes, node_axes = figure.subplots(1, 2)
    _cost_bars(device_axes, report.by_device, "by device")
    _cost_bars(node_axes, report.by_node, "by node")
    return _png(figure)


def plot_images_per_node(rows: pd.DataFrame) -> bytes:
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure()
    axes = figure.subplots()
    ok = rows[rows["ok"]].dropna(subset=["finished_at"])
    if ok.empty:
        _empty_note(axes, "no images")
    else:
        start = rows["started_at"].min()
        for node_id, group in ok.groupby("node_id", sort=True):
            minutes = np.sort((group["finished_at"] - start).dt.total_seconds().to_numpy() / 60.0)
            axes.step(
                np.concatenate([[0.0], minutes]),
                np.arange(len(minutes) + 1),
                where="post",
                label=f"{_short(str(node_id))} ({len(minutes)})",
            )
        axes.set_xlabel("minutes since the first batch started")
        axes.set_ylabel("images finished")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize="small")
    axes.set_title("Images per node over time")
    return _png(figure)


def plot_samples(samples: Sequence[SamplePair], reference_title: str = "baseline") -> bytes:
    """One row per sample (worst, median, best PSNR): baseline, cached, and |difference| x DIFFERENCE_GAIN,
    each row labelled with what it is, the image id and its PSNR."""
    figure = _new_figure(width=7.5, height=2.3 * len(samples) + 0.4)
    axes = figure.subplots(len(samples), 3, squeeze=False)
    for index, (row, sample) in enumerate(zip(axes, samples, strict=True)):
        reference, cached = decode_png(sample.baseline_png), decode_png(sample.cached_png)
        difference = np.abs(reference.astype(np.int16) - cached.astype(np.int16)).max(axis=2)
        amplified = np.clip(difference * DIFFERENCE_GAIN, 0, 255).astype(np.uint8)
        psnr = "identical" if np.isinf(sample.psnr) else f"PSNR {sample.psnr:.1f} dB"
        for ax, image, title in zip(
            row, (reference, cached, amplified), (reference_title, "cached", f"|difference| × {DIFFERENCE_GAIN}"),
            strict=True,
        ):
            gray = image.ndim == 2 or image.shape[2] == 1
            ax.imshow(image.squeeze() if gray else image, cmap="gray" if gray else None, vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if index == 0:
                ax.set_title(title, fontsize="small")
        row[0].set_ylabel(f"{sample.label}\n{_short(sample.image_id, 24)}\n{psnr}", rotation=0, ha="right",
                          va="center", fontsize="small")
    return _png(figure)


def render_plots(report: Report, rows: pd.DataFrame) -> dict[str, bytes]:
    plots = {
        "latency_hist.png": plot_latency_histogram(rows),
        "cost_per_image.png": plot_cost_per_image(report),
        "images_per_node.png": plot_images_per_node(rows),
    }
    if report.baseline is not None and report.baseline.samples:
        plots[SAMPLES_FILE] = plot_samples(report.baseline.samples)
    if report.shadow is not None:
        plots[SHADOW_HIST_FILE] = plot_shadow_psnr(report.shadow)
        pairs = _shadow_worst_pairs(report.shadow)
        if pairs:
            plots[SHADOW_WORST_FILE] = plot_samples(pairs, reference_title="uncached")
    return plots
