"""Getting model weights onto the local disk, and naming them by content.

Every model loader in `pipelines/` goes through `local_model_dir`, so a model can live in a local directory or
behind any fsspec URI (``s3://``, ``gs://``, ``memory://``…) without the loaders knowing the difference.
`model_fingerprint` gives the ``sha256:…`` identity that caching plans record in their `PipelineSignature`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Markers of a diffusers layout: a whole pipeline (`DiffusionPipeline.save_pretrained`) or a single model
# (`ModelMixin.save_pretrained`, e.g. a bare FluxTransformer2DModel).
PIPELINE_INDEX = "model_index.json"
MODEL_CONFIG = "config.json"

CACHE_DIR_ENV = "INVARDIFF_MODEL_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/invardiff/models")

# How much of each file the directory fingerprint reads, from each end.
FINGERPRINT_EDGE_BYTES = 1 << 20
# How much of each tensor's data it reads, from the tensor's start.
FINGERPRINT_TENSOR_BYTES = 4096


def local_model_dir(
    uri: str | os.PathLike,
    storage_options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local directory holding the diffusers-layout model at `uri`.

    A local path (or a ``file://`` URI, which names one) is checked and returned as is: copying a model that is
    already on this disk would only double its footprint. Any other fsspec URI is copied once into
    ``<cache_dir>/<hash of the URI>-<name>`` (default ``$INVARDIFF_MODEL_CACHE`` or ``~/.cache/invardiff/models``)
    and later calls return that copy without touching the remote. The cache is keyed on the URI (and the endpoint,
    if `storage_options` names one), not on the remote contents: publish changed weights under a new URI.

    Safe for several processes on one node (Ray actors) loading the same model at once: one downloads while the
    others wait on a file lock, and the copy is built in a temporary directory that is renamed into place only when
    complete, so a crash never leaves a directory that looks like a finished model.
    """
    uri = os.fspath(uri)
    protocol, separator, local_part = uri.partition("://")
    if not separator or protocol in ("file", "local"):
        path = Path(local_part if separator else uri).expanduser()
        _check_local_layout(path, uri)
        return path

    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    cache_root = Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()
    cache_root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{uri}\n{_endpoint(storage_options)}".encode()).hexdigest()[:16]
    target = cache_root / f"{key}-{posixpath.basename(root) or 'model'}"

    if target.is_dir():  # Complete by construction: only a finished copy is ever renamed to this name.
        return target
    with _exclusive_lock(cache_root / f".{target.name}.lock"):
        if target.is_dir():  # Another process finished the copy while we waited.
            return target
        # Holding the lock, any leftover partial copy of this model is from a crashed process.
        for stale in cache_root.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)

        files = _remote_model_files(fs, root, uri)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=cache_root))
        try:
            local_files = [partial / posixpath.relpath(f, root) for f in files]
            for local in local_files:
                local.parent.mkdir(parents=True, exist_ok=True)
            # One call with every file lets async filesystems (s3fs, gcsfs) download them concurrently.
            fs.get(files, [str(p) for p in local_files])
            os.rename(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target


def _check_local_layout(path: Path, uri: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {uri}")
    if not path.is_dir():
        raise NotADirectoryError(f"model path is not a directory: {uri}")
    if not (path / PIPELINE_INDEX).is_file() and not (path / MODEL_CONFIG).is_file():
        raise ValueError(_not_diffusers_message(uri))


def _remote_model_files(fs, root: str, uri: str) -> list[str]:
    """Every file under `root`, after checking that it is a diffusers layout (before any download starts)."""
    if not fs.isdir(root):
        if fs.exists(root):
            raise NotADirectoryError(f"model path is not a directory: {uri}")
        raise FileNotFoundError(f"model path does not exist: {uri}")
    files = sorted(fs.find(root))
    top_level = {posixpath.relpath(f, root) for f in files}
    if PIPELINE_INDEX not in top_level and MODEL_CONFIG not in top_level:
        raise ValueError(_not_diffusers_message(uri))
    return files


def _not_diffusers_message(uri: str) -> str:
    return (
        f"{uri} is not a diffusers model directory: it has neither {PIPELINE_INDEX} (a saved pipeline) "
        f"nor {MODEL_CONFIG} (a saved single model)"
    )


def _endpoint(storage_options: dict | None) -> str:
    """The endpoint in fsspec storage options, if any: the same bucket path on another endpoint is another model."""
    options = storage_options or {}
    return str(options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url") or "")


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel when its holder dies, so a crashed download never blocks the next one.
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def model_fingerprint(module_or_dir: torch.nn.Module | str | os.PathLike) -> str:
    """A ``sha256:…`` name for a model's weights.

    For an `nn.Module` it hashes every entry of the state dict in name order: name, dtype, shape and all bytes.
    Any changed weight, dtype or shape changes it; casting a model to another dtype changes it too. Cost: one read
    of all weights (a 12B-parameter bf16 FLUX transformer is about 24 GB, tens of seconds).

    For a directory it reads only a few MiB per file, so a 24 GB FLUX checkpoint fingerprints in about a second:
    every file's relative path and size, its first and last MiB, and for ``.safetensors`` files the header (each
    tensor's name, dtype, shape and offsets) plus the first 4 KiB of every tensor. The trade-off: an edit that keeps
    every file size and touches only the interior of tensors (past their first 4 KiB) is not seen. Real fine-tunes
    change whole tensors and are seen; deliberately patched bytes may not be. Directory and module fingerprints of
    the same weights differ; compare like with like.
    """
    if isinstance(module_or_dir, torch.nn.Module):
        return _module_fingerprint(module_or_dir)
    path = Path(module_or_dir)
    if not path.is_dir():
        raise NotADirectoryError(f"not a model directory: {path}")
    return _directory_fingerprint(path)


def _module_fingerprint(module: torch.nn.Module) -> str:
    from invardiff.fingerprint import module_fingerprint

    return module_fingerprint(module)


def _directory_fingerprint(root: Path) -> str:
    digest = hashlib.sha256()
    # Hidden entries are tool state, not model (huggingface_hub keeps download timestamps in `.cache/`).
    files = sorted(
        path
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_EDGE_BYTES))
            if size > FINGERPRINT_EDGE_BYTES:
                handle.seek(max(FINGERPRINT_EDGE_BYTES, size - FINGERPRINT_EDGE_BYTES))
                digest.update(handle.read())
            if path.suffix == ".safetensors":
                _hash_safetensors(handle, size, digest)
    return f"sha256:{digest.hexdigest()}"


def _hash_safetensors(handle, size: int, digest) -> None:
    """Add a safetensors file's header and the start of each tensor's data to `digest`."""
    # Format: an 8-byte little-endian header length, a JSON header, then the tensor data it indexes.
    handle.seek(0)
    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len > size - 8:
        raise ValueError(f"{handle.name} is not a valid safetensors file (header length {header_len}, size {size})")
    header_bytes = handle.read(header_len)
    digest.update(header_bytes)
    header = json.loads(header_bytes)
    data_start = 8 + header_len
    tensors = sorted((name, meta) for name, meta in header.items() if name != "__metadata__")
    for _, meta in tensors:
        begin, end = meta["data_offsets"]
        handle.seek(data_start + begin)
        digest.update(handle.read(min(end - begin, FINGERPRINT_TENSOR_BYTES)))
