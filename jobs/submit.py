"""Submit invardiff jobs to a Ray cluster's Jobs API, and follow them.

`invardiff submit generate|calibrate ... --address http://HEAD:8265` runs `invardiff generate|calibrate
...` as a Ray job: the entrypoint is our own CLI, shell-quoted; the project directory travels as the
job's `working_dir` without model weights, outputs, environments or caches; S3 settings of the
submitter's environment are forwarded through `env_vars` when set. Credentials are never printed:
everything shown to the user goes through `redact_runtime_env`.

The functions here are thin over `ray.job_submission.JobSubmissionClient`; what they add is the
packaging rules above and errors that say what to do (a cluster with token auth answers
"Missing authentication token" to a client without `RAY_AUTH_TOKEN`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:  # ray.job_submission imports the dashboard SDK; load it only when talking to a cluster.
    from ray.job_submission import JobDetails, JobSubmissionClient

logger = logging.getLogger(__name__)

CLI_NAME = "invardiff"

# gitignore-style patterns, relative to the working dir, that never belong in a job package. Ray caps
# a package at ~500 MiB and uploads it on every submission. Anchored ("/models/") where a name is only
# junk at the top level: the embedded digits model in pipelines/weights/ is a few MB and the job needs it.
# cluster/kuberay/rayjob-generate.yaml and cluster/autoscaler/gpu-cluster.yaml carry the same list.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git/",
    ".venv/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    "*.egg-info/",
    "/models/",
    "/weights/",
    "/checkpoints/",
    "*.ckpt",
    "*.gguf",
    "/out/",
    "/runs/",
    "/reports/",
    "/tmp/",
    "/build/",
    "/dist/",
)

# What a job needs to reach the same object store as the submitter. Forwarded only when set.
S3_ENV_VARS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)

REDACTED = "***"
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL|AUTH|API_KEY", re.IGNORECASE)

# Context settings the CLI must register the submit commands with, so that every option it does not
# know (--manifest, --out, ...) passes through to the remote `invardiff generate|calibrate`.
PASSTHROUGH_CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


class SubmissionError(RuntimeError):
    """A job could not be submitted or queried; the message says why and what to change."""


class ClusterAuthError(SubmissionError):
    """The cluster rejected the request for lack of a (valid) auth token."""


@dataclass(frozen=True)
class JobRequest:
    """Everything sent to the Jobs API for one submission."""

    entrypoint: str
    runtime_env: dict[str, Any]
    entrypoint_num_gpus: float | None = None
    submission_id: str | None = None


# ----------------------------------------------------------------------------------------------------
# Pure parts: entrypoint, runtime env, redaction, headers


def build_entrypoint(argv: Sequence[str]) -> str:
    """`invardiff <argv...>` as one shell command line; every argument survives the shell as written."""
    return shlex.join([CLI_NAME, *argv])


def forwarded_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The S3 settings present (and non-empty) in the submitter's environment."""
    return {name: environ[name] for name in S3_ENV_VARS if environ.get(name)}


def build_runtime_env(
    working_dir: str | os.PathLike[str] | None = ".",
    runtime_env: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    forward_credentials: bool = True,
) -> dict[str, Any]:
    """The job's runtime env: the caller's, plus the project as working_dir and the S3 env vars.

    A working_dir given in `runtime_env` wins over `working_dir`; `working_dir=None` ships no code
    (for images with the project installed). Excludes apply to local directories only; the caller's
    own excludes are kept after ours. Env vars set explicitly in `runtime_env` win over forwarded ones.
    """
    env = copy.deepcopy(dict(runtime_env or {}))
    if "working_dir" not in env and working_dir is not None:
        env["working_dir"] = str(working_dir)
    local_dir = env.get("working_dir")
    if local_dir is not None and "://" not in str(local_dir):
        if not Path(local_dir).is_dir():
            raise SubmissionError(f"working_dir {local_dir!r} is not a directory")
        env["excludes"] = _merge_unique(DEFAULT_EXCLUDES, env.get("excludes", ()))
    if forward_credentials:
        forwarded = forwarded_env_vars(os.environ if environ is None else environ)
        env_vars = {**forwarded, **env.get("env_vars", {})}
        if env_vars:
            env["env_vars"] = env_vars
    return env


