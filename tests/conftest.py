"""Shared fixtures: one embedded Ray per test session (it costs ~6 s and ~1.5 GiB to start), and one real S3
endpoint on loopback (moto's standalone server as a subprocess, never a mocked client)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # Workers inherit the environment at ray.init: give them S3 credentials (moto takes any) so that jobs
        # writing to the session's S3 endpoint work, unless a module set its own fake ones first. Not through
        # runtime_env, which Ray writes to its logs.
        fake = {"AWS_ACCESS_KEY_ID": "AKIAINVARDIFFSESSION", "AWS_SECRET_ACCESS_KEY": "session-fake-secret-5d1e",
                "AWS_DEFAULT_REGION": "us-east-1"}
        missing = [name for name in fake if name not in os.environ]
        os.environ.update({name: fake[name] for name in missing})
        try:
            ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
        finally:
            for name in missing:
                os.environ.pop(name, None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """http://127.0.0.1:PORT of a moto S3 server started for this test session. Credentials: testing/testing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto_server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_credentials(monkeypatch):
    """The standard AWS environment variables set to moto's test credentials, nothing else from the host."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
