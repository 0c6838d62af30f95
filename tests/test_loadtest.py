"""The load-test model (`--model loadtest`): a constant-cost stand-in that writes real rows of real PNGs."""

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs.outputs import read_outputs
from pipelines import digits, loadtest
from pipelines.base import Request
from pipelines.build import GeneratorConfig, build_generator
from pipelines.png import decode_png


def requests(seeds, labels=None):
    labels = labels or [0] * len(seeds)
    return [Request(id=f"r{i}", seed=s, class_label=c) for i, (s, c) in enumerate(zip(seeds, labels))]


def test_images_are_the_digits_models_size_and_valid_pngs():
    from jobs.generate import make_policy
    from pipelines.runner import run_batch

    generator = build_generator(GeneratorConfig(model="loadtest"))
    policy = make_policy(None)
    policy.attach(generator.transformer)
    rows = run_batch(generator, requests([0, 1, 2], [0, 500, 999]), policy).rows
    for row in rows:
        image = decode_png(row["png"])
        assert image.shape == (digits.IMAGE_SIZE, digits.IMAGE_SIZE) == (row["height"], row["width"])
        assert image.dtype == np.uint8 and image.std() > 0
        # the stand-in never runs its transformer, and says so
        assert row["steps_total"] == row["steps_computed"] == 0 and row["model_id"] == "loadtest"
    assert len({row["png"] for row in rows}) == 3


def test_one_seed_one_image_whatever_the_batch():
    generator = build_generator(GeneratorConfig(model="loadtest"))
    alone = generator.generate(requests([7])).images[0]
    batched = generator.generate(requests([3, 7, 11])).images[1]
    again = build_generator(GeneratorConfig(model="loadtest")).generate(requests([7])).images[0]
    assert np.array_equal(alone, batched) and np.array_equal(alone, again)
    assert not np.array_equal(alone, generator.generate(requests([8])).images[0])
    assert generator.signature() == build_generator(GeneratorConfig(model="loadtest")).signature()


def test_per_batch_cost_is_the_one_asked_for():
    free = build_generator(GeneratorConfig(model="loadtest")).generate(requests([0, 1]))
    costly = build_generator(GeneratorConfig(model="loadtest:0.2")).generate(requests([0, 1]))
    assert costly.denoise_seconds >= 0.2 and free.denoise_seconds < 0.2
    assert np.array_equal(free.images, costly.images)


@pytest.mark.parametrize("spec", ["loadtest:fast", "loadtest:-1"])
def test_bad_cost_is_refused(spec):
    with pytest.raises(ValueError, match="loadtest"):
        loadtest.batch_seconds(spec)


def test_class_outside_the_thousand_is_a_row_error():
    generator = build_generator(GeneratorConfig(model="loadtest"))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        generator.generate(requests([0], [1000]))


def test_generate_command_runs_the_job_with_the_stand_in(ray_local, tmp_path):
    from jobs.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "--model", "loadtest", "--classes", "0,500,999", "--per-class", "3",
                                      "--batch-size", "4", "--seed", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = read_outputs(str(out))
    assert table.num_rows == 9 and table.column("error").null_count == 9
    assert sorted(set(table.column("class_label").to_pylist())) == [0, 500, 999]
    assert sorted(table.column("seed").to_pylist()) == list(range(10, 19))
    by_seed = {row["seed"]: row for row in table.to_pylist()}
    expected = loadtest.loadtest_images([12])[0, ..., 0]
    assert np.array_equal(decode_png(by_seed[12]["png"]["bytes"]), expected)


def test_generate_command_refuses_a_bad_cost_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "generate", "--model", "loadtest:soon", "--classes", "0",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --model loadtest:soon: expected 'loadtest' or "
                                                "'loadtest:SECONDS_PER_BATCH', e.g. loadtest:0.05"]
    assert not (tmp_path / "out").exists()
