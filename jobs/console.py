"""What a person sees while a job runs: one progress line per job, our own status at INFO, Ray kept quiet.

A terminal gets a live bar (rich) with rows done / total, images/s and ETA. Anything else (a CI log,
`ray job logs`, a file) gets the same fields as a plain line every few seconds and no ANSI codes: a redrawn
bar becomes thousands of carriage-return fragments there.

Ray's own console output (Ray Data's progress block and INFO lines, the token-auth notice, core-worker
warnings, actor stdout) is off unless --verbose. Ray still writes all of it to its session logs, and a row
that failed carries its reason in its `error` column, which the job summarizes.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

LOGGER_NAME = "invardiff"
VERBOSE_ENV = "INVARDIFF_VERBOSE"
# A log line every 10 s is enough to see a job move, and few enough that a 2-hour job's log stays readable.
PLAIN_INTERVAL_S = 10.0
TICK_S = 0.5

log = logging.getLogger(LOGGER_NAME)


# ----------------------------------------------------------------------------------------------------
# Verbosity and logging


def verbose() -> bool:
    """--verbose, kept in the environment so that code far from the CLI (and child processes) sees it."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def configure(verbose_mode: bool = False) -> None:
    """Our status lines at INFO on stderr, as plain messages; other libraries' at WARNING (DEBUG/INFO with
    --verbose). Called once, by the CLI, before any command runs."""
    if verbose_mode:
        os.environ[VERBOSE_ENV] = "1"
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger(LOGGER_NAME)
    ours.handlers = [handler]
    ours.setLevel(logging.DEBUG if verbose() else logging.INFO)
    ours.propagate = False
    logging.getLogger().setLevel(logging.INFO if verbose() else logging.WARNING)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (test runners and rich swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def quiet_ray() -> None:
    """Silence Ray's console output for this process and the workers it starts; a no-op with --verbose.

    Call before ray.init: the environment variables are read when Ray's processes start and whenever
    Ray Data (re)configures its loggers, which it does for every Dataset it runs.
    """
    if verbose():
        return
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The driver's core worker prints C++ warnings to stderr, e.g. "constructor arguments in the object
    # store and max_restarts > 0", which Ray Data's actor pools always trigger.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def ray_init_options() -> dict:
    """Keyword arguments for ray.init: Ray's Python logs at ERROR (this hides the token-auth notice, which
    Ray logs during init) and no forwarding of worker output, unless --verbose."""
    loud = verbose()
    return {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}


def start_line(signature, policy: str, plan_id: str | None) -> str:
    """What a generate run will make, said before it starts:
    'tiny-flux: 32x32, 28 steps, guidance distilled 3.5, no cache'."""
    cache = f"plan {plan_id} ({policy})" if plan_id else ("no cache" if policy == "none" else f"cache {policy}")
    return (
        f"{signature.model_id}: {signature.width}x{signature.height}, {signature.num_inference_steps} steps, "
        f"guidance {signature.guidance_mode} {signature.guidance_scale:g}, {cache}"
    )


# ----------------------------------------------------------------------------------------------------
# Progress


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """One live progress line for a job: `LABEL: DONE/TOTAL UNIT, RATE UNIT/s, ETA M:SS`.

    Use as a context manager; count with `advance(n)` or `update(done)`, or let `follow(read)` poll a
    counter (e.g. rows reported by Ray actors). The rate is measured from the first counted item, not from
    the start: loading a model before the first batch says nothing about how fast the rest will go.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "images",
        stream: IO[str] | None = None,
        interactive: bool | None = None,
        interval_s: float = PLAIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = _is_terminal(self.stream) if interactive is None else interactive
        self.interval_s = interval_s
        self.clock = clock
        self.done = 0
        self._first: tuple[float, int] | None = None  # (time, count) at the first counted item
        self._started = clock()
        self._last_line_at = -float("inf")
        self._printed_done = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read: Callable[[], int] | None = None
        self._bar = None  # rich.progress.Progress in a terminal

    # ---- counting

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def update(self, done: int) -> None:
        with self._lock:
            if done > self.done and self._first is None:
                # The first items arrived as a block after the start-up; the rate counts what came after.
                self._first = (self.clock(), done)
            self.done = done
        self._show()

    def follow(self, read: Callable[[], int]) -> None:
        """Poll `read()` for the count every TICK_S until the line is closed (errors while reading are
        ignored: a progress line must never fail a job)."""
        self._read = read
        if self._thread is None:
            self._thread = threading.Thread(target=self._tick, name=f"progress-{self.label}", daemon=True)
            self._thread.start()

    def rate(self) -> float | None:
        with self._lock:
            if self._first is None or self.done <= self._first[1]:
                return None
            seconds = self.clock() - self._first[0]
            return (self.done - self._first[1]) / seconds if seconds > 0 else None

    def eta_seconds(self) -> float | None:
        rate = self.rate()
        if self.total is None or not rate:
            return None
        return max(0, self.total - self.done) / rate

    def status(self) -> str:
        """'40/200 images, 3.10 images/s, ETA 0:52' (the part after the label)."""
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        if self.done == 0:
            return f"{count} {self.unit}, waiting for the first ones"
        rate = self.rate()
        parts = [f"{count} {self.unit}", f"{rate:.3g} {self.unit}/s" if rate else f"- {self.unit}/s"]
        if self.total is not None:
            parts.append(f"ETA {format_eta(self.eta_seconds())}" if self.done < self.total else "done")
        return ", ".join(parts)

    def line(self) -> str:
        return f"{self.label}: {self.status()}"

    def note(self, message: str) -> None:
        """A status message, printed above a live bar (or as its own line)."""
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    # ---- lifecycle

    def start(self) -> Progress:
        """Show the line. Without `follow`, nothing runs in the background: a line left open by an exception
        just stops changing."""
        self._started = self.clock()
        if self.interactive:
            self._bar = _rich_bar(self)
            self._bar.start()
            self._bar.add_task(self.label, total=self.total)
        else:
            self._print_line()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._poll()
        if self._bar is not None:
            self._bar.refresh()
            self._bar.stop()
            self._bar = None
        else:
            self._print_line()

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.refresh()
        elif self.done_counting() or self.clock() - self._last_line_at >= self.interval_s:
            self._print_line()

    def done_counting(self) -> bool:
        return self.total is not None and self.done >= self.total

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            self._poll()
            self._show()

    def _poll(self) -> None:
        if self._read is None:
            return
        try:
            done = int(self._read())
        except Exception:  # noqa: BLE001 - see follow()
            return
        if done != self.done:
            self.update(done)

    def _print_line(self) -> None:
        with self._lock:
            if self._printed_done:  # the line saying it is done is the last one
                return
            self._last_line_at = self.clock()
            self._printed_done = self.done_counting()
            text = self.line()
        print(text, file=self.stream, flush=True)


class PhaseProgress:
    """Progress lines for a job that runs in labelled phases, as a callback `phases(label, done, total)`:
    a new label closes the previous phase's line and opens the next one."""

    def __init__(self, **options) -> None:
        self.options = options
        self.current: Progress | None = None

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if self.current is None or self.current.label != label:
            self.close()
            self.current = Progress(label, total, **self.options).start()
        self.current.update(done)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


def _rich_bar(progress: Progress):
    from rich.console import Console
    from rich.progress import BarColumn, ProgressColumn, TextColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class StatusColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(progress.status(), no_wrap=True, overflow="ellipsis")

    return RichProgress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),  # leaves the status its room on an 80-column terminal
        StatusColumn(),
        console=Console(file=progress.stream, force_terminal=True),
        auto_refresh=False,  # redrawn on each update and tick: no thread of rich's own to outlive the job
        transient=False,
        redirect_stdout=False,
        redirect_stderr=False,
    )


# ----------------------------------------------------------------------------------------------------
# Counting rows inside Ray actors


class _RowCounter:
    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def value(self) -> int:
        return self.rows


def row_counter():
    """A Ray actor that workers tell how many rows they finished (`counter.add.remote(n)`); it takes no CPU,
    so it never competes with the job for a slot."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(_RowCounter).remote()


def read_counter(counter, timeout_s: float = 5.0) -> Callable[[], int]:
    import ray

    return lambda: ray.get(counter.value.remote(), timeout=timeout_s)
