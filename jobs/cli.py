"""The `invardiff` command line.

Heavy libraries (torch, diffusers, ray) are imported inside commands, so `--help` answers at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup


class _OneLineUsageErrors(TyperGroup):
    """The top group, so every command says a usage error (an unknown option, a value out of range, a missing
    option) in one line on stderr with exit code 2, instead of click's framed panel of five."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _usage_errors_in_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx):
        with _usage_errors_in_one_line():  # subcommands parse their options in here
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_in_one_line():
    from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer vendors its own click

    try:
        yield
    except NoArgsIsHelpError:  # a bare group: its help, as before
        raise
    except UsageError as error:
        command = error.ctx.command_path if error.ctx is not None else "invardiff"
        message = " ".join(error.format_message().split()).rstrip(".")
        typer.echo(f"error: {message} (see `{command} --help`)", err=True)
        raise typer.Exit(error.exit_code) from None


app = typer.Typer(
    name="invardiff",
    cls=_OneLineUsageErrors,
    help=(
        "Synthesize image datasets with diffusion transformers on Ray, 2-3x cheaper per image with "
        "InvarDiff caching.\n\n"
        "Quick start (embedded digits model, local Ray):\n\n"
        "  invardiff generate --classes 0-9 --per-class 8 --seed 0 --out out/digits\n\n"
        "  invardiff calibrate --out plan.json\n\n"
        "  invardiff generate --classes 0-9 --per-class 8 --seed 0 --plan plan.json --out out/cached"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
plan_app = typer.Typer(help="Inspect InvarDiff plans.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")


@app.callback()
def _console_options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", envvar="INVARDIFF_VERBOSE",
        help="Also show Ray's own progress and logs, worker output and debug messages.",
    ),
) -> None:
    from jobs.console import configure

    configure(verbose)


class UserError(Exception):
    """A problem with what the user asked for: printed as one clear message, exit code 2."""


# Exit codes are the same in every command: 2 bad input (found before any work), 1 a failed run, 3 a plan stored
# but not promoted, 4 measured fidelity below --min-psnr (generate --stop-on-drift stopped the run, or report
# flagged it). Each command's --help lists the ones it can return.
EXIT_BAD_INPUT = "2 bad input, found before any work (one line on stderr)"


def exit_codes(*codes: str) -> str:
    return "Exit codes: 0 success; " + "; ".join(codes) + "."


MODEL_HELP = (
    "Model: 'digits' (embedded class-conditional DiT, the default), 'tiny-dit', 'tiny-flux', or a "
    "diffusers-layout DiT-XL/2 or FLUX.1 checkpoint as a local path or URI (s3://...). 'loadtest[:SECONDS]' "
    "is no model: a stand-in costing SECONDS per batch (default 0), to measure the job's own capacity."
)


def _generator_config(model, steps, guidance, dtype, device, height, width, true_cfg):
    from jobs.ray_runtime import storage_options_for
    from pipelines.build import GeneratorConfig

    _check_dtype_and_device(dtype, device)
    _check_local_model(model)

    return GeneratorConfig(
        model=model,
        num_inference_steps=steps,
        guidance_scale=guidance,
        dtype=dtype,
        device=device,
        height=height,
        width=width,
        true_cfg_scale=true_cfg,
        storage_options=storage_options_for(model),
    )


def _check_dtype_and_device(dtype: str | None, device: str | None) -> None:
    from pipelines.build import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device is not None:
        import torch

        try:  # what every worker does with it: a typo fails here, not in each actor after Ray has started
            torch.device(device)
        except RuntimeError:
            raise UserError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None


def _check_local_model(model: str) -> None:
    """A checkpoint named by a local path, checked before anything loads (a URI is checked when it is fetched)."""
    from pipelines import loadtest
    from pipelines.build import EMBEDDED_MODELS
    from pipelines.fetch import local_model_dir

    if model in EMBEDDED_MODELS or loadtest.is_loadtest(model) or not _is_local(model):
        return
    try:
        local_model_dir(model)
    except FileNotFoundError:
        raise UserError(f"--model {model}: no such folder; give digits, tiny-dit, tiny-flux, loadtest[:SECONDS], or "
                        "a diffusers checkpoint folder or URI") from None
    except NotADirectoryError:
        raise UserError(f"--model {model} is a file; give the checkpoint's folder") from None
    except ValueError as e:  # a folder without a diffusers layout
        raise UserError(f"--model {model}: {e}") from None


# The settings a plan is tied to. `generate` and `calibrate` declare them once, here, so that the flags a plan was
# calibrated with mean the same to the generate that uses it (names, defaults, help).
_GENERATOR_OPTIONS = {
    "model": (str, typer.Option("digits", "--model", help=MODEL_HELP)),
    "steps": (Optional[int], typer.Option(None, "--steps", min=1, help="Denoising steps (default: DiT 50, FLUX 28).")),
    "guidance": (Optional[float], typer.Option(None, "--guidance", help="Guidance scale (default: the model's).")),
    "dtype": (str, typer.Option("float32", "--dtype", help="float32, bfloat16 or float16.")),
    "device": (Optional[str], typer.Option(None, "--device", help="cpu or cuda (default: cuda where there are GPUs).")),
    "height": (Optional[int], typer.Option(None, "--height", min=1, help="FLUX only: image height.")),
    "width": (Optional[int], typer.Option(None, "--width", min=1, help="FLUX only: image width.")),
    "true_cfg": (float, typer.Option(1.0, "--true-cfg", help="FLUX only: true CFG scale (>1 runs cond and uncond).")),
}


