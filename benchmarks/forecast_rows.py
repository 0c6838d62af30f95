"""The harness's forecast-preset and uniform-forecast rows alone, peers off (BENCHMARKS.md section 7).

    python -m benchmarks.forecast_rows DIR

Same model, 40 images, seeds and rounds as the full `invardiff bench` run in `docs/bench/peers-digits/`, so PSNR and
counted speedups compare row for row with the peers there; rerunning only these rows after a calibration change
takes about 10 minutes instead of 50.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.bench import FULL, run_bench

FORECAST_ROWS = replace(
    FULL,
    presets=("quality", "balanced", "fast", "turbo"),
    uniform_speedups=(2.5, 3.0, 4.0),
    fbc_thresholds=(),
    taylorseer_intervals=(),
    mag_thresholds=(),
    pab_ranges=(),
    dbcache_thresholds=(),
    step_intervals=(),
    fora_intervals=(),
    fewer_steps=(),
    l2c_lams=(),
    dicache_thresholds=(),
)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "bench/forecast-rows")
    run_bench(FORECAST_ROWS, out, command=f"python -m benchmarks.forecast_rows {out}",
              say=lambda m: print(f"[bench] {m}", flush=True))  # fmt: skip


if __name__ == "__main__":
    main()