def _merge_unique(first: Sequence[str], second: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*first, *second]))


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_env_vars(env_vars: Mapping[str, str]) -> dict[str, str]:
    return {name: (REDACTED if is_secret_name(name) else value) for name, value in env_vars.items()}


def redact_runtime_env(runtime_env: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy that is safe to print or log: secret-looking env var values replaced by '***'."""
    safe = copy.deepcopy(dict(runtime_env or {}))
    if isinstance(safe.get("env_vars"), Mapping):
        safe["env_vars"] = redact_env_vars(safe["env_vars"])
    return safe


def describe_request(request: JobRequest) -> str:
    """One log line for a submission, with secrets redacted."""
    env = redact_runtime_env(request.runtime_env)
    parts = [f"entrypoint: {request.entrypoint}"]
    if "working_dir" in env:
        parts.append(f"working_dir: {env['working_dir']} ({len(env.get('excludes', []))} exclude patterns)")
    if env.get("env_vars"):
        parts.append("env_vars: " + ", ".join(f"{k}={v}" for k, v in sorted(env["env_vars"].items())))
    if request.entrypoint_num_gpus:
        parts.append(f"entrypoint GPUs: {request.entrypoint_num_gpus:g}")
    return "; ".join(parts)


def auth_headers(headers: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Request headers with a bearer token from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, if any.

    An Authorization header the caller passes wins. Ray's client adds the token itself only when the
    *client's* RAY_AUTH_MODE is "token"; setting it here means RAY_AUTH_TOKEN alone is enough.
    """
    environ = os.environ if environ is None else environ
    result = dict(headers or {})
    if any(name.lower() == "authorization" for name in result):
        return result
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    token_path = environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and token_path:
        try:
            token = Path(token_path).expanduser().read_text().strip()
        except OSError as error:
            raise SubmissionError(f"cannot read RAY_AUTH_TOKEN_PATH={token_path}: {error}") from error
    if token:
        result["Authorization"] = f"Bearer {token}"
    return result


def parse_header(text: str) -> tuple[str, str]:
    """'Name: value' (as curl writes it) -> (name, value)."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise SubmissionError(f"header {text!r} is not of the form 'Name: value'")
    return name.strip(), value.strip()


def missing_token_message(address: str | None) -> str:
    where = f"The Ray cluster at {address}" if address else "The Ray cluster"
    return (
        f'{where} requires an authentication token and none was sent ("Missing authentication token").\n'
        "Set RAY_AUTH_TOKEN to the cluster's token (on the head node, `ray get-auth-token` prints it), "
        "or RAY_AUTH_TOKEN_PATH to a file that holds it, or pass --header 'Authorization: Bearer <token>'.\n"
        "A local test cluster can instead be started with RAY_AUTH_MODE=disabled "
        "(cluster/local-multinode.sh does); production clusters keep token auth on."
    )


def invalid_token_message(address: str | None) -> str:
    where = f"the Ray cluster at {address}" if address else "the Ray cluster"
    return (
        f'The token sent to {where} was rejected ("Invalid authentication token"). '
        "Check that RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH hold this cluster's current token."
    )


# ----------------------------------------------------------------------------------------------------
# Talking to the cluster


@contextmanager
def _explained_errors(address: str | None) -> Iterator[None]:
    """Turn the Jobs API's failures into SubmissionErrors that say what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as error:
        # Ray formats 401 as "Authentication required: ..." and 403 as "Authentication failed: ...".
        if getattr(error, "message", "").startswith("Authentication failed"):
            raise ClusterAuthError(invalid_token_message(address)) from None
        raise ClusterAuthError(missing_token_message(address)) from None
    except ConnectionError as error:
        raise SubmissionError(
            f"cannot reach the Ray Jobs API at {address or 'the local cluster'}: {str(error).rstrip('.')}. "
            "Is the dashboard port (8265) forwarded and the head running?"
        ) from None
    except RuntimeError as error:
        # Older servers answer 401 as a plain failed request.
        if "Missing authentication token" in str(error):
            raise ClusterAuthError(missing_token_message(address)) from None
        raise SubmissionError(str(error)) from None


def _check_no_env_override(address: str | None, environ: Mapping[str, str]) -> None:
    # JobSubmissionClient silently prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over an explicit
    # address; a job meant for one cluster must never land on another because of a stale export.
    if address is None:
        return
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = environ.get(name)
        if value and value.rstrip("/") != address.rstrip("/"):
            raise SubmissionError(
                f"{name}={value} is set and Ray would use it instead of --address {address}; "
                f"unset {name} or pass the same address"
            )


def connect(address: str | None, headers: Mapping[str, str] | None = None) -> JobSubmissionClient:
    """A JobSubmissionClient for `address` (http://HEAD:8265), with auth headers from the environment."""
    from ray.job_submission import JobSubmissionClient

    _check_no_env_override(address, os.environ)
    with _explained_errors(address):
        return JobSubmissionClient(address, headers=auth_headers(headers))


def prepare_job(
    argv: Sequence[str],
    working_dir: str | os.PathLike[str] | None = ".",
    runtime_env: Mapping[str, Any] | None = None,
    entrypoint_num_gpus: float | None = None,
    submission_id: str | None = None,
    forward_credentials: bool = True,
    environ: Mapping[str, str] | None = None,
) -> JobRequest:
    if not argv:
        raise SubmissionError("nothing to run: pass the invardiff subcommand and its arguments")
    return JobRequest(
        entrypoint=build_entrypoint(argv),
        runtime_env=build_runtime_env(working_dir, runtime_env, environ, forward_credentials),
        entrypoint_num_gpus=entrypoint_num_gpus,
        submission_id=submission_id,
    )


def submit_job(
    address: str | None,
    argv: Sequence[str],
    working_dir: str | os.PathLike[str] | None = ".",
    runtime_env: Mapping[str, Any] | None = None,
    entrypoint_num_gpus: float | None = None,
    wait: bool = False,
    *,
    headers: Mapping[str, str] | None = None,
    submission_id: str | None = None,
    forward_credentials: bool = True,
    poll_interval_s: float = 5.0,
) -> str:
    """Submit `invardiff <argv...>` as a Ray job and return its submission id.

    With wait=True, block until the job reaches a terminal state (the id is returned either way;
    `job_status` tells how it ended).
    """
    request = prepare_job(argv, working_dir, runtime_env, entrypoint_num_gpus, submission_id, forward_credentials)
    job_id = submit_request(address, request, headers)
    if wait:
        wait_for_job(address, job_id, headers, poll_interval_s)
    return job_id


def submit_request(address: str | None, request: JobRequest, headers: Mapping[str, str] | None = None) -> str:
    """Send a prepared request; uploads the working dir (minus excludes) if the cluster lacks it."""
    client = connect(address, headers)
    logger.info("submitting to %s: %s", address or "the local cluster", describe_request(request))
    with _explained_errors(address):
        return client.submit_job(
            entrypoint=request.entrypoint,
            runtime_env=request.runtime_env,
            entrypoint_num_gpus=request.entrypoint_num_gpus,
            submission_id=request.submission_id,
        )


def wait_for_job(
    address: str | None, job_id: str, headers: Mapping[str, str] | None = None, poll_interval_s: float = 5.0
) -> str:
    """Poll until the job is terminal; return its final status (SUCCEEDED, FAILED or STOPPED)."""
    client = connect(address, headers)
    with _explained_errors(address):
        while True:
            status = client.get_job_status(job_id)
            if status.is_terminal():
                return str(status.value)
            time.sleep(poll_interval_s)


def job_status(address: str | None, job_id: str, headers: Mapping[str, str] | None = None) -> JobDetails:
    client = connect(address, headers)
    with _explained_errors(address):
        return client.get_job_info(job_id)


def job_logs(
    address: str | None, job_id: str, tail: int | None = None, headers: Mapping[str, str] | None = None
) -> str:
    """The job's log so far; with `tail`, only its last `tail` lines."""
    client = connect(address, headers)
    with _explained_errors(address):
        logs = client.get_job_logs(job_id)
    return last_lines(logs, tail) if tail is not None else logs


def last_lines(text: str, count: int) -> str:
    if count <= 0:
        return ""
    lines = text.splitlines(keepends=True)
    return "".join(lines[-count:])


def follow_job_logs(address: str | None, job_id: str, headers: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield the job's log from the start, chunk by chunk, until the job ends."""
    client = connect(address, headers)
    chunks = client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        with _explained_errors(address):
            while True:
                try:
                    yield loop.run_until_complete(chunks.__anext__())
                except StopAsyncIteration:
                    return
    finally:
        loop.run_until_complete(chunks.aclose())
        loop.close()


def stop_job(address: str | None, job_id: str, headers: Mapping[str, str] | None = None) -> bool:
    """Ask the job to stop; True if it was running."""
    client = connect(address, headers)
    with _explained_errors(address):
        return client.stop_job(job_id)


def list_jobs(address: str | None, headers: Mapping[str, str] | None = None) -> list[JobDetails]:
    client = connect(address, headers)
    with _explained_errors(address):
        return client.list_jobs()


# ----------------------------------------------------------------------------------------------------
# CLI commands (registered by jobs/cli.py)

_ADDRESS_HELP = "Ray Jobs API of the head, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS / RAY_ADDRESS)"
_HEADER_HELP = "Extra HTTP header 'Name: value' (repeatable), e.g. for an auth proxy"


def load_runtime_env_file(path: Path) -> dict[str, Any]:
    """A runtime env from a YAML or JSON file (JSON is YAML)."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SubmissionError(f"cannot read runtime env {path}: {error}") from error
    if not isinstance(loaded, dict):
        raise SubmissionError(f"runtime env {path} must be a mapping, got {type(loaded).__name__}")
    return loaded


def _headers_from_options(header: list[str] | None) -> dict[str, str]:
    return dict(parse_header(item) for item in header or [])


def _fail(error: SubmissionError) -> typer.Exit:
    typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


def project_root() -> Path:
    """The invardiff checkout this code runs from, whatever the current directory: what a job needs to run."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise SubmissionError(
            f"invardiff is installed in {root}, not run from a checkout, so there is no project to ship: "
            "pass --working-dir DIR, or --no-working-dir when the cluster image has the project"
        )
    return root


def _submit_command(
    subcommand: str,
    extra_args: list[str],
    address: str | None,
    working_dir: Path | None,
    no_working_dir: bool,
    runtime_env: Path | None,
    num_gpus: float | None,
    submission_id: str | None,
    header: list[str] | None,
    forward_credentials: bool,
    wait: bool,
) -> None:
    try:
        env = load_runtime_env_file(runtime_env) if runtime_env else None
        request = prepare_job(
            [subcommand, *extra_args],
            working_dir=None if no_working_dir else (working_dir or project_root()),
            runtime_env=env,
            entrypoint_num_gpus=num_gpus,
            submission_id=submission_id,
            forward_credentials=forward_credentials,
        )
        typer.echo(f"Submitting to {address or 'the local cluster'}: {describe_request(request)}")
        headers = _headers_from_options(header)
        job_id = submit_request(address, request, headers)
        address_flag = f" --address {address}" if address else ""
        typer.echo(f"Submitted job {job_id}")
        typer.echo(f"  logs:   invardiff jobs logs {job_id} --follow{address_flag}")
        typer.echo(f"  status: invardiff jobs status {job_id}{address_flag}")
        if wait:
            final = wait_for_job(address, job_id, headers)
            typer.echo(f"Job {job_id} {final}")
            if final != "SUCCEEDED":
                raise typer.Exit(code=1)
    except SubmissionError as error:
        raise _fail(error) from None


def _submit_command_for(subcommand: str):
    """The `invardiff submit <subcommand>` command: our options, everything else passed through."""

    def command(
        ctx: typer.Context,
        address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
        working_dir: Path | None = typer.Option(
            None, "--working-dir", help="Project directory to ship (default: the invardiff checkout this runs from)"
        ),
        no_working_dir: bool = typer.Option(False, "--no-working-dir", help="Ship no code; the image has the project"),
        runtime_env: Path | None = typer.Option(None, "--runtime-env", help="YAML/JSON runtime env merged with ours"),
        num_gpus: float | None = typer.Option(None, "--entrypoint-num-gpus", help="GPUs reserved for the driver"),
        submission_id: str | None = typer.Option(None, "--submission-id", help="Job id to use (must be unique)"),
        header: list[str] | None = typer.Option(None, "--header", help=_HEADER_HELP),
        forward_credentials: bool = typer.Option(
            True, "--forward-credentials/--no-forward-credentials", help="Forward AWS_* S3 settings if set"
        ),
        wait: bool = typer.Option(False, "--wait", help="Block until the job ends; exit 1 unless it succeeded"),
    ) -> None:
        _submit_command(
            subcommand,
            list(ctx.args),
            address,
            working_dir,
            no_working_dir,
            runtime_env,
            num_gpus,
            submission_id,
            header,
            forward_credentials,
            wait,
        )

    command.__name__ = f"submit_{subcommand}_command"
    example = (
        "--classes 0-9 --per-class 8 --out s3://bucket/run1"
        if subcommand == "generate"
        else "--workers 4 --store s3://bucket/plans"
    )
    command.__doc__ = (
        f"Run `invardiff {subcommand} ARGS...` on a Ray cluster. Options not listed here pass through "
        "to the remote command (or put them after --).\n\n"
        f"  invardiff submit {subcommand} --address http://HEAD:8265 --wait -- {example}\n\n"
        "Prints the job id and the `invardiff jobs logs|status` commands to follow it. Output paths are "
        "read on the cluster: use s3:// (or a path every node shares), not a laptop directory."
    )
    return command


submit_generate_command = _submit_command_for("generate")
submit_calibrate_command = _submit_command_for("calibrate")


def _format_time(epoch_ms: int | None) -> str:
    if not epoch_ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000))