def _takes_generator_options(command):
    """`command(..., *, generator_config)` as a command with the options --model ... --true-cfg (after its own),
    handed to it as one pipelines.build.GeneratorConfig."""
    import functools
    import inspect

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "generator_config"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, (kind, option) in _GENERATOR_OPTIONS.items()]

    @functools.wraps(command)
    def with_generator(**options):
        settings = {name: options.pop(name) for name in _GENERATOR_OPTIONS}
        return command(**options, generator_config=_generator_config(**settings))

    with_generator.__signature__ = inspect.Signature(own + added)
    return with_generator


def _manifest_schema(model: str):
    from jobs.manifest import ManifestSchema
    from pipelines import digits

    if model == "digits":
        return ManifestSchema("class_label", num_classes=digits.NUM_CLASSES)
    if model == "tiny-flux":
        return ManifestSchema("prompt")
    from pipelines import loadtest

    if loadtest.is_loadtest(model):
        try:
            loadtest.batch_seconds(model)
        except ValueError as e:
            raise UserError(str(e)) from None
        return ManifestSchema("class_label", num_classes=loadtest.NUM_CLASSES)
    if model == "tiny-dit":
        from pipelines.tiny import tiny_dit

        return ManifestSchema("class_label", num_classes=tiny_dit(seed=0).config.num_embeds_ada_norm)
    from pipelines.build import detect_architecture
    from pipelines.fetch import local_model_dir

    from jobs.ray_runtime import storage_options_for

    model_dir = local_model_dir(model, storage_options=storage_options_for(model) or None)
    if detect_architecture(model_dir) == "flux":
        return ManifestSchema("prompt")
    config_file = model_dir / "transformer" / "config.json"
    if not config_file.exists():
        config_file = model_dir / "config.json"
    return ManifestSchema("class_label", num_classes=json.loads(config_file.read_text())["num_embeds_ada_norm"])


def _check_classes(class_ids: list[int], schema, model: str) -> None:
    """--classes against the model, said as the flag the user typed (the manifest check would name a row of a
    manifest they never wrote)."""
    if schema.condition != "class_label":
        raise UserError(f"--model {model} is conditioned on text: give --prompt TEXT (or a --manifest with a prompt "
                        "column), not --classes")
    outside = [c for c in class_ids if not 0 <= c < schema.num_classes]
    if outside:
        raise UserError(f"--classes: {outside[0]} is not a class of --model {model}, whose classes are "
                        f"0-{schema.num_classes - 1}")


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> Path:
    return Path(path.removeprefix("file://")).expanduser()


def _refuse_a_file_as_folder(flag: str, path: str) -> None:
    if _is_local(path) and _local_path(path).is_file():
        raise UserError(f"{flag} {path} is a file; give a folder (a new one, or one an earlier run wrote to)")


def _refuse_a_folder_as_file(flag: str, path: str) -> None:
    """Checked before the work, because the file is written after it (a plan after a whole calibration)."""
    if _is_local(path) and _local_path(path).is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {path.rstrip('/')}/plan.json")


def _resolve_latest_plan(store: Optional[str], config, address: Optional[str]) -> str:
    from jobs.plan_store import resolve_latest

    if not store:
        raise UserError("--plan latest needs a plan store: pass --store DIR_OR_URI or set $INVARDIFF_PLAN_STORE")
    plan = resolve_latest(store, config, address=address)
    typer.echo(f"using plan {plan.plan_id} (latest in {store})", err=True)
    return plan.to_json()


def _shipped_policy(plan_json: Optional[str], *, policy_name: Optional[str], dicache_threshold: Optional[float],
                    dicache_batch_mode: str) -> Optional[str]:
    """What the workers get for --policy/--plan: the plan document, a DiCache spec, or None (no caching)."""
    import json

    from invardiff.policies import POLICIES, policy_spec_json

    if policy_name is not None and policy_name not in POLICIES:
        raise UserError(f"--policy must be one of {', '.join(POLICIES)}, got {policy_name!r}")
    if policy_name != "dicache" and (dicache_threshold is not None or dicache_batch_mode != "row"):
        raise UserError("--dicache-threshold and --dicache-batch-mode apply to --policy dicache only")
    if policy_name in ("none", "dicache") and plan_json is not None:
        raise UserError(f"--policy {policy_name} takes no --plan")
    if policy_name in ("invardiff", "l2c"):
        if plan_json is None:
            hint = " (train one with `invardiff train-router`)" if policy_name == "l2c" else ""
            raise UserError(f"--policy {policy_name} needs --plan{hint}")
        method = json.loads(plan_json).get("calibration", {}).get("method")
        if (method == "l2c") != (policy_name == "l2c"):
            raise UserError(f"--policy {policy_name}: the plan was made by {method!r}")
    if policy_name == "dicache":
        if dicache_batch_mode not in ("row", "global"):
            raise UserError(f"--dicache-batch-mode must be row or global, got {dicache_batch_mode!r}")
        options = {"batch_mode": dicache_batch_mode}
        if dicache_threshold is not None:
            options["threshold"] = dicache_threshold
        return policy_spec_json("dicache", **options)
    return plan_json


