"""Connecting to Ray: a cluster when one is named or we run inside a Ray job, else an embedded local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("invardiff")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Loopback only: otherwise Ray binds the machine's external interface (environment-notes.md).
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


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
