"""How well the embedded digits DiT draws the digit asked for, per guidance scale.

    python -m benchmarks.digits_guidance [--samples 100] [--scales 1,1.5,2,3]

The same 100 seeded requests as tests/test_digits_model.py (seed 1000 + i, class i % 10), uncached DDIM 50,
judged by the scikit-learn digit classifier of evaluation/digits_classifier.py. This is how the default
guidance scale in pipelines/build.py was chosen.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    from evaluation.digits_classifier import predict_digits
    from pipelines.base import Request
    from pipelines.build import GeneratorConfig, build_generator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--scales", default="1,1.5,2,3,4")
    args = parser.parse_args(argv)

    requests = [Request(id=f"r{i}", seed=1000 + i, class_label=i % 10) for i in range(args.samples)]
    labels = np.array([r.class_label for r in requests])
    print("| guidance | classifier accuracy | misses per class (0..9) | seconds |")
    print("|---|---|---|---|")
    for scale in (float(s) for s in args.scales.split(",")):
        generator = build_generator(GeneratorConfig(model="digits", device="cpu", guidance_scale=scale))
        started = time.perf_counter()
        predicted = predict_digits(generator.generate(requests).images)
        seconds = time.perf_counter() - started
        misses = np.bincount(labels[predicted != labels], minlength=10)
        print(f"| {scale:g} | {np.mean(predicted == labels):.0%} | {' '.join(map(str, misses))} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