def jobs_status_command(
    job_id: str = typer.Argument(..., help="Submission id (raysubmit_...)"),
    address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
    header: list[str] | None = typer.Option(None, "--header", help=_HEADER_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the job's details as JSON (secrets redacted)"),
) -> None:
    """Show a job's status."""
    try:
        info = job_status(address, job_id, _headers_from_options(header))
    except SubmissionError as error:
        raise _fail(error) from None
    if as_json:
        details = info.model_dump() if hasattr(info, "model_dump") else info.dict()
        details["runtime_env"] = redact_runtime_env(details.get("runtime_env"))
        typer.echo(json.dumps(details, indent=2, default=str))
        return
    typer.echo(f"{job_id}: {info.status}")
    if info.message:
        typer.echo(f"  {info.message}")
    typer.echo(f"  entrypoint: {info.entrypoint}")
    typer.echo(f"  started: {_format_time(info.start_time)}  ended: {_format_time(info.end_time)}")


def jobs_logs_command(
    job_id: str = typer.Argument(..., help="Submission id (raysubmit_...)"),
    address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the log until the job ends"),
    tail: int | None = typer.Option(None, "--tail", "-n", help="Only the last N lines"),
    header: list[str] | None = typer.Option(None, "--header", help=_HEADER_HELP),
) -> None:
    """Print a job's log."""
    if follow and tail is not None:
        typer.secho("error: --follow streams the whole log; use either --follow or --tail", err=True)
        raise typer.Exit(code=2)
    headers = _headers_from_options(header)
    try:
        if follow:
            for chunk in follow_job_logs(address, job_id, headers):
                typer.echo(chunk, nl=False)
        else:
            typer.echo(job_logs(address, job_id, tail, headers), nl=False)
    except SubmissionError as error:
        raise _fail(error) from None


def jobs_stop_command(
    job_id: str = typer.Argument(..., help="Submission id (raysubmit_...)"),
    address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
    header: list[str] | None = typer.Option(None, "--header", help=_HEADER_HELP),
) -> None:
    """Stop a running job."""
    try:
        stopped = stop_job(address, job_id, _headers_from_options(header))
    except SubmissionError as error:
        raise _fail(error) from None
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'was not running'}")


def jobs_list_command(
    address: str | None = typer.Option(None, "--address", help=_ADDRESS_HELP),
    header: list[str] | None = typer.Option(None, "--header", help=_HEADER_HELP),
) -> None:
    """List the cluster's jobs, newest first."""
    try:
        jobs = list_jobs(address, _headers_from_options(header))
    except SubmissionError as error:
        raise _fail(error) from None
    for info in sorted(jobs, key=lambda job: job.start_time or 0, reverse=True):
        job_id = info.submission_id or info.job_id
        typer.echo(f"{job_id}\t{info.status}\t{_format_time(info.start_time)}\t{info.entrypoint}")
