"""Write the README's sample grid: one row per class, each row labelled with its class, uncached and (optionally)
cached with a plan.

    python -m benchmarks.sample_grid --out docs/digits-grid.png [--plan plan.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def grid(images: np.ndarray, rows: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 1) -> one uint8 (rows*(H*scale+pad), cols*(W*scale+pad)) picture."""
    n, h, w, _ = images.shape
    cols = n // rows
    big = images[..., 0].repeat(scale, axis=1).repeat(scale, axis=2)
    canvas = np.full((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        canvas[y : y + h * scale, x : x + w * scale] = big[i]
    return canvas


def label_rows(canvas: np.ndarray, labels: list[str], title: str, pad: int = 2, margin: int = 56) -> np.ndarray:
    """The grid with a left margin naming each row (e.g. 'class 3') and a title line on top."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    rows = len(labels)
    row_height = (canvas.shape[0] - pad) // rows
    header = 22
    picture = Image.new("L", (canvas.shape[1] + margin, canvas.shape[0] + header), 255)
    picture.paste(Image.fromarray(canvas), (margin, header))
    draw = ImageDraw.Draw(picture)
    draw.text((margin, header // 2), title, fill=0, font=font, anchor="lm")
    for row, text in enumerate(labels):
        middle = header + pad + row * row_height + (row_height - pad) // 2
        draw.text((margin - 6, middle), text, fill=0, font=font, anchor="rm")
    return np.asarray(picture)


def main(argv=None) -> None:
    from PIL import Image

    from invardiff.policy import InvarDiffPolicy, NoCache
    from pipelines.base import Request
    from pipelines.build import GeneratorConfig, build_generator
    from pipelines.runner import run_batch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/digits-grid.png"))
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", default=None)
    args = parser.parse_args(argv)

    generator = build_generator(GeneratorConfig(model="digits", device="cpu"))
    policy = NoCache()
    if args.plan:
        from invardiff.plan import Plan

        policy = InvarDiffPolicy(Plan.load(args.plan))
    policy.attach(generator.transformer)
    requests = [
        Request(f"c{c}-{i}", args.seed + c * args.per_class + i, class_label=c)
        for c in range(10)
        for i in range(args.per_class)
    ]
    images = run_batch(generator, requests, policy).result.images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = f"uncached, {generator.num_inference_steps} DDIM steps" if not args.plan else f"cached with {args.plan}"
    labelled = label_rows(grid(images, rows=10), [f"class {c}" for c in range(10)], title)
    Image.fromarray(labelled).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
