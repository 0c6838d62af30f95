"""A real multi-node Ray cluster on this machine: a head (no CPUs, like production) and two worker nodes,
started by cluster/local-multinode.sh, a generation job submitted through the Jobs API with the
`invardiff submit` command users type, and its output checked row by row.

The cluster is separate from the session's embedded Ray (tests/conftest.py `ray_local`): its own GCS,
dashboard and agent ports, its own temp dir, and this test talks to it only through subprocesses and
HTTP, never through `ray.init` in the pytest process. It is torn down however the test ends.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs.outputs import read_outputs

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "local-multinode.sh"
BIN = Path(sys.executable).parent
INVARDIFF = str(BIN / "invardiff")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `ray` for the script, `invardiff` for the job
    # A stale export would send the job elsewhere (submit refuses that) or join the wrong cluster.
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    # Fail within the test's time if a node cannot start its actor, instead of waiting for the default.
    env["INVARDIFF_ACTOR_START_TIMEOUT_S"] = "100"
    env.setdefault("HF_HUB_OFFLINE", "1")
    # A node's SIGTERM handler drains for up to 30 s by default; there is nothing to drain at teardown.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "3"
    return env


def node_processes(state_dir: Path) -> list:
    """Every process of the recorded nodes (their `ray start --block` and all its descendants)."""
    import psutil

    processes = []
    for pid_file in state_dir.glob("*.pid"):
        try:
            root = psutil.Process(int(pid_file.read_text()))
            processes += [root, *root.children(recursive=True)]
        except (psutil.Error, ValueError):
            continue
    return processes


@pytest.fixture(scope="module")
def cluster():
    # Short, under /tmp: Ray puts Unix sockets in the temp dir and their paths are limited to ~107 bytes.
    state_dir = Path(tempfile.mkdtemp(prefix="imn-", dir="/tmp"))
    env = cluster_env()
    dashboard_port = free_port()
    script = ["bash", str(SCRIPT)]
    state = ["--state-dir", str(state_dir)]
    processes = []
    try:
        started = subprocess.run(
            [*script, "start", "--workers", "2", "--cpus-per-worker", "1", "--port", str(free_port()),
             "--dashboard-port", str(dashboard_port), *state],
            env=env, capture_output=True, text=True, timeout=150,
        )
        processes = node_processes(state_dir)
        if started.returncode != 0:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in state_dir.glob("*.log"))
            pytest.fail(f"cluster did not start:\n{started.stdout}\n{started.stderr}\n{logs}")
        # The script starts with token auth (its default); clients present the token it created.
        env["RAY_AUTH_TOKEN_PATH"] = str(Path.home() / ".ray" / "auth_token")
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        processes = processes or node_processes(state_dir)
        subprocess.run([*script, "stop", *state], env=env, capture_output=True, timeout=120)
        # A node too slow to honour SIGTERM (a loaded machine) must not outlive the test session.
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except Exception:  # noqa: BLE001 - already gone
                pass
        shutil.rmtree(state_dir, ignore_errors=True)


def invardiff(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([INVARDIFF, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_generation_job_submitted_to_a_two_node_cluster_writes_every_row_once_from_both_nodes(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "out"
    # 16 rows in 4 blocks of 4 for 2 actors (one per node: Ray Data spreads actors, and the job waits
    # for the whole pool before it hands out blocks).
    submitted = invardiff(
        "submit", "generate", "--address", address, "--working-dir", str(REPO), "--wait", "--",
        "--model", "tiny-dit", "--steps", "2", "--classes", "0-3", "--per-class", "4",
        "--batch-size", "2", "--workers", "2", "--out", str(out),
        env=env, timeout=200,
    )
    job = re.search(r"Submitted job (\S+)", submitted.stdout)
    logs = invardiff("jobs", "logs", job.group(1), "--address", address, env=env).stdout if job else ""
    assert submitted.returncode == 0, f"{submitted.stdout}\n{submitted.stderr}\n--- job log\n{logs[-6000:]}"
    assert f"Job {job.group(1)} SUCCEEDED" in submitted.stdout

    status = invardiff("jobs", "status", job.group(1), "--address", address, env=env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    assert f"wrote 16 rows to {out} (0 errors, 0 already there)" in logs
    assert f"output: {out}" in logs

    rows = read_outputs(str(out), columns=["id", "error", "node_id", "worker_id", "png"]).to_pylist()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == 16
    assert sorted(ids) == sorted(f"c{c}-s0-{i}" for c in range(4) for i in range(4))
    assert all(row["error"] is None and row["png"] for row in rows)
    per_node = {}
    for row in rows:
        per_node.setdefault(row["node_id"], set()).add(row["worker_id"])
    assert len(per_node) == 2, f"rows came from {len(per_node)} node(s): {per_node}"


def test_submit_to_an_address_where_no_cluster_listens_is_a_clear_error(tmp_path):
    env = cluster_env()
    result = invardiff(
        "submit", "generate", "--address", f"http://127.0.0.1:{free_port()}", "--working-dir", str(REPO),
        "--", "--classes", "0-1", "--out", str(tmp_path / "out"), env=env,
    )
    assert result.returncode == 1
    assert "cannot reach the Ray Jobs API" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