def _load_plan_json(plan: Optional[str]) -> Optional[str]:
    if plan is None or plan == "none":
        return None
    from invardiff.plan import Plan
    from jobs.ray_runtime import storage_options_for

    try:
        return Plan.load(plan, storage_options=storage_options_for(plan) or None).to_json()
    except FileNotFoundError:
        raise UserError(f"--plan {plan}: no such file (a plan JSON from `invardiff calibrate --out`, or 'latest' "
                        "with --store)") from None


@app.command(
    epilog="Exit codes: 0 every asked row is written without error; 1 the run is incomplete (the counts say what "
    "is failed or missing; rerun to resume); 2 bad input, found before any work (one line); 4 --stop-on-drift "
    "stopped the run: the shadow rows' PSNR fell below --min-psnr (what was written stays); 130 interrupted."
)
@_takes_generator_options
def generate(
    out: str = typer.Option(..., "--out", help="Output directory or URI (s3://bucket/run1) for the Parquet files."),
    manifest: Optional[str] = typer.Option(
        None, "--manifest", help="Parquet or JSONL manifest (local path or URI): id, seed, class_label or prompt."
    ),
    classes: Optional[str] = typer.Option(
        None, "--classes", help="Instead of a manifest: class ids to draw, e.g. '0-9' or '1,3,7'."
    ),
    per_class: int = typer.Option(8, "--per-class", min=1, help="With --classes: images per class."),
    prompt: Optional[list[str]] = typer.Option(
        None, "--prompt", help="Instead of a manifest (FLUX models): a prompt; repeat the flag for more."
    ),
    per_prompt: int = typer.Option(1, "--per-prompt", min=1, help="With --prompt: images per prompt."),
    seed: int = typer.Option(0, "--seed", help="With --classes/--prompt: seed of the first row; row i gets seed+i."),
    plan: Optional[str] = typer.Option(
        None, "--plan", help="InvarDiff plan (JSON path or URI) to cache with, or 'latest': the store's latest plan "
        "for this model and settings. Omit for uncached generation."
    ),
    store: Optional[str] = typer.Option(
        None, "--store", envvar="INVARDIFF_PLAN_STORE", help="Plan store for --plan latest (directory or s3:// URI)."
    ),
    policy: Optional[str] = typer.Option(
        None, "--policy", help="Cache policy: none, invardiff (--plan), l2c (--plan from `invardiff train-router`) "
        "or dicache (no plan). Default: the plan's own method with --plan, else none."
    ),
    dicache_threshold: Optional[float] = typer.Option(
        None, "--dicache-threshold", min=0.0, help="--policy dicache: accumulated probe-error threshold (default 0.1)."
    ),
    dicache_batch_mode: str = typer.Option(
        "row", "--dicache-batch-mode", help="--policy dicache: row (each image decides for itself) or global "
        "(one decision per batch, as the reference code)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per model call on one actor."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Generation actors (default: one per GPU, or 1 on CPU)."
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)."
    ),
    rows_per_file: Optional[int] = typer.Option(
        None, "--rows-per-file", min=1, help="Minimum rows per Parquet file."
    ),
    max_attempts: int = typer.Option(
        3, "--max-attempts", min=1, help="Times a failed row is tried, over reruns, before it is left as failed."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace what earlier runs wrote to --out (only files invardiff wrote there)."
    ),
    break_lease: bool = typer.Option(
        False, "--break-lease", help="Take over --out from another job's lease (only when that job is known gone)."
    ),
    shadow: float = typer.Option(
        0.0, "--shadow", min=0.0, max=1.0, help="Fraction of rows (chosen by a hash of id and seed) also generated "
        "uncached on the same actor; their PSNR/SSIM/rel err to it land in shadow_* columns, their cost apart "
        "(`invardiff report`). 0.01 costs about 4% more compute on the digits model (BENCHMARKS.md section 8).",
    ),
    keep_shadow_images: bool = typer.Option(
        False, "--keep-shadow-images", help="With --shadow: also keep each shadow row's uncached PNG (shadow_png)."
    ),
    min_psnr: Optional[float] = typer.Option(
        None, "--min-psnr", help="With --shadow: drift alarm bound. When the shadows' mean PSNR is below it at 95% "
        "confidence (8+ shadows), the run logs it once and records it in _run.json.",
    ),
    stop_on_drift: bool = typer.Option(
        False, "--stop-on-drift", help="With --min-psnr: stop the run when the drift alarm trips (exit 4)."
    ),
    *,
    generator_config,
):
    """Generate images into Parquet with a Ray Data job: one row per manifest row (PNG + metrics).

    --out is owned by the job (_run.json records each run; _lease.json keeps one writer at a time). A rerun
    with the same --out generates the ids not written yet and retries failed rows (up to --max-attempts); it
    refuses an --out holding files invardiff did not write, or rows made with other settings.
    """
    import shlex
    import signal

    from jobs.generate import run_generate
    from jobs.manifest import parse_class_range, prompt_manifest
    from jobs.manifest_source import ClassRange, ManifestFile, ManifestTable
    from jobs.ray_runtime import storage_options_for

    sources = [s for s in (manifest, classes, prompt) if s]
    if len(sources) != 1:
        raise UserError("give exactly one of --manifest, --classes or --prompt")
    _refuse_a_file_as_folder("--out", out)
    schema = _manifest_schema(generator_config.model)
    if manifest:  # streamed: read in chunks on the driver to validate, then by Ray Data's readers
        table = ManifestFile(manifest, storage_options_for(manifest))
    elif classes:
        class_ids = parse_class_range(classes)
        _check_classes(class_ids, schema, generator_config.model)
        table = ClassRange(tuple(class_ids), per_class, seed)
    else:
        table = ManifestTable(prompt_manifest(list(prompt), per_prompt, seed))
    from jobs.shadow_watch import ShadowOptions

    try:
        shadow_options = ShadowOptions(shadow, keep_shadow_images, min_psnr, stop_on_drift)
    except ValueError as e:
        raise UserError(str(e)) from None
    # Ctrl-C stops the run cleanly even where the shell started us with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        summary = run_generate(
            table,
            out,
            generator_config,
            schema=schema,
            plan_json=_shipped_policy(
                _resolve_latest_plan(store, generator_config, address) if plan == "latest" else _load_plan_json(plan),
                policy_name=policy, dicache_threshold=dicache_threshold, dicache_batch_mode=dicache_batch_mode,
            ),
            batch_size=batch_size,
            workers=workers,
            address=address,
            rows_per_file=rows_per_file,
            max_attempts=max_attempts,
            overwrite=overwrite,
            break_lease=break_lease,
            command=shlex.join(["invardiff", *sys.argv[1:]]),
            shadow=shadow_options,
        )
    except KeyboardInterrupt as e:
        summary = getattr(e, "summary", None)
        if summary is not None:
            typer.echo(f"interrupted: {summary.reconciliation.line()}; what is written stays, rerun to resume", err=True)
        else:
            typer.echo("interrupted; what is committed stays, rerun to resume", err=True)
        raise typer.Exit(130) from None
    reconciliation = summary.reconciliation
    typer.echo(
        f"wrote {reconciliation.written - summary.rows_already_there} rows to {summary.out} "
        f"({reconciliation.failed} errors, {summary.rows_already_there} already there) in {summary.seconds:.1f}s: "
        f"{_run_throughput(summary)} on {summary.workers} {summary.device} worker(s)"
    )
    typer.echo(f"reconciled: {reconciliation.line()}")
    for reason, rows in reconciliation.reasons:
        typer.echo(f"  {rows} row(s) failed: {reason.splitlines()[0] if reason else '?'}", err=True)
    if summary.shadow is not None:
        typer.echo(_shadow_line(summary.shadow))
        if summary.shadow["stopped"]:
            typer.echo(f"error: {summary.failure}; {reconciliation.line()}", err=True)
            raise typer.Exit(EXIT_STOPPED_ON_DRIFT)
    if not summary.complete:
        why = f"{summary.failure}; " if summary.failure else ""
        typer.echo(f"error: run incomplete ({why}{reconciliation.line()}); rerun the same command to resume", err=True)
        raise typer.Exit(1)


