"""PNG encoding cost per image: the generation actor's path (pipelines/png.py) against the alternatives.

    python -m benchmarks.png_encoding                      # 16x16 grayscale and 256x256 RGB, all variants
    python -m benchmarks.png_encoding --images 64 --min-cpu-s 2 --threads 2 --gil-probe

Images are uint8 of realistic content: per channel a smooth sinusoidal gradient of random frequency and phase,
plus Gaussian noise of sigma 3 (a generated photo's grain: it is what makes a 256x256 PNG 100+ KB). Each variant
encodes the same batch again until it has used `--min-cpu-s` of CPU time; reported: CPU µs per image (process time, all threads: the work,
which a shared machine does not inflate), wall µs per image (flagged: a shared machine inflates it), their ratio
(above 1 only if threads ran in parallel, i.e. the encoder released the GIL), and bytes per image. Every
variant's output is decoded and checked pixel for pixel against its input.

Variants:
    pil                the old path: Image.fromarray(...).save(PNG), Pillow's defaults (compress_level -1 = zlib's
                       6, optimize=False; optimize=True means level 9), one image after another
    pil-N              the same with compress_level=N
    pil-N xT           the same on a ThreadPoolExecutor of T threads, one task per image
    np-FILTER-N        numpy filters every scanline with one PNG filter (up, sub, paeth), zlib.compress at level N
                       with Z_FILTERED (the strategy Pillow uses), chunks written by hand
    png.py xT          pipelines.png.encode_pngs, the path run_batch takes, with T threads

`--gil-probe` also runs one 2048x2048 encode per encoder in a thread while the main thread ticks every 1 ms:
the longest gap between ticks is the longest the encoder held the GIL (a list sort, which holds it, is the
control).
"""

from __future__ import annotations

import argparse
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from pipelines import png

SHAPES = {"16x16 gray": (16, 16, 1), "256x256 RGB": (256, 256, 3)}


def realistic_images(n: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    out = np.empty((n, height, width, channels), np.uint8)
    for i in range(n):
        fx, fy, phase = rng.uniform(0.5, 3.0, (3, channels))
        smooth = np.sin(2 * np.pi * (x[..., None] * fx + y[..., None] * fy + phase))
        out[i] = (127 + 100 * smooth + rng.normal(0, 3, smooth.shape)).clip(0, 255)
    return out


def pil_encode(image: np.ndarray, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def numpy_encode(image: np.ndarray, filter_name: str, level: int) -> bytes:
    """One PNG filter on every scanline, in numpy; the alternatives to the filter pipelines/png.py uses."""
    height, width, channels = image.shape
    x = image.reshape(height, width * channels)
    if filter_name == "sub":
        rows = x.copy()
        rows[:, channels:] -= x[:, :-channels]
    elif filter_name == "up":
        rows = x.copy()
        rows[1:] -= x[:-1]
    elif filter_name == "paeth":
        xi = x.astype(np.int16)
        a = np.zeros_like(xi)
        a[:, channels:] = xi[:, :-channels]
        b = np.zeros_like(xi)
        b[1:] = xi[:-1]
        c = np.zeros_like(xi)
        c[1:, channels:] = xi[:-1, :-channels]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        rows = (xi - np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))).astype(np.uint8)
    else:
        raise ValueError(filter_name)
    code = {"sub": 1, "up": 2, "paeth": 4}[filter_name]
    scanlines = np.concatenate([np.full((height, 1), code, np.uint8), rows], axis=1)
    compressor = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_FILTERED)
    data = compressor.compress(scanlines.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 3: 2}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def one_by_one(encode: Callable[[np.ndarray], bytes], threads: int = 1) -> Callable[[np.ndarray], list[bytes]]:
    if threads == 1:
        return lambda batch: [encode(image) for image in batch]
    pool = ThreadPoolExecutor(threads)
    return lambda batch: list(pool.map(encode, batch))


