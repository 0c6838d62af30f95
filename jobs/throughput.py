"""Images per second, defined once: the console's closing line and the cost report print the same figures.

Both come from the rows themselves (docs/contracts.md), not from a clock on the driver, so the number a
job prints when it ends is the number `invardiff report` later reads from its Parquet:

  * end-to-end:   images / (last finish - first batch start). A batch started at
                  finished_at - latency_s x batch_size. Model loading before the first batch is not in it.
  * steady-state: images finished after the first finish / (last finish - first finish). It leaves out the
                  first batch, which pays one-off warm-up (CUDA kernels, allocator, caches), so it is the
                  rate a longer run of the same job would sustain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

END_TO_END_LABEL = "end-to-end"
STEADY_STATE_LABEL = "steady-state"


@dataclass(frozen=True)
class Throughput:
    images: int
    seconds: float  # first batch start -> last finish
    steady_images: int  # images that finished after the first finish time
    steady_seconds: float  # first finish -> last finish

    @property
    def end_to_end(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def steady_state(self) -> float | None:
        return self.steady_images / self.steady_seconds if self.steady_seconds > 0 and self.steady_images else None

    def describe(self) -> str:
        """'12.3 images/s end-to-end, 15.1 images/s steady-state': the wording of console and report."""
        parts = [f"{format_rate(self.end_to_end)} {END_TO_END_LABEL}"]
        if self.steady_state is not None:
            parts.append(f"{format_rate(self.steady_state)} {STEADY_STATE_LABEL}")
        return ", ".join(parts)


def format_rate(images_per_second: float | None) -> str:
    if images_per_second is None:
        return "n/a"
    return f"{images_per_second:.3g} images/s"


def throughput(finished_at: Sequence[float], latency_s: Sequence[float], batch_size: Sequence[float]) -> Throughput:
    """Throughput of successful rows, given per row its finish time (seconds since the epoch), latency_s
    (its share of its batch's time) and batch_size."""
    finished = np.asarray(finished_at, dtype=np.float64)
    if finished.size == 0:
        return Throughput(0, 0.0, 0, 0.0)
    started = finished - np.asarray(latency_s, dtype=np.float64) * np.clip(np.asarray(batch_size, np.float64), 1, None)
    first_finish, last_finish = float(finished.min()), float(finished.max())
    return Throughput(
        images=int(finished.size),
        seconds=last_finish - float(started.min()),
        # Finish times are stored to the millisecond; a tolerance keeps the first batch's rows together.
        steady_images=int((finished > first_finish + 1e-3).sum()),
        steady_seconds=last_finish - first_finish,
    )


def run_throughput(uri: str, run_id: str) -> Throughput:
    """Throughput of the rows one generate run wrote under `uri` (its files are named `<run_id>_*.parquet`,
    jobs/outputs.py), read back from the files as `invardiff report` will read them."""
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.ray_runtime import storage_options_for

    fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri))
    columns = ["finished_at", "latency_s", "batch_size", "error"]
    finished, latency, batch = [], [], []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/{run_id}_*.parquet")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns)
        table = table.filter(pc.is_null(table.column("error")))
        finished.extend(pc.divide(table.column("finished_at").cast("int64"), 1000.0).to_pylist())
        latency.extend(table.column("latency_s").to_pylist())
        batch.extend(table.column("batch_size").to_pylist())
    return throughput(finished, latency, batch)
