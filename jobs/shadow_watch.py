"""Shadow sampling in a generation run: what to shadow, and the live drift alarm on the driver.

    actors   GenerateBatch generates a batch, then its shadow rows again uncached (pipelines.shadow), and tells
             the run's ShadowWatch actor their PSNRs
    watch    a Ray actor (no CPU) holding the run's pipelines.shadow.DriftAlarm
    driver   DriftMonitor polls the watch; when the alarm trips it logs once and, with --stop-on-drift, stops
             the run as Ctrl-C would (no batch is started after that), and the run record says why. An alarm
             first read after the last batch ends the run stopped too: the outcome (exit 4) must not depend on
             whether a poll fell between the last shadows and the end of the writing

The run record's entry gets {"shadow": {"fraction", "min_psnr", "rows", "mean_psnr", "drift", "stopped"}}.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from pipelines.shadow import DriftAlarm, check_fraction, mean_interval

log = logging.getLogger("invardiff")

POLL_S = 1.0


@dataclass
class ShadowOptions:
    """What `generate --shadow F [--keep-shadow-images] [--min-psnr X] [--stop-on-drift]` asked for, and (filled
    in by the run) what the shadows measured."""

    fraction: float = 0.0
    keep_images: bool = False
    min_psnr: float | None = None
    stop_on_drift: bool = False
    min_rows: int = 8  # shadows seen before the alarm may trip
    # filled in by the run
    rows: int = 0
    mean_psnr: float | None = None
    drift: str | None = None  # the alarm's line, once tripped
    stopped: bool = False  # the run was stopped on drift
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_fraction(self.fraction)
        if self.stop_on_drift and self.min_psnr is None:
            raise ValueError("--stop-on-drift needs --min-psnr (the bound the shadows' PSNR must stay above)")
        if self.min_psnr is not None and not self.fraction:
            raise ValueError("--min-psnr in generate bounds the shadow rows' PSNR: give --shadow FRACTION too")
        if self.keep_images and not self.fraction:
            raise ValueError("--keep-shadow-images keeps the shadow rows' uncached images: give --shadow FRACTION too")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def record(self) -> dict:
        return {"fraction": self.fraction, "min_psnr": self.min_psnr, "rows": self.rows, "mean_psnr": self.mean_psnr,
                "drift": self.drift, "stopped": self.stopped}


class ShadowWatch:
    """The run's alarm, as a Ray actor: actors add their shadows' PSNRs, the driver polls."""

    def __init__(self, min_psnr: float | None, min_rows: int) -> None:
        self.alarm = DriftAlarm(min_psnr, min_rows) if min_psnr is not None else None
        self.psnrs: list[float] = []

    def add(self, psnrs: list[float]) -> None:
        self.psnrs.extend(psnrs)
        if self.alarm is not None:
            self.alarm.add(psnrs)

    def state(self) -> dict:
        interval = mean_interval([min(p, 100.0) for p in self.psnrs])
        return {"rows": len(self.psnrs), "mean_psnr": interval.mean if interval else None,
                "drift": self.alarm.describe() if self.alarm is not None and self.alarm.tripped else None}


def start_watch(options: ShadowOptions):
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ShadowWatch).remote(options.min_psnr, options.min_rows)


class DriftMonitor:
    """Polls the watch from a daemon thread until closed; `on_stop` is called once when the run must stop, and
    never after the run's writing has ended (the main thread may be past the code that handles the stop)."""

    def __init__(self, watch, options: ShadowOptions, on_stop) -> None:
        self.watch, self.options, self.on_stop = watch, options, on_stop
        self._closed = threading.Event()
        self._failed = False  # closed by an exception: that is what the run reports, not drift read late
        self._closing = threading.Lock()  # a poll's stop and the close are one or the other, never interleaved
        self._thread = threading.Thread(target=self._poll, name="shadow-drift", daemon=True)

    def __enter__(self) -> DriftMonitor:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        with self._closing:
            self._failed = exc_type is not None
            self._closed.set()
        self._thread.join(timeout=5)
        if self.update():  # the final counts, while Ray is still up; an alarm in the last batches is told too
            self._tripped()

    def update(self) -> bool:
        """Read the watch; True when this read saw the alarm trip."""
        import ray

        try:
            state = ray.get(self.watch.state.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a lost reading must never fail the run; the next poll tries again
            return False
        with self.options._lock:
            self.options.rows, self.options.mean_psnr = state["rows"], state["mean_psnr"]
            tripped = state["drift"] is not None and self.options.drift is None
            if tripped:
                self.options.drift = state["drift"]
        return tripped

    def check(self) -> None:
        """One poll: read the watch; on the alarm's trip log it once and, with --stop-on-drift, stop the run."""
        if self.update():
            self._tripped()

    def _tripped(self) -> None:
        with self._closing:
            if not self.options.stop_on_drift or self._failed:
                log.warning("drift alarm: %s%s", self.options.drift,
                            "" if self._closed.is_set() else " (the run goes on; --stop-on-drift would stop it)")
                return
            self.options.stopped = True
            if self._closed.is_set():
                log.error("drift alarm: %s; --stop-on-drift: the run ends stopped (the alarm was read after the "
                          "last batch)", self.options.drift)
            else:
                log.error("drift alarm: %s; --stop-on-drift: stopping the run", self.options.drift)
                self.on_stop()

    def _poll(self) -> None:
        while not self._closed.wait(POLL_S) and not self.options.stopped:
            self.check()