def variants(threads: int) -> dict[str, Callable[[np.ndarray], list[bytes]]]:
    out = {"pil": one_by_one(pil_encode)}
    for level in (1, 3, 6):
        out[f"pil-{level}"] = one_by_one(lambda im, level=level: pil_encode(im, compress_level=level))
    out["pil optimize=True"] = one_by_one(lambda im: pil_encode(im, optimize=True))
    if threads > 1:
        for level in (1, 6):
            out[f"pil-{level} x{threads}"] = one_by_one(lambda im, level=level: pil_encode(im, compress_level=level),
                                                       threads)
    for filter_name, levels in (("up", (1, 3, 4, 5, 6)), ("sub", (1, 6)), ("paeth", (1, 6))):
        for level in levels:
            out[f"np-{filter_name}-{level}"] = one_by_one(
                lambda im, f=filter_name, level=level: numpy_encode(im, f, level))
    for t in sorted({1, threads}):
        out[f"png.py x{t}"] = lambda batch, t=t: png.encode_pngs(batch, threads=t)
    return out


def measure(encode_batch: Callable[[np.ndarray], list[bytes]], batch: np.ndarray, min_cpu_s: float) -> dict:
    expected = batch[..., 0] if batch.shape[-1] == 1 else batch
    encoded = encode_batch(batch)  # also the warm-up (thread start, imports)
    for data, pixels in zip(encoded, expected):
        assert np.array_equal(png.decode_png(data), pixels), "decoded pixels differ from the input"
    cpu, wall, repeats = time.process_time(), time.perf_counter(), 0
    while time.process_time() - cpu < min_cpu_s:
        encode_batch(batch)
        repeats += 1
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = repeats * len(batch)
    return {"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6, "cpu_per_wall": cpu / wall,
            "bytes": sum(map(len, encoded)) / len(batch)}


def longest_gil_hold_ms(work: Callable[[], object]) -> tuple[float, float]:
    """(longest gap between the main thread's 1 ms ticks, duration) while `work` runs in another thread."""
    done = threading.Event()
    ticks = [time.perf_counter()]

    def run():
        work()
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    while not done.is_set():
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    thread.join()
    ticks.append(time.perf_counter())
    return float(np.diff(ticks).max()) * 1e3, (ticks[-1] - ticks[0]) * 1e3


def gil_probe() -> None:
    from PIL import ImageFile

    ImageFile.MAXBLOCK = 1 << 28  # one encoder call for the whole image: a held GIL would show as one long gap
    image = realistic_images(1, 2048, 2048, 3)[0]
    unsorted = np.random.default_rng(0).integers(0, 1 << 30, 3_000_000).tolist()
    for name, work in [("Pillow PNG save", lambda: pil_encode(image)),
                       ("pipelines.png.encode_png", lambda: png.encode_png(image)),
                       ("control: list sort (holds the GIL)", lambda: sorted(unsorted))]:
        gap, total = longest_gil_hold_ms(work)
        print(f"  {name}: call {total:.0f} ms, longest main-thread gap {gap:.1f} ms")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--min-cpu-s", type=float, default=1.0,
                        help="encode each variant's batch again until it has used this much CPU time (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the threaded variants (default 2)")
    parser.add_argument("--gil-probe", action="store_true")
    args = parser.parse_args(argv)
    for label, shape in SHAPES.items():
        batch = realistic_images(args.images, *shape)
        print(f"{label}, batch of {args.images}, repeated for at least {args.min_cpu_s:g} CPU-s per variant")
        print(f"  {'variant':20s} {'CPU µs/img':>11s} {'wall µs/img':>12s} {'CPU/wall':>9s} {'bytes/img':>10s}")
        for name, encode_batch in variants(args.threads).items():
            r = measure(encode_batch, batch, args.min_cpu_s)
            print(f"  {name:20s} {r['cpu_us']:11.0f} {r['wall_us']:12.0f} {r['cpu_per_wall']:9.2f} {r['bytes']:10.0f}")
    if args.gil_probe:
        print("GIL probe, one 2048x2048 RGB image")
        gil_probe()


if __name__ == "__main__":
    main()
