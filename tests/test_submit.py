"""Job submission without a Ray cluster.

What the cluster would receive is checked at the edges Ray itself defines: the entrypoint goes through
a real shell, the working dir through Ray's own packager, and full submissions through Ray's real
JobSubmissionClient talking HTTP to a small stand-in for the dashboard's Jobs API on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from jobs import submit
from jobs.submit import (
    DEFAULT_EXCLUDES,
    PASSTHROUGH_CONTEXT_SETTINGS,
    ClusterAuthError,
    SubmissionError,
    auth_headers,
    build_entrypoint,
    build_runtime_env,
    describe_request,
    last_lines,
    parse_header,
    prepare_job,
    redact_runtime_env,
)

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"
S3_ENVIRON = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "HOME": "/home/someone",  # not an S3 setting: must not be forwarded
}
SECRETS = (SECRET_KEY, ACCESS_KEY, SESSION_TOKEN)


@pytest.fixture(autouse=True)
def _clean_submission_env(monkeypatch, tmp_path_factory):
    # The submitter's real environment must not leak into these tests (nor their tokens into it). That includes
    # the default token file ~/.ray/auth_token, which any earlier `ray.init` on this machine leaves behind.
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name in submit.S3_ENV_VARS:
        monkeypatch.delenv(name, raising=False)



def run_fresh_python(args: list[str], home) -> subprocess.CompletedProcess:
    """Run Python in a new process, as a user's shell would: Ray's client caches auth state per process, and an
    embedded Ray started earlier in this test session has already filled that cache with the machine's token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


# ----------------------------------------------------------------------------------------------------
# Entrypoint quoting


AWKWARD_ARGV = [
    "generate",
    "--manifest",
    "s3://bucket/my manifests/rows.parquet",
    "--prompt",
    'a cat\'s "hat"; rm -rf / && echo $HOME `id`',
    "--out",
    "s3://bucket/run-1",
    "--empty",
    "",
    "--glob",
    "*.png",
]


def test_entrypoint_starts_with_cli_and_round_trips_through_shlex():
    entrypoint = build_entrypoint(AWKWARD_ARGV)
    assert entrypoint.startswith("invardiff generate ")
    import shlex

    assert shlex.split(entrypoint) == ["invardiff", *AWKWARD_ARGV]


def test_entrypoint_reaches_the_program_unchanged_through_a_real_shell():
    # Ray runs the entrypoint with a shell; stand in for the CLI with a function that prints its argv.
    script = 'invardiff() { for arg in "$@"; do printf "%s\\0" "$arg"; done; }; ' + build_entrypoint(AWKWARD_ARGV)
    result = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True)
    assert result.stdout.split(b"\0")[:-1] == [arg.encode() for arg in AWKWARD_ARGV]


