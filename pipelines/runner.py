"""Run one batch of requests through a generator under a cache policy, and describe what ran."""

from __future__ import annotations

import platform
import resource
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from pipelines.base import GenerationResult, Generator, Request
from pipelines.png import encode_pngs


@dataclass
class BatchRun:
    result: GenerationResult
    rows: list[dict]  # one per request, in request order (output schema of docs/contracts.md, minus node/worker)


@lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_description(device: torch.device) -> tuple[str, str]:
    """(device type, human name) of the device a generator runs on."""
    if device.type == "cuda":
        return "cuda", torch.cuda.get_device_name(device)
    return device.type, cpu_name()


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # On CPU there is no allocator counter; the process's peak resident set is the honest upper bound.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_batch(generator: Generator, requests: Sequence[Request], policy) -> BatchRun:
    """Generate `requests` as one batch. The policy's cache state is reset before and after, even on error."""
    transformer = generator.transformer
    if generator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(generator.device)
    policy.reset(transformer)
    try:
        result = generator.generate(requests)
        stats = policy.stats(transformer)
    finally:
        policy.reset(transformer)

    device, device_name = device_description(generator.device)
    peak = _peak_memory_bytes(generator.device)
    per_image_seconds = result.seconds / len(requests)
    # The model's threads are idle while a batch encodes, and their count is the actor's CPU share
    # (GenerateBatch sets it from the share on CPU): the encoder may use as many.
    pngs = encode_pngs(result.images, threads=torch.get_num_threads())
    rows = []
    for request, image, png in zip(requests, result.images, pngs):
        rows.append(
            dict(
                id=request.id,
                seed=int(request.seed),
                png=png,
                width=int(image.shape[1]),
                height=int(image.shape[0]),
                model_id=generator.model_id,
                policy=policy.name,
                plan_id=policy.plan_id,
                latency_s=per_image_seconds,
                batch_size=len(requests),
                steps_total=stats.steps_total,
                steps_computed=stats.steps_computed,
                module_evals_total=stats.module_evals_total,
                module_evals_computed=stats.module_evals_computed,
                device=device,
                device_name=device_name,
                peak_memory_bytes=peak,
            )
        )
    return BatchRun(result=result, rows=rows)
