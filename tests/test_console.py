"""The progress line and the throughput figures (jobs/console.py, jobs/throughput.py): no Ray, no model."""

from __future__ import annotations

import io
import logging
import re

import pytest

from jobs import console
from jobs.throughput import throughput

ANSI = re.compile(r"\x1b\[")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_reports_count_rate_and_eta_without_ansi():
    clock, stream = FakeClock(), io.StringIO()
    with console.Progress("generate", 200, stream=stream, interactive=False, clock=clock) as bar:
        clock.now += 12.0  # the model loads: no images yet, so no rate and no ETA
        assert bar.status() == "0/200 images, waiting for the first ones"
        bar.advance(20)
        clock.now += 10.0
        bar.advance(40)  # 40 images in the 10 s since the first ones: 4 images/s, 140 left -> 35 s
        assert bar.status() == "60/200 images, 4 images/s, ETA 0:35"
        clock.now += 35.0
        bar.update(200)
    text = stream.getvalue()
    assert not ANSI.search(text) and "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "generate: 0/200 images, waiting for the first ones"
    assert lines[-1].startswith("generate: 200/200 images") and lines[-1].endswith("done")
    assert sum("200/200" in line for line in lines) == 1  # the finished line is printed once


def test_plain_progress_prints_periodically_from_a_followed_counter(monkeypatch):
    monkeypatch.setattr(console, "TICK_S", 0.01)
    stream, counts = io.StringIO(), iter(range(0, 1000, 5))
    with console.Progress("calibrate", None, unit="runs", stream=stream, interactive=False, interval_s=0.02) as bar:
        bar.follow(lambda: next(counts))
        import time

        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3  # the first line, periodic lines, the last line
    assert all(line.startswith("calibrate: ") and " runs" in line and "ETA" not in line for line in lines)
    assert int(lines[-1].split(": ")[1].split(" ")[0]) > 0


def test_a_failing_counter_does_not_fail_the_job(monkeypatch):
    monkeypatch.setattr(console, "TICK_S", 0.01)

    def broken() -> int:
        raise TimeoutError("actor busy")

    with console.Progress("generate", 4, stream=io.StringIO(), interactive=False) as bar:
        bar.follow(broken)
        bar.update(4)
    assert bar.done == 4


def test_terminal_progress_draws_a_bar_with_the_same_fields():
    clock, stream = FakeClock(), io.StringIO()
    with console.Progress("generate", 10, stream=stream, interactive=True, clock=clock) as bar:
        bar.advance(2)
        clock.now += 1.0
        bar.advance(3)
        bar.note("a status line")
    text = stream.getvalue()
    assert ANSI.search(text)  # a live bar is drawn with terminal codes
    assert "5/10 images, 3 images/s" in text and "a status line" in text


def test_status_logging_is_info_and_ray_is_quiet_unless_verbose(monkeypatch):
    for name in (console.VERBOSE_ENV, "RAY_DATA_LOG_LEVEL", "RAY_BACKEND_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    console.configure(verbose_mode=False)
    ours = logging.getLogger("invardiff")
    assert ours.isEnabledFor(logging.INFO) and not ours.isEnabledFor(logging.DEBUG)
    assert console.ray_init_options() == {"log_to_driver": False, "logging_level": logging.ERROR}

    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    try:
        console.quiet_ray()
        assert not context.enable_progress_bars and not context.print_on_execution_start
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved
    assert console.os.environ["RAY_DATA_LOG_LEVEL"] == "ERROR"

    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.ray_init_options()["log_to_driver"] is True
    console.configure(verbose_mode=True)
    assert ours.isEnabledFor(logging.DEBUG)
    console.configure(verbose_mode=False)  # leave INFO for the other tests (the env var is undone by monkeypatch)


def test_throughput_end_to_end_and_steady_state():
    # Two batches of 4 on one worker: the first (warm-up) takes 4 s, the second 2 s.
    finished = [104.0] * 4 + [106.0] * 4
    latency = [1.0] * 4 + [0.5] * 4
    figures = throughput(finished, latency, [4] * 8)
    assert figures.end_to_end == pytest.approx(8 / 6)  # from the first batch start (100 s) to the last finish
    assert figures.steady_state == pytest.approx(4 / 2)  # the batch after the first finish
    assert figures.describe() == "1.33 images/s end-to-end, 2 images/s steady-state"


def test_throughput_of_one_batch_has_no_steady_state():
    figures = throughput([10.0, 10.0], [1.0, 1.0], [2, 2])
    assert figures.end_to_end == pytest.approx(1.0) and figures.steady_state is None
    assert figures.describe() == "1 images/s end-to-end"
    assert throughput([], [], []).end_to_end is None


def test_phase_progress_gives_each_phase_its_own_line():
    stream = io.StringIO()
    with console.PhaseProgress(unit="runs", stream=stream, interactive=False) as phases:
        for label in ("phase 1", "phase 2"):
            for done in (8, 16):
                phases(label, done, 16)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["phase 1", "phase 1", "phase 2", "phase 2"]
    assert lines[1].startswith("phase 1: 16/16 runs") and lines[-1].endswith("done")


@pytest.mark.slow
def test_a_generate_run_prints_our_lines_and_not_rays(tmp_path):
    """The console of a real (small) run, as a non-terminal sees it: progress lines, no Ray progress block, no
    Ray INFO or token-auth lines, no core-worker warnings, no ANSI codes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    invardiff = Path(sys.executable).with_name("invardiff")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INVARDIFF_"))}
    result = subprocess.run(
        [str(invardiff), "generate", "--model", "tiny-dit", "--steps", "4", "--classes", "0-1", "--per-class", "2",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    console_text = result.stdout + result.stderr
    assert not ANSI.search(console_text)
    assert "generate: 4/4 images" in result.stderr and "tiny-dit: 16x16, 4 steps" in result.stderr
    for noise in ("Token authentication", "logging_progress", "streaming_executor", "Total Progress", "core_worker",
                  "will hang", "WARNING"):  # fmt: skip
        assert noise not in console_text, noise
    assert "images/s end-to-end" in result.stdout
