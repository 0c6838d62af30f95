"""Model fetching (`local_model_dir`) and fingerprinting (`model_fingerprint`), on local paths, memory:// and a real
S3 endpoint (a moto server on loopback)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers or transformers are imported

import fsspec
import pytest
import torch

from pipelines.base import Request
from pipelines.fetch import local_model_dir, model_fingerprint
from pipelines.tiny import save_tiny_dit, tiny_dit

S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


# ----------------------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory) -> Path:
    return save_tiny_dit(tmp_path_factory.mktemp("models") / "tiny-dit", seed=0, layers=2, latent=True)


@pytest.fixture
def memory_model(tiny_dit_dir):
    """The tiny DiT uploaded to a fresh memory:// location; removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/models/{time.monotonic_ns()}/tiny-dit"
    fs.put(str(tiny_dit_dir), root, recursive=True)
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    """Storage options for the moto endpoint, and an s3fs filesystem with a bucket made for this module."""
    options = {**S3_CREDENTIALS, "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    # Not fs.mkdir: s3fs sends LocationConstraint=us-east-1, which S3 (and moto) reject for that region.
    fs.call_s3("create_bucket", Bucket="models")
    return options, fs


def upload(fs, local_dir: Path, remote: str) -> None:
    fs.put(str(local_dir), remote, recursive=True)
    fs.invalidate_cache()


# ----------------------------------------------------------------------------------------------------------------
# local_model_dir: local paths.


def test_local_directory_is_returned_as_is(tiny_dit_dir, tmp_path):
    cache = tmp_path / "cache"
    assert local_model_dir(tiny_dit_dir, cache_dir=cache) == tiny_dit_dir
    # A file:// URI names a path on this disk too: no copy.
    assert local_model_dir(f"file://{tiny_dit_dir}", cache_dir=cache) == tiny_dit_dir
    assert not cache.exists() or not any(cache.iterdir())


def test_single_model_directory_is_a_diffusers_layout(tiny_dit_dir):
    transformer_dir = tiny_dit_dir / "transformer"  # config.json, no model_index.json
    assert local_model_dir(transformer_dir) == transformer_dir


def test_clear_errors_on_bad_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: .*/missing"):
        local_model_dir(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        local_model_dir(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model directory.*model_index.json.*config.json"):
        local_model_dir(f"file://{tmp_path / 'empty'}")


# ----------------------------------------------------------------------------------------------------------------
# local_model_dir: fsspec URIs.


def test_fsspec_uri_is_copied_once_into_the_cache(memory_model, tiny_dit_dir, tmp_path):
    cache = tmp_path / "cache"
    local = local_model_dir(memory_model, cache_dir=cache)
    assert local.parent == cache and local.name.endswith("-tiny-dit")
    assert model_fingerprint(local) == model_fingerprint(tiny_dit_dir)
    assert sorted(p.name for p in cache.iterdir()) == [f".{local.name}.lock", local.name]  # no partial copy left

    # Later calls use the copy without reading the remote: they work with the remote gone.
    fsspec.filesystem("memory").rm(memory_model.removeprefix("memory://"), recursive=True)
    assert local_model_dir(memory_model, cache_dir=cache) == local


def test_the_same_path_on_another_endpoint_is_another_model(memory_model, tmp_path):
    here = local_model_dir(memory_model, cache_dir=tmp_path)
    elsewhere = local_model_dir(memory_model, {"endpoint_url": "http://elsewhere"}, cache_dir=tmp_path)
    assert here != elsewhere


def test_concurrent_loaders_download_once(memory_model, tmp_path, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    downloads = []
    real_get = MemoryFileSystem.get

    def counting_get(self, *args, **kwargs):
        downloads.append(threading.get_ident())
        time.sleep(0.2)  # a slow download, so the other loaders arrive while it runs
        return real_get(self, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get", counting_get)
    barrier = threading.Barrier(4)
    results = []

    def load():
        barrier.wait()
        results.append(local_model_dir(memory_model, cache_dir=tmp_path))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(downloads) == 1


def test_failed_download_leaves_nothing_and_a_retry_succeeds(memory_model, tiny_dit_dir, tmp_path, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    real_get = MemoryFileSystem.get

    def dying_get(self, rpaths, lpaths, **kwargs):
        real_get(self, rpaths[:1], lpaths[:1])  # some files land, then the connection drops
        raise ConnectionError("connection reset")

    monkeypatch.setattr(MemoryFileSystem, "get", dying_get)
    with pytest.raises(ConnectionError):
        local_model_dir(memory_model, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    # A partial copy left by a process that died mid-download (no chance to clean up) is removed by the next one.
    monkeypatch.setattr(MemoryFileSystem, "get", real_get)
    target_name = local_model_dir(memory_model, cache_dir=tmp_path / "probe").name
    stale = tmp_path / f".{target_name}.partial-dead"
    (stale / "transformer").mkdir(parents=True)
    local = local_model_dir(memory_model, cache_dir=tmp_path)
    assert not stale.exists()
    assert model_fingerprint(local) == model_fingerprint(tiny_dit_dir)


def test_clear_errors_on_bad_remote_paths(memory_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: memory://nowhere/model"):
        local_model_dir("memory://nowhere/model", cache_dir=tmp_path)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        local_model_dir(f"{memory_model}/model_index.json", cache_dir=tmp_path)
    parent = memory_model.rsplit("/", 1)[0]  # exists, but holds only the model's directory
    with pytest.raises(ValueError, match="not a diffusers model directory"):
        local_model_dir(parent, cache_dir=tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_s3_model_is_fetched_and_cached(s3, tiny_dit_dir, tmp_path):
    options, fs = s3
    upload(fs, tiny_dit_dir, "models/dit/tiny-dit")
    local = local_model_dir("s3://models/dit/tiny-dit", storage_options=options, cache_dir=tmp_path)
    assert model_fingerprint(local) == model_fingerprint(tiny_dit_dir)

    fs.rm("models/dit", recursive=True)
    assert local_model_dir("s3://models/dit/tiny-dit", storage_options=options, cache_dir=tmp_path) == local
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_model_dir("s3://models/dit/other", storage_options=options, cache_dir=tmp_path)


def test_flux_pipeline_through_s3_gives_identical_images(s3, tmp_path):
    from pipelines.flux import FluxGenerator, load_flux_pipeline, tiny_flux_pipeline

    options, fs = s3
    pipeline = tiny_flux_pipeline(seed=3)
    pipeline.save_pretrained(tmp_path / "tiny-flux")
    upload(fs, tmp_path / "tiny-flux", "models/flux/tiny-flux")
    loaded = load_flux_pipeline(
        "s3://models/flux/tiny-flux", torch.float32, "cpu", storage_options=options, cache_dir=tmp_path / "cache"
    )
    assert loaded.config["_name_or_path"] == "s3://models/flux/tiny-flux"

    settings = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=16)
    requests = [Request("a", 11, prompt="a red cat"), Request("b", 12, prompt="two dogs")]
    original = FluxGenerator(pipeline, **settings).generate(requests)
    fetched = FluxGenerator(loaded, **settings).generate(requests)
    assert (original.images == fetched.images).all()
    assert torch.equal(original.final, fetched.final)


# ----------------------------------------------------------------------------------------------------------------
# model_fingerprint.


def test_module_fingerprint_is_stable():
    first = model_fingerprint(tiny_dit(seed=0))
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert model_fingerprint(tiny_dit(seed=0)) == first
    assert model_fingerprint(tiny_dit(seed=1)) != first


def test_module_fingerprint_sees_every_weight_change():
    model = tiny_dit(seed=0, layers=2)
    original = model_fingerprint(model)
    seen = {original}
    state = model.state_dict()
    assert len(state) > 30
    for name, tensor in state.items():
        flat = tensor.view(-1)
        index = flat.numel() // 2
        before = flat[index].clone()
        flat[index] = torch.nextafter(before, before + 1)  # the smallest possible change: one ulp
        changed = model_fingerprint(model)
        assert changed not in seen, f"changing {name} did not change the fingerprint"
        seen.add(changed)
        flat[index] = before
    assert model_fingerprint(model) == original
    assert model_fingerprint(model.to(torch.bfloat16)) != original


def test_directory_fingerprint(tiny_dit_dir, tmp_path):
    fingerprint = model_fingerprint(tiny_dit_dir)
    assert fingerprint.startswith("sha256:")
    # Saving the same weights again gives the same fingerprint; hidden tool state is not part of the model.
    again = save_tiny_dit(tmp_path / "again", seed=0, layers=2, latent=True)
    (again / ".cache" / "huggingface").mkdir(parents=True)
    (again / ".cache" / "huggingface" / "download.metadata").write_text(str(time.time()))
    assert model_fingerprint(again) == fingerprint
    assert model_fingerprint(save_tiny_dit(tmp_path / "other", seed=1, layers=2, latent=True)) != fingerprint

    config = json.loads((again / "scheduler" / "scheduler_config.json").read_text())
    config["num_train_timesteps"] = 999
    (again / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert model_fingerprint(again) != fingerprint
    with pytest.raises(NotADirectoryError):
        model_fingerprint(tmp_path / "missing")


def test_directory_fingerprint_samples_each_tensor(tmp_path):
    """Documents the trade-off: the start of every tensor is read, a tensor's interior is not."""
    from safetensors.torch import save_file

    tensors = {f"blocks.{i}.weight": torch.zeros(3 << 18) for i in range(4)}  # 3 MiB each, 12 MiB in all
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    reference = model_fingerprint(tmp_path)

    def patched(name: str, index: int) -> str:
        changed = {k: v.clone() for k, v in tensors.items()}
        changed[name][index] = 1.0
        save_file(changed, tmp_path / "model.safetensors")
        return model_fingerprint(tmp_path)

    # blocks.1 and blocks.2 lie wholly between the first and the last MiB of the file: only their samples see them.
    assert patched("blocks.1.weight", 0) != reference
    assert patched("blocks.2.weight", 100) != reference
    assert patched("blocks.1.weight", 1 << 18) == reference  # 1 MiB into a tensor's data: not read
