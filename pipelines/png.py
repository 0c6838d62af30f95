"""PNG bytes of uint8 images, a batch at a time, on threads: the `png` column of docs/contracts.md.

Written here rather than through Pillow's `save` because at the sizes this project generates the work is small
enough that Pillow's per-call Python machinery was most of it (16x16: ~70 µs of ~85 per image), and large
enough at 256x256 that one thread falls behind a GPU. Each image is filtered with PNG's Up filter in numpy
and deflated by zlib (benchmarks/png_encoding.py has the measurements behind both choices); both release the
GIL, so a batch's images encode in parallel on threads. The output is a plain 8-bit PNG (grey, grey+alpha,
RGB or RGBA): lossless, and the same bytes for the same image whatever the thread count.
"""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Sequence

import numpy as np

# zlib level 1: on 256x256 RGB (benchmarks/png_encoding.py) 2.6x less CPU than levels 4-6, for 13 % more bytes
# (127 KB against 112; levels 2-3 cost more for no fewer bytes). A GPU actor waits on its encoding, and has one
# CPU: GPU time is dearer than disk.
LEVEL = 1
SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type: grey, grey+alpha, RGB, RGBA
UP = 2  # PNG filter type: each byte minus the byte above it
# Below this many bytes per batch, threads cost more to hand work to than they save.
MIN_BYTES_FOR_THREADS = 256 * 1024


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def encode_png(image: np.ndarray, level: int = LEVEL) -> bytes:
    """PNG bytes of one uint8 image, (H, W) or (H, W, C) with C in 1-4."""
    pixels = image if image.ndim == 3 else image[..., None]
    height, width, channels = pixels.shape
    if pixels.dtype != np.uint8 or channels not in COLOR_TYPES:
        raise ValueError(f"expected uint8 (H, W, 1-4), got {pixels.dtype} {tuple(image.shape)}")
    rows = pixels.reshape(height, width * channels)
    scanlines = np.empty((height, 1 + width * channels), np.uint8)
    scanlines[:, 0] = UP
    scanlines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])  # uint8 wraps: the filter's arithmetic is mod 256
    # Z_FILTERED suits filtered scanlines (small values, few long matches): 10 % fewer bytes than the default
    # strategy on 256x256 RGB, as Pillow also found.
    compressor = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_FILTERED)
    data = compressor.compress(scanlines) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    # one per thread count for the process's life: an actor encodes a batch every few hundred ms
    return ThreadPoolExecutor(threads, thread_name_prefix="png")


def encode_pngs(images: Sequence[np.ndarray], threads: int = 1, level: int = LEVEL) -> list[bytes]:
    """PNG bytes of each image, in order; on up to `threads` threads when the batch is big enough to gain."""
    images = list(images)
    threads = max(1, min(threads, len(images)))
    if threads == 1 or sum(image.nbytes for image in images) < MIN_BYTES_FOR_THREADS:
        return [encode_png(image, level) for image in images]
    # contiguous slices, one task per thread: a task per image costs more to hand over than a small image
    bounds = np.linspace(0, len(images), threads + 1).astype(int)
    slices = [images[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    encoded = _pool(threads).map(lambda part: [encode_png(image, level) for image in part], slices)
    return [data for part in encoded for data in part]


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))
