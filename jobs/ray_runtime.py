"""Connecting to Ray: a cluster when one is named or we run inside a Ray job, else an embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("invardiff")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    from jobs import console

    console.quiet_ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        with _without_log_level_notice():
            ray.init(address=address, **console.ray_init_options())
        return
    with _loopback_only(), _without_log_level_notice():
        ray.init(
            _node_ip_address="127.0.0.1",
            num_cpus=num_cpus,
            include_dashboard=False,
            configure_logging=True,
            **console.ray_init_options(),
        )


_LOG_LEVEL_NOTICE = b"Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"


@contextlib.contextmanager
def _without_log_level_notice():
    """The driver's core worker starts by announcing, on stderr at info level, the very log level that
    console.quiet_ray sets to keep its warnings off the console: hold stderr while Ray starts, and pass on
    everything else it wrote."""
    import sys
    import tempfile

    if os.environ.get("RAY_BACKEND_LOG_LEVEL") is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held if _LOG_LEVEL_NOTICE not in line]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


# Ray resolves "127.0.0.1" given as the node address back to the machine's external address, unless it runs in
# single-machine mode (the mode Ray uses on macOS/Windows, off by default on Linux). In that mode the GCS, raylet,
# workers, dashboard agent and runtime-env agent all bind 127.0.0.1 (measured with Ray 2.60; otherwise they bind
# `*`, 0.0.0.0 or the external address: tests/test_output_contract.py checks). The variable reaches the processes
# ray.init starts (workers inherit the raylet's environment); the attribute, read at call time by
# ray._private.services.get_node_ip_address, covers this process, which imported ray already. Both are restored
# after the start, so a later `ray start` or cluster connection from this process is not made single-machine.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only():
    import ray._private.ray_constants as ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def node_shapes() -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each live node."""
    import ray

    return [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"]]


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def storage_options_for(uri: str) -> dict:
    """fsspec options for a URI. S3 endpoint and credentials come from the standard AWS environment
    variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) and are never written anywhere."""
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}


def filesystem_for(uri: str):
    """(pyarrow-compatible filesystem, path) for Ray Data's readers and writers."""
    import fsspec

    if "://" not in uri or uri.startswith("file://"):
        return None, uri.removeprefix("file://")
    fs, path = fsspec.core.url_to_fs(uri, **storage_options_for(uri))
    return fs, path