EXIT_STOPPED_ON_DRIFT = 4


def _shadow_line(shadow: dict) -> str:
    mean = f"{shadow['mean_psnr']:.2f} dB mean PSNR" if shadow["mean_psnr"] is not None else "no PSNR yet"
    drift = f"; DRIFT: {shadow['drift']}" if shadow["drift"] else ""
    return f"shadow: {shadow['rows']} row(s) generated uncached too ({shadow['fraction']:g} asked), {mean}{drift}"


def _run_throughput(summary) -> str:
    """This run's images/s as `invardiff report` will state them (jobs/throughput.py), read from its rows."""
    from jobs.throughput import run_throughput

    if not summary.rows_attempted:
        return "nothing generated"
    try:
        return run_throughput(summary.out, summary.run_id).describe()
    except Exception as e:  # noqa: BLE001 - the rows are written; a failed read-back only loses a figure
        return f"images/s unknown ({type(e).__name__})"


def _parse_taus(values: Optional[list[str]]) -> dict[str, float]:
    taus = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            taus[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--tau takes FAMILY=VALUE (e.g. step=0.6 or attn=0.2), got {item!r}") from None
        if not 0.0 <= taus[name.strip()] <= 1.0:
            raise UserError(f"--tau {item}: a tau is a quantile in [0, 1]")
    return taus


@app.command(epilog=exit_codes("1 calibration failed", EXIT_BAD_INPUT, "3 --refresh: the new plan is stored but not "
                                "promoted (drift or held-out fidelity out of bounds); the previous plan stays latest"))
@_takes_generator_options
def calibrate(
    out: Optional[str] = typer.Option(None, "--out", help="Where to write the plan JSON (local path or URI)."),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Calibrate on Ray with this many workers (one GPU each when the cluster has GPUs)."
    ),
    store: Optional[str] = typer.Option(
        None, "--store", help="Plan store (directory or s3:// URI): version the plan, move `latest` (implies Ray)."
    ),
    refresh: bool = typer.Option(
        False, "--refresh", help="With --store: recalibrate even if a latest plan exists; compare, report drift, "
        "promote only within --min-jaccard / --max-speedup-change / --max-psnr-drop (exit 3 when not promoted)."
    ),
    min_jaccard: float = typer.Option(0.6, "--min-jaccard", min=0.0, max=1.0, help="--refresh: least Jaccard "
                                      "similarity of reuse masks (step gate and every family) to promote."),
    max_speedup_change: float = typer.Option(0.25, "--max-speedup-change", min=0.0, help="--refresh: largest "
                                             "relative change of the ideal speedup to promote."),
    max_psnr_drop: float = typer.Option(
        1.0, "--max-psnr-drop", help="--refresh: largest fall, in dB, of the mean PSNR to uncached on 8 held-out "
        "shadow runs generated on the workers, candidate vs current plan, to promote.",
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="With --workers/--store: Ray address (default: $RAY_ADDRESS, else local Ray)."
    ),
    preset: str = typer.Option(
        "balanced", "--preset", help="quality (2x), balanced (2.5x), fast (3x), turbo (4x): forecast plans placed by "
        "calibrated error; or a paper-mode tau bundle such as paper-dit-fast (`invardiff plan presets`)."
    ),
    target_speedup: Optional[float] = typer.Option(
        None, "--target-speedup", min=1.0, help="Forecast plan with at least this counted speedup (steps / computed "
        "steps); overrides --preset."
    ),
    max_rel_error: Optional[float] = typer.Option(
        None, "--max-rel-error", min=0.0, help="Forecast plan with the largest speedup whose relative error of the "
        "final sample, on the calibration runs, stays within this bound (then checked on held-out seeds)."
    ),
    tau: Optional[list[str]] = typer.Option(
        None, "--tau", help="Override one tau, FAMILY=VALUE (families: step, attn, ff for DiT). Repeatable."
    ),
    nonskip: Optional[float] = typer.Option(None, "--nonskip", min=0.0, max=1.0, help="Warm-up fraction of steps."),
    runs: Optional[int] = typer.Option(
        None, "--runs", min=1, help="Calibration runs (class labels or prompts, each its own seed); default 8 for "
        "forecast plans, 16 for paper-mode ones."
    ),
    seed: int = typer.Option(10_000, "--seed", min=0, help="Seed of the first calibration run."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="Calibration runs per forward batch, and per work chunk on Ray "
        "(default: 16; on Ray, runs/workers up to 16). The plan is identical for any worker count at one batch size."
    ),
    provisional_mode: str = typer.Option(
        "full", "--provisional-mode", help="Phase-1 plan that drives the phase-2 correction: full or dit-legacy."
    ),
    *,
    generator_config,
):
    """Calibrate a plan from deterministic uncached runs: one validated plan.

    Forecast presets and --target-speedup / --max-rel-error measure, for every way of filling a skipped step from
    the last two computed ones, the error it causes, and place the computed steps where the summed error is least.
    Paper presets (paper-*, copy-*) run the InvarDiff method exactly: two phases of change rates, quantile taus.

    --out alone runs in this process. --workers N and/or --store run on Ray and write a versioned plan to the
    store (see jobs/calibrate.py); --refresh also writes a drift report next to it. A plan is tied to the model weights, scheduler, steps, resolution, guidance and dtype it was calibrated
    with; `generate --plan` refuses it for anything else.
    """
    from invardiff.plan_report import format_plan
    from jobs.ray_runtime import storage_options_for
    from pipelines.build import build_generator
    from pipelines.calibration import TauBundle, calibrate as run_calibration, calibration_requests

    if provisional_mode not in ("full", "dit-legacy"):
        raise UserError(f"--provisional-mode must be full or dit-legacy, got {provisional_mode!r}")
    overrides = _parse_taus(tau)
    from invardiff.presets import FORECAST_PRESETS, PRESETS
    from pipelines.forecast_calibration import ForecastTarget

    # A name no architecture has is refused here; one the model's architecture has not, once that is known below.
    paper_presets = [name for bundles in PRESETS.values() for name in bundles]
    if preset not in FORECAST_PRESETS and preset not in paper_presets:
        raise UserError(f"--preset {preset!r} is not a preset: use {', '.join(FORECAST_PRESETS)} or a paper-mode one "
                        f"({', '.join(paper_presets)}); see `invardiff plan presets`")
    if out is not None:
        _refuse_a_folder_as_file("--out", out)

    if target_speedup is not None and max_rel_error is not None:
        raise UserError("give --target-speedup or --max-rel-error, not both")
    if max_rel_error is not None and max_rel_error <= 0:
        raise UserError(f"--max-rel-error must be > 0, got {max_rel_error}")
    goal = None
    if target_speedup is not None or max_rel_error is not None:
        goal = ForecastTarget(speedup=target_speedup, max_rel_error=max_rel_error)
    elif preset in FORECAST_PRESETS:
        goal = ForecastTarget(speedup=FORECAST_PRESETS[preset], name=preset)
    if goal is not None and (overrides or nonskip is not None):
        raise UserError("--tau and --nonskip apply to paper-mode presets (paper-*, copy-*), not to forecast plans")
    if runs is None:
        runs = 8 if goal is not None else 16

    def make_bundle(architecture: str):
        if goal is not None:
            return goal
        try:
            bundle = TauBundle.from_preset(architecture, preset)
        except ValueError as e:
            raise UserError(str(e)) from None
        unknown = sorted(set(overrides) - set(bundle.taus))
        if unknown:
            raise UserError(f"--tau: unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                            f"this model has {', '.join(bundle.taus)}")
        name = bundle.name if not overrides and nonskip is None else f"{bundle.name}+custom"
        return TauBundle(
            taus={**bundle.taus, **overrides},
            nonskip_rate=bundle.nonskip_rate if nonskip is None else nonskip,
            name=name,
        )

    from pipelines.build import known_architecture

    try:
        architecture = known_architecture(generator_config.model)
    except ValueError as e:  # a diffusers folder of another kind of pipeline
        raise UserError(f"--model {generator_config.model}: {e}") from None
    if architecture is not None:
        make_bundle(architecture)  # a preset or --tau family this model has not: refused before anything loads

    if workers is not None or store is not None:
        from jobs.calibrate import calibrate_command

        code = calibrate_command(
            generator_config, make_bundle,
            workers=1 if workers is None else workers, store=store, out=out, refresh=refresh, min_jaccard=min_jaccard,
            max_speedup_change=max_speedup_change, max_psnr_drop=max_psnr_drop, runs=runs, seed=seed, batch_size=batch_size,
            provisional_mode=provisional_mode, address=address,
        )
        if code:
            raise typer.Exit(code)
        return
    if refresh:
        raise UserError("--refresh compares against a plan store: give --store DIR_OR_URI")
    if out is None:
        raise UserError("give --out PLAN.json (single process) or --store DIR_OR_URI (Ray job, plan store)")
    generator = build_generator(generator_config)
    bundle = make_bundle(generator.architecture)
    requests = calibration_requests(generator, runs=runs, seed=seed)
    if goal is not None:
        from pipelines.forecast_calibration import calibrate_forecast

        what = f"{goal.speedup:g}x counted" if goal.speedup else f"relative error <= {goal.max_rel_error:g}"
        typer.echo(f"calibrating {generator.model_id}: {runs} runs x {generator.num_inference_steps} steps, "
                   f"forecast plan for {what}", err=True)  # fmt: skip
        from jobs.console import PhaseProgress

        # One line per phase: each target's candidate errors, counted in denoising steps (the slow part).
        with PhaseProgress(unit="steps") as phases:
            plan = calibrate_forecast(
                generator, goal, requests, batch_size=batch_size or 16,
                progress=lambda msg: (phases.close(), typer.echo(f"  {msg}", err=True)), on_steps=phases,
            )  # fmt: skip
    else:
        typer.echo(f"calibrating {generator.model_id}: {runs} runs x {generator.num_inference_steps} steps, two phases", err=True)
        from jobs.console import PhaseProgress

        with PhaseProgress(unit="runs") as phases:
            plan = run_calibration(
                generator, bundle, requests, batch_size=batch_size or 16, provisional_mode=provisional_mode,
                progress=lambda msg: typer.echo(f"  {msg}", err=True), on_runs=phases,
            )
    plan.save(out, storage_options=storage_options_for(out) or None)
    typer.echo(format_plan(plan))
    typer.echo(f"wrote plan {plan.plan_id} to {out}")


@app.command("train-router", epilog=exit_codes("1 training failed", EXIT_BAD_INPUT))
def train_router_command(
    plan_out: str = typer.Option(..., "--plan-out", help="Where to write the thresholded L2C plan (path or URI)."),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write the trained router (path or URI)."),
    lam: Optional[list[float]] = typer.Option(
        None, "--lam", min=0.0, help="Weight of the L1 penalty on the router scores (default 1e-4). Repeat for a "
        "sweep; then --out/--plan-out must contain '{lam}'."
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Train the lambdas as Ray tasks, this many at a time (default: one process)."
    ),
    address: Optional[str] = typer.Option(None, "--address", help="With --workers: Ray address (default: local)."),
    theta: float = typer.Option(0.1, "--theta", min=0.0, max=1.0, help="A unit is recomputed where score > theta."),
    from_router: Optional[str] = typer.Option(
        None, "--from-router", help="Threshold this saved router again instead of training (no --lam, no --out)."
    ),
    iterations: int = typer.Option(750, "--iterations", min=1, help="Training iterations (one step pair each)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Training images per iteration."),
    lr: float = typer.Option(0.2, "--lr", min=0.0, help="AdamW learning rate on the router logits."),
    seed: int = typer.Option(0, "--seed", help="Seed of the router init, data order, noise and label dropout."),
    model: str = typer.Option("digits", "--model", help="Model; router training needs its training data: 'digits'."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps the router is for."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Guidance scale the plan is for."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
):
    """Learning-to-Cache: train a per-step router (one process) and threshold it into a static plan.

    Run the plan with `invardiff generate --policy l2c --plan PLAN.json`.
    """
    from jobs.ray_runtime import storage_options_for
    from jobs.train_router import plan_from_router_file, train_router, train_router_sweep

    lams = lam or [1e-4]
    for flag, path in (("--plan-out", plan_out), ("--out", out)):
        if path is not None:
            _refuse_a_folder_as_file(flag, path)
    if from_router and (lam or workers):
        raise UserError("--from-router thresholds a trained router again: no --lam, no --workers")
    if len(lams) > 1 and not all("{lam}" in path for path in (plan_out, out) if path):
        raise UserError("with several --lam, --plan-out (and --out) must contain '{lam}'")
    config = _generator_config(model, steps, guidance, dtype, device, None, None, 1.0)
    training = dict(theta=theta, iterations=iterations, batch_size=batch_size, lr=lr, seed=seed)
    try:
        if from_router:
            options = storage_options_for(from_router) or None
            results = [(None, plan_from_router_file(from_router, config, theta, storage_options=options))]
        elif workers:
            results = [(t, t.plan) for t in train_router_sweep(config, lams, workers=workers, address=address,
                                                                **training)]
        else:
            progress = lambda msg: typer.echo(f"  {msg}", err=True)  # noqa: E731
            results = [(t, t.plan) for t in (train_router(config, value, progress=progress, **training)
                                             for value in lams)]
    except ValueError as e:  # a model without training data, a router for another pipeline
        raise UserError(str(e)) from None
    for value, (trained, plan) in zip(lams, results):
        if trained is not None and out:
            router_path = out.replace("{lam}", f"{value:g}")
            trained.router.save(router_path, storage_options=storage_options_for(router_path) or None)
            typer.echo(f"wrote router to {router_path} ({trained.router.training['wall_seconds']:.0f} s of training)")
        plan_path = plan_out.replace("{lam}", f"{value:g}")
        plan.save(plan_path, storage_options=storage_options_for(plan_path) or None)
        kept = plan.calibration["kept_per_cache_step"]
        typer.echo(f"units recomputed per cache step (of {plan.calibration['units_per_step']}, noisy to clean): "
                   f"{kept}")
        typer.echo(f"wrote L2C plan {plan.plan_id} to {plan_path} "
                   f"(ideal speedup {plan.summary()['ideal_speedup']:.2f}x)")


@plan_app.command("show", epilog=exit_codes(EXIT_BAD_INPUT))
def plan_show(
    plan: str = typer.Argument(..., help="Plan JSON (local path or URI)."),
    heatmaps: Optional[Path] = typer.Option(
        None, "--heatmaps", help="Also write the rho and plan heatmaps (PNG) to this directory."
    ),
    modules: bool = typer.Option(False, "--modules", help="Also print the per-layer module books."),
):
    """Print a plan's gated steps, reuse share per family and longest reuse run; with --heatmaps DIR, write
    rho/plan heatmaps there. Nothing is written without it."""
    from invardiff.plan import Plan
    from invardiff.plan_report import format_plan, write_heatmaps
    from jobs.ray_runtime import storage_options_for

    try:
        loaded = Plan.load(plan, storage_options=storage_options_for(plan) or None)
    except FileNotFoundError:
        raise UserError(f"{plan}: no such plan file") from None
    typer.echo(format_plan(loaded, show_modules=modules))
    if heatmaps is None:
        return
    for path in write_heatmaps(loaded, heatmaps):
        typer.echo(f"wrote {path}")


@plan_app.command("list", epilog=exit_codes(EXIT_BAD_INPUT))
def plan_list(store: str = typer.Option(..., "--store", envvar="INVARDIFF_PLAN_STORE", help="Plan store.")):
    """List a plan store: one key per model + pipeline signature, its versions, which one is latest."""
    from jobs.plan_store import PlanStore, format_listing

    plan_store = PlanStore(store)
    plan_store.check_reachable()
    typer.echo(format_listing(plan_store))


@plan_app.command("presets", epilog=exit_codes(EXIT_BAD_INPUT))
def plan_presets(architecture: str = typer.Option("dit", "--architecture", help="dit or flux.")):
    """List the presets: forecast targets (the defaults), then the paper-mode tau bundles."""
    from invardiff.presets import FORECAST_PRESETS, PRESETS

    if architecture not in PRESETS:
        raise UserError(f"--architecture must be one of {', '.join(PRESETS)}")
    for name, speedup in FORECAST_PRESETS.items():
        typer.echo(f"{name:22s} forecast, {speedup:g}x counted speedup, computed steps placed by calibrated error")
    for name, preset in PRESETS[architecture].items():
        taus = ", ".join(f"{k}={v:g}" for k, v in preset["taus"].items())
        typer.echo(f"{name:22s} nonskip={preset['nonskip_rate']:g}  {taus}")


# --- Cluster: submit / jobs / report. The command functions live in jobs/submit.py and jobs/report.py
# (tested there against a fake Jobs API); here they only get their names and group help.
from jobs import report as _report  # noqa: E402 - numpy + typer only; pandas/torch load inside the command
from jobs import submit as _submit  # noqa: E402 - ray.job_submission loads only when a cluster is contacted

submit_app = typer.Typer(
    help=(
        "Run `invardiff generate|calibrate ...` as a Ray job on a cluster (Ray Jobs API, dashboard port 8265).\n\n"
        "Options this command does not know pass through to the remote command; the project directory is "
        "shipped as the job's working_dir (without weights, outputs or environments).\n\n"
        "  invardiff submit generate --address http://HEAD:8265 --wait -- --classes 0-9 --per-class 8 "
        "--out s3://bucket/run1\n\n"
        "  invardiff submit calibrate --address http://HEAD:8265 -- --workers 4 --store s3://bucket/plans\n\n"
        "Clusters with token auth need RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH). A local test cluster: "
        "cluster/local-multinode.sh start."
    ),
    no_args_is_help=True,
)
for _name in ("generate", "calibrate"):
    submit_app.command(
        _name, context_settings=_submit.PASSTHROUGH_CONTEXT_SETTINGS,
        epilog=exit_codes("1 not submitted, or with --wait the job did not succeed", EXIT_BAD_INPUT),
    )(_submit._submit_command_for(_name))
app.add_typer(submit_app, name="submit")

jobs_app = typer.Typer(
    help=(
        "Follow jobs submitted with `invardiff submit`: status, logs, stop, list.\n\n"
        "  invardiff jobs logs raysubmit_XXXX --follow --address http://HEAD:8265"
    ),
    no_args_is_help=True,
)
_JOBS_EXIT_CODES = exit_codes("1 the cluster could not be reached or answered an error", EXIT_BAD_INPUT)
jobs_app.command("status", epilog=_JOBS_EXIT_CODES)(_submit.jobs_status_command)
jobs_app.command("logs", epilog=_JOBS_EXIT_CODES)(_submit.jobs_logs_command)
jobs_app.command("stop", epilog=_JOBS_EXIT_CODES)(_submit.jobs_stop_command)
jobs_app.command("list", epilog=_JOBS_EXIT_CODES)(_submit.jobs_list_command)
app.add_typer(jobs_app, name="jobs")

app.command(
    "report",
    epilog=(
        "Example: invardiff report out/cached --baseline out/uncached --out reports/cached "
        "--price H100=2.10. Writes report.md, report.html and PNG plots; nothing is written when an "
        "input is bad (including a baseline whose rows were made from other seeds or classes/prompts). "
        + exit_codes(EXIT_BAD_INPUT, "4 --min-psnr: a plan's shadow rows' mean PSNR is below the bound (the "
                     "report is written and names it)")
    ),
)(_report.report_command)


@app.command(epilog=exit_codes("1 the benchmark failed", EXIT_BAD_INPUT))
def bench(
    out: Path = typer.Option(..., "--out", help="Directory for table.md, pareto.png and results.json."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run, one point per method (<= 5 min on 2 CPUs)."),
    model: str = typer.Option(
        "digits", "--model", help="digits, tiny-dit, tiny-flux, or a DiT-XL/2 or FLUX checkpoint path/URI."
    ),
    random_dit_xl: bool = typer.Option(False, "--random-dit-xl", help="DiT-XL/2 256px, random init (GPU timing)."),
    images: Optional[int] = typer.Option(None, "--images", min=1, help="Evaluated images."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per timing round."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda."),
    lpips_weights: Optional[str] = typer.Option(None, "--lpips-weights", help="Local LPIPS backbone weights."),
    fid_weights: Optional[str] = typer.Option(None, "--fid-weights", help="Local Inception weights for FID."),
):
    """Benchmark InvarDiff against diffusers' caches, cache-dit and simple baselines: speed vs fidelity."""
    from benchmarks.bench import main as bench_main

    _check_dtype_and_device(dtype, device)

    argv = ["--out", str(out), "--model", model]
    argv += ["--quick"] * quick + ["--random-dit-xl"] * random_dit_xl
    for flag, value in (("--images", images), ("--batch-size", batch_size), ("--dtype", dtype),
                        ("--device", device), ("--lpips-weights", lpips_weights), ("--fid-weights", fid_weights)):
        if value is not None:
            argv += [flag, str(value)]
    bench_main(argv)


def _one_line_per_paragraph(text: str) -> str:
    """typer keeps a docstring's line breaks: a paragraph wrapped at 120 columns in the source would break mid-line
    on an 80-column terminal. Indented paragraphs (command examples) keep theirs."""
    return "\n\n".join(
        paragraph if paragraph.startswith(" ") else " ".join(line.strip() for line in paragraph.splitlines())
        for paragraph in text.split("\n\n")
    )


def _reflow_help(group: typer.Typer) -> None:
    import inspect

    for info in group.registered_commands:
        text = info.help if info.help is not None else inspect.getdoc(info.callback)
        if text:
            info.help = _one_line_per_paragraph(inspect.cleandoc(text))
    for info in group.registered_groups:
        _reflow_help(info.typer_instance)


_reflow_help(app)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from jobs.manifest import ManifestError

    known = (UserError, ManifestError, FileNotFoundError)
    try:
        from invardiff.plan import PlanError, PlanMismatchError

        known = known + (PlanError, PlanMismatchError)
    except ImportError:
        pass
    from jobs.plan_store import JobInputError

    known = known + (JobInputError,)
    try:
        app()
    except known as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