def test_prepare_job_refuses_an_empty_command(tmp_path):
    with pytest.raises(SubmissionError, match="nothing to run"):
        prepare_job([], working_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------
# Working dir excludes, checked with Ray's own packager


def make_project(root: Path) -> Path:
    files = {
        "pyproject.toml": "[project]\nname='invardiff'\n",
        "jobs/cli.py": "print('cli')\n",
        "configs/prices.yaml": "H100: 3.0\n",
        "pipelines/digits.py": "WEIGHTS = 'weights/digits-dit'\n",
        # The embedded model is small and the job needs it: it must travel.
        "pipelines/weights/digits-dit/diffusion_pytorch_model.safetensors": "tiny",
        "pipelines/weights/digits-dit/config.json": "{}",
        # Everything below must stay behind.
        "models/dit-xl-2/diffusion_pytorch_model.safetensors": "huge",
        "weights/flux.safetensors": "huge",
        "checkpoints/step-1000/model.bin": "huge",
        "train-run.ckpt": "huge",
        "llm.gguf": "huge",
        "out/part-0.parquet": "rows",
        "runs/run-1/part-0.parquet": "rows",
        "reports/run-1/report.html": "<html>",
        "tmp/scratch.txt": "x",
        "build/lib/x.py": "x",
        "dist/invardiff-0.1.0.whl": "x",
        ".git/HEAD": "ref: refs/heads/main",
        ".venv/bin/python": "#!",
        "jobs/__pycache__/cli.cpython-311.pyc": "x",
        "stray.pyc": "x",
        ".pytest_cache/v/cache/lastfailed": "{}",
        "invardiff.egg-info/PKG-INFO": "x",
    }
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def packaged_names(project: Path, runtime_env: dict, tmp_path: Path) -> set[str]:
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "package.zip"
    create_package(str(project), target, include_gitignore=True, excludes=runtime_env["excludes"])
    with zipfile.ZipFile(target) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def test_working_dir_package_keeps_code_and_embedded_model_but_no_weights_outputs_or_caches(tmp_path):
    project = make_project(tmp_path / "project")
    env = build_runtime_env(project, environ={})
    assert env["working_dir"] == str(project)

    names = packaged_names(project, env, tmp_path)

    assert names == {
        "pyproject.toml",
        "jobs/cli.py",
        "configs/prices.yaml",
        "pipelines/digits.py",
        "pipelines/weights/digits-dit/diffusion_pytorch_model.safetensors",
        "pipelines/weights/digits-dit/config.json",
    }


def test_caller_excludes_and_env_vars_are_kept_and_explicit_values_win(tmp_path):
    env = build_runtime_env(
        tmp_path,
        runtime_env={"excludes": ["/data/", ".git/"], "env_vars": {"AWS_DEFAULT_REGION": "eu-west-1", "X": "1"}},
        environ=S3_ENVIRON,
    )
    assert env["excludes"] == [*DEFAULT_EXCLUDES, "/data/"]
    assert env["env_vars"]["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["env_vars"]["X"] == "1"
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY


def test_no_working_dir_and_remote_working_dir_get_no_local_excludes(tmp_path):
    assert "working_dir" not in build_runtime_env(None, environ={})
    remote = build_runtime_env(".", runtime_env={"working_dir": "s3://bucket/code/invardiff.zip"}, environ={})
    assert remote["working_dir"] == "s3://bucket/code/invardiff.zip"
    assert "excludes" not in remote


def test_missing_working_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SubmissionError, match="is not a directory"):
        build_runtime_env(tmp_path / "nope", environ={})


# ----------------------------------------------------------------------------------------------------
# Credentials: forwarded only if set, never shown


def test_only_s3_settings_that_are_set_are_forwarded(tmp_path):
    env = build_runtime_env(tmp_path, environ={**S3_ENVIRON, "AWS_REGION": ""})
    assert env["env_vars"] == {name: S3_ENVIRON[name] for name in S3_ENVIRON if name.startswith("AWS_")}
    assert "env_vars" not in build_runtime_env(tmp_path, environ={"HOME": "/root"})
    assert "env_vars" not in build_runtime_env(tmp_path, environ=S3_ENVIRON, forward_credentials=False)


def test_redaction_hides_every_secret_but_keeps_the_shape(tmp_path):
    env = build_runtime_env(tmp_path, environ=S3_ENVIRON)
    safe = redact_runtime_env(env)
    assert safe["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert safe["env_vars"]["AWS_ACCESS_KEY_ID"] == "***"
    assert safe["env_vars"]["AWS_SESSION_TOKEN"] == "***"
    assert safe["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY, "redaction must not modify the original"

    line = describe_request(prepare_job(["generate", "--out", "s3://b/r"], tmp_path, environ=S3_ENVIRON))
    assert "AWS_SECRET_ACCESS_KEY=***" in line and "invardiff generate --out s3://b/r" in line
    assert not any(secret in line for secret in SECRETS)


# ----------------------------------------------------------------------------------------------------
# Auth headers


def test_auth_header_from_token_variable_or_file_and_explicit_header_wins(tmp_path):
    assert auth_headers({}, environ={}) == {}
    assert auth_headers({}, environ={"RAY_AUTH_TOKEN": " tok123\n"}) == {"Authorization": "Bearer tok123"}
    token_file = tmp_path / "auth_token"
    token_file.write_text("filetoken\n")
    assert auth_headers({}, environ={"RAY_AUTH_TOKEN_PATH": str(token_file)}) == {"Authorization": "Bearer filetoken"}
    explicit = {"authorization": "Bearer mine"}
    assert auth_headers(explicit, environ={"RAY_AUTH_TOKEN": "tok123"}) == explicit
    with pytest.raises(SubmissionError, match="RAY_AUTH_TOKEN_PATH"):
        auth_headers({}, environ={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_parse_header():
    assert parse_header("Authorization: Bearer a:b") == ("Authorization", "Bearer a:b")
    with pytest.raises(SubmissionError):
        parse_header("no-colon")


def test_last_lines():
    assert last_lines("a\nb\nc\n", 2) == "b\nc\n"
    assert last_lines("a\nb", 5) == "a\nb"
    assert last_lines("a\nb\n", 0) == ""


# ----------------------------------------------------------------------------------------------------
# Full submissions through Ray's real client, against a stand-in Jobs API


class FakeJobsAPI:
    """Enough of the dashboard's Jobs REST API (ray 2.60) to submit, query, log and stop one job.

    Records what arrives: headers of every request, uploaded packages, submitted job bodies.
    With `token` set it answers like a cluster with token auth: 401 without a token, 403 with a wrong one.
    """

    JOB_ID = "raysubmit_fake0001"

    def __init__(self, token: str | None = None):
        self.token = token
        self.authorizations: list[str | None] = []
        self.packages: dict[str, bytes] = {}
        self.submissions: list[dict] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                api.handle(self, "GET")

            def do_PUT(self):
                api.handle(self, "PUT")

            def do_POST(self):
                api.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        authorization = request.headers.get("Authorization")
        self.authorizations.append(authorization)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        if self.token is not None and authorization is None:
            return self.reply(request, 401, "Unauthorized: Missing authentication token", "text/plain")
        if self.token is not None and authorization != f"Bearer {self.token}":
            return self.reply(request, 403, "Forbidden: Invalid authentication token", "text/plain")

        path = request.path
        if method == "GET" and path == "/api/version":
            return self.reply(request, 200, {"version": "4", "ray_version": "2.60.0", "ray_commit": "fake"})
        if path.startswith("/api/packages/"):
            if method == "PUT":
                self.packages[path] = body
                return self.reply(request, 200, {})
            return self.reply(request, 200 if path in self.packages else 404, {})
        if method == "POST" and path == "/api/jobs/":
            self.submissions.append(json.loads(body))
            return self.reply(request, 200, {"job_id": self.JOB_ID, "submission_id": self.JOB_ID})
        if method == "GET" and path == f"/api/jobs/{self.JOB_ID}":
            return self.reply(request, 200, self.job_details())
        if method == "GET" and path == "/api/jobs/":
            return self.reply(request, 200, [self.job_details()])
        if method == "GET" and path == f"/api/jobs/{self.JOB_ID}/logs":
            return self.reply(request, 200, {"logs": "line 1\nline 2\nline 3\n"})
        if method == "POST" and path == f"/api/jobs/{self.JOB_ID}/stop":
            return self.reply(request, 200, {"stopped": True})
        return self.reply(request, 404, f"no route {method} {path}", "text/plain")

    def job_details(self) -> dict:
        submitted = self.submissions[-1]
        return {
            "type": "SUBMISSION",
            "job_id": None,
            "submission_id": self.JOB_ID,
            "status": "SUCCEEDED",
            "entrypoint": submitted["entrypoint"],
            "message": "Job finished successfully.",
            "start_time": 1_700_000_000_000,
            "end_time": 1_700_000_060_000,
            # Like the real server to SDK clients: the raw runtime env, secrets included.
            "runtime_env": submitted["runtime_env"],
        }

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, payload, content_type="application/json") -> None:
        data = (json.dumps(payload) if content_type == "application/json" else payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def uploaded_names(self) -> set[str]:
        (package,) = self.packages.values()
        with zipfile.ZipFile(io.BytesIO(package)) as archive:
            return {name for name in archive.namelist() if not name.endswith("/")}


def test_submit_job_sends_entrypoint_token_env_and_a_package_without_weights(tmp_path, monkeypatch):
    project = make_project(tmp_path / "project")
    for name, value in S3_ENVIRON.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "cluster-token")

    with FakeJobsAPI(token="cluster-token") as api:
        job_id = submit.submit_job(api.address, AWKWARD_ARGV, working_dir=project, entrypoint_num_gpus=0.5)

    assert job_id == FakeJobsAPI.JOB_ID
    assert set(api.authorizations) == {"Bearer cluster-token"}
    (body,) = api.submissions
    assert body["entrypoint"] == build_entrypoint(AWKWARD_ARGV)
    assert body["entrypoint_num_gpus"] == 0.5
    assert body["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    assert body["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY
    assert "HOME" not in body["runtime_env"]["env_vars"]
    assert "models/dit-xl-2/diffusion_pytorch_model.safetensors" not in api.uploaded_names()
    assert "pipelines/weights/digits-dit/config.json" in api.uploaded_names()


def test_missing_token_explains_what_to_set(tmp_path):
    code = (
        "import sys\nfrom jobs import submit\n"
        "try:\n    submit.submit_job(sys.argv[1], ['generate'], working_dir=sys.argv[2])\n"
        "except submit.ClusterAuthError as error:\n    print(error)\n"
    )
    with FakeJobsAPI(token="cluster-token") as api:
        result = run_fresh_python(["-c", code, api.address, str(tmp_path)], home=tmp_path)
    message = result.stdout
    assert "Missing authentication token" in message
    assert "RAY_AUTH_TOKEN" in message and "RAY_AUTH_MODE=disabled" in message
    assert api.submissions == []


def test_wrong_token_is_reported_as_invalid(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "stale-token")
    with FakeJobsAPI(token="cluster-token") as api, pytest.raises(ClusterAuthError, match="rejected"):
        submit.job_status(api.address, FakeJobsAPI.JOB_ID)


def test_a_stale_ray_address_export_cannot_redirect_a_job(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://other-cluster:8265")
    with pytest.raises(SubmissionError, match="RAY_ADDRESS=http://other-cluster:8265"):
        submit.submit_job("http://127.0.0.1:1", ["generate"], working_dir=tmp_path)


def test_unreachable_cluster_is_a_clear_error(tmp_path):
    with FakeJobsAPI() as api:
        address = api.address  # a port that was just free and is now closed
    with pytest.raises(SubmissionError, match="cannot reach the Ray Jobs API"):
        submit.list_jobs(address)


# ----------------------------------------------------------------------------------------------------
# CLI commands, registered the way jobs/cli.py registers them


def cli_app() -> typer.Typer:
    app = typer.Typer()
    submit_app = typer.Typer()
    submit_app.command("generate", context_settings=PASSTHROUGH_CONTEXT_SETTINGS)(submit.submit_generate_command)
    submit_app.command("calibrate", context_settings=PASSTHROUGH_CONTEXT_SETTINGS)(submit.submit_calibrate_command)
    jobs_app = typer.Typer()
    jobs_app.command("status")(submit.jobs_status_command)
    jobs_app.command("logs")(submit.jobs_logs_command)
    jobs_app.command("stop")(submit.jobs_stop_command)
    jobs_app.command("list")(submit.jobs_list_command)
    app.add_typer(submit_app, name="submit")
    app.add_typer(jobs_app, name="jobs")
    return app


def test_cli_submit_passes_unknown_options_through_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with FakeJobsAPI() as api:
        result = CliRunner().invoke(
            cli_app(),
            [
                "submit",
                "generate",
                "--manifest",
                "s3://b/rows.parquet",
                "--address",
                api.address,
                "--plan",
                "latest",
                "--working-dir",
                str(tmp_path),
                "--out",
                "s3://b/run 1",
                "--",
                "--wait",
                "x",
            ],
        )
        assert result.exit_code == 0, result.output
        calibrate = CliRunner().invoke(
            cli_app(),
            ["submit", "calibrate", "--address", api.address, "--no-working-dir", "--workers", "4", "--refresh"],
        )
        assert calibrate.exit_code == 0, calibrate.output

    assert api.submissions[0]["entrypoint"] == (
        "invardiff generate --manifest s3://b/rows.parquet --plan latest --out 's3://b/run 1' --wait x"
    )
    assert api.submissions[1]["entrypoint"] == "invardiff calibrate --workers 4 --refresh"
    assert "working_dir" not in api.submissions[1]["runtime_env"]
    assert "Submitted job raysubmit_fake0001" in result.output
    assert "AWS_SECRET_ACCESS_KEY=***" in result.output
    assert SECRET_KEY not in result.output


def test_cli_jobs_commands_show_status_logs_and_never_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    runner = CliRunner()
    with FakeJobsAPI() as api:
        submit.submit_job(api.address, ["generate", "--out", "s3://b/r"], working_dir=tmp_path)
        status = runner.invoke(cli_app(), ["jobs", "status", FakeJobsAPI.JOB_ID, "--address", api.address])
        status_json = runner.invoke(
            cli_app(), ["jobs", "status", FakeJobsAPI.JOB_ID, "--address", api.address, "--json"]
        )
        logs = runner.invoke(cli_app(), ["jobs", "logs", FakeJobsAPI.JOB_ID, "--address", api.address, "--tail", "2"])
        stop = runner.invoke(cli_app(), ["jobs", "stop", FakeJobsAPI.JOB_ID, "--address", api.address])
        listing = runner.invoke(cli_app(), ["jobs", "list", "--address", api.address])

    for result in (status, status_json, logs, stop, listing):
        assert result.exit_code == 0, result.output
        assert SECRET_KEY not in result.output
    assert "raysubmit_fake0001: SUCCEEDED" in status.output
    assert json.loads(status_json.output)["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert logs.output == "line 2\nline 3\n"
    assert "stop requested" in stop.output
    assert "raysubmit_fake0001\tSUCCEEDED" in listing.output and "invardiff generate --out s3://b/r" in listing.output


def test_cli_reports_missing_token_without_a_traceback(tmp_path):
    with FakeJobsAPI(token="cluster-token") as api:
        result = run_fresh_python(["-m", "jobs.cli", "jobs", "list", "--address", api.address], home=tmp_path)
    assert result.returncode == 1
    assert "Missing authentication token" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_submit_ships_the_project_root_whatever_the_current_directory(tmp_path, monkeypatch):
    sent = []

    def fake_submit(address, request, headers=None):
        sent.append(request)
        return "raysubmit_test"

    monkeypatch.setattr(submit, "submit_request", fake_submit)
    monkeypatch.chdir(tmp_path)  # somewhere that is not the project
    app = typer.Typer()
    app.command(context_settings=submit.PASSTHROUGH_CONTEXT_SETTINGS)(submit._submit_command_for("generate"))
    result = CliRunner().invoke(app, ["--address", "http://127.0.0.1:1", "--", "--classes", "0-1"])
    assert result.exit_code == 0, result.output
    project = Path(submit.__file__).resolve().parents[1]
    assert (project / "pyproject.toml").is_file()
    assert sent[0].runtime_env["working_dir"] == str(project)


def test_an_installed_copy_without_a_checkout_asks_for_a_working_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(submit, "__file__", str(tmp_path / "site-packages" / "jobs" / "submit.py"))
    with pytest.raises(submit.SubmissionError, match="--working-dir DIR, or --no-working-dir"):
        submit.project_root()
