"""pipelines/png.py: lossless, a valid PNG for every image kind the models produce, and the same bytes whatever
the number of threads."""

import io

import numpy as np
import pytest
from PIL import Image

from pipelines import png


def _images(n, height, width, channels, seed=0):
    """Smooth gradients plus noise, so the filter and deflate both have real work; the extremes 0 and 255 are
    included, where an Up filter's mod-256 arithmetic wraps."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    smooth = 127 + 127 * np.sin(2 * np.pi * (x + 2 * y))[None, ..., None]
    images = (smooth + rng.normal(0, 20, (n, height, width, channels))).clip(0, 255).astype(np.uint8)
    images[:, 0, 0], images[:, -1, -1] = 0, 255
    return images


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("height,width", [(16, 16), (1, 7), (33, 5)])
def test_decodes_to_exactly_the_input(height, width, channels):
    for image in _images(3, height, width, channels):
        decoded = png.decode_png(png.encode_png(image))
        assert decoded.dtype == np.uint8
        assert np.array_equal(decoded, image[..., 0] if channels == 1 else image)


def test_pillow_reads_the_mode_of_each_channel_count():
    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    for channels, mode in modes.items():
        with Image.open(io.BytesIO(png.encode_png(_images(1, 8, 8, channels)[0]))) as image:
            image.verify()  # checks every chunk's CRC
            assert image.mode == mode


def test_two_dimensional_image_is_grey():
    image = _images(1, 9, 11, 1)[0, ..., 0]
    assert np.array_equal(png.decode_png(png.encode_png(image)), image)


def test_bytes_do_not_depend_on_the_thread_count():
    # large enough to take the threaded path, and an odd count so the slices per thread are uneven
    images = list(_images(7, 256, 256, 3))
    assert sum(image.nbytes for image in images) >= png.MIN_BYTES_FOR_THREADS
    serial = png.encode_pngs(images, threads=1)
    assert serial == [png.encode_png(image) for image in images]
    for threads in (2, 3, 8):
        assert png.encode_pngs(images, threads=threads) == serial
    for data, image in zip(serial, images):
        assert np.array_equal(png.decode_png(data), image)


def test_small_batch_keeps_order():
    images = list(_images(5, 16, 16, 1))
    assert [png.decode_png(d).tobytes() for d in png.encode_pngs(images, threads=4)] == \
        [image[..., 0].tobytes() for image in images]


def test_refuses_what_png_cannot_hold_losslessly_here():
    with pytest.raises(ValueError):
        png.encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        png.encode_png(np.zeros((4, 4, 5), np.uint8))


def test_non_contiguous_view():
    # a generator's images may be a transposed or strided view of its output tensor
    base = _images(1, 12, 10, 3)[0]
    for view in (base[:, ::-1], base.transpose(1, 0, 2), base[::2, ::3]):
        assert not view.flags.c_contiguous
        assert np.array_equal(png.decode_png(png.encode_png(view)), view)
