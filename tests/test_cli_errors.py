"""Bad input to the CLI: refused in one line, with exit code 2, before Ray starts or a model loads, nothing written.

Usage errors (an option out of range, an unknown option) are said by the app itself. The command's own checks
raise UserError (or a kin of it), which `main()` prints as one line; here the app is invoked in-process, so they
are read from `result.exception`. Ray is made to fail if anything reaches it.
"""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from jobs import cli
from jobs.cli import UserError, app


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Bad input must be found before Ray starts: reaching ray.init is a failure of the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init called for input that should have been refused first")

    monkeypatch.setattr(ray, "init", refuse)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), terminal_width=200)


def assert_usage_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and "╭" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


def assert_refused(result, exception: type[Exception], *words: str) -> None:
    assert isinstance(result.exception, exception), (result.exception, result.output)
    message = str(result.exception)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def generate(out, *args: str):
    return invoke("generate", "--out", str(out), *args)


@pytest.mark.parametrize(
    ("flags", "option"),
    [
        (["--classes", "0-9", "--batch-size", "0"], "--batch-size"),
        (["--classes", "0-9", "--steps", "0"], "--steps"),  # was: silently 50 steps
        (["--classes", "0-9", "--rows-per-file", "0"], "--rows-per-file"),  # was: failed inside the Ray job
        (["--classes", "0-9", "--per-class", "0"], "--per-class"),
        (["--classes", "0-9", "--shadow", "2"], "--shadow"),
        (["--classes", "0-9", "--height", "-5"], "--height"),
        (["--clases", "0-9"], "--clases"),
    ],
)
def test_generate_usage_errors_are_one_line_naming_the_option(tmp_path, flags, option):
    result = generate(tmp_path / "out", *flags)
    assert_usage_error(result, option, "invardiff generate --help")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [["genrate"], ["calibrate", "--runs", "0"], ["plan", "list"], ["report", "out"], ["--bogus"]],
    ids=["unknown command", "calibrate --runs 0", "plan list without store", "report without --out", "top option"],
)
def test_every_command_says_usage_errors_in_one_line(args, monkeypatch):
    monkeypatch.delenv("INVARDIFF_PLAN_STORE", raising=False)
    assert_usage_error(invoke(*args))


def test_a_bare_group_still_shows_its_help():
    result = invoke("plan")
    assert "Usage:" in result.output and "show" in result.output and "error:" not in result.output


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--classes", "0-10"], ["--classes: 10 is not a class of --model digits", "0-9"]),
        (["--classes", "0-3", "--model", "tiny-flux"], ["--prompt"]),
        (["--classes", "0-1", "--dtype", "float8"], ["--dtype", "float32"]),  # was: a traceback
        (["--classes", "0-1", "--device", "tpu"], ["--device 'tpu'"]),  # was: every actor died on Ray
        (["--classes", "0-1", "--model", "no-such-model-dir"], ["--model no-such-model-dir: no such folder"]),
        (["--classes", "0-1", "--plan", "no-such-plan.json"], ["--plan no-such-plan.json: no such file"]),
    ],
)
def test_generate_refuses_bad_values_before_any_work(tmp_path, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    result = generate(tmp_path / "out", *flags)
    assert_refused(result, UserError, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_generate_refuses_a_file_as_out_and_leaves_it_alone(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    assert_refused(generate(target, "--classes", "0-1"), UserError, "is a file", "folder")
    assert target.read_text() == "mine"


def test_generate_refuses_a_model_folder_without_a_diffusers_layout(tmp_path):
    (tmp_path / "weights").mkdir()
    assert_refused(generate(tmp_path / "out", "--classes", "0-1", "--model", str(tmp_path / "weights")), UserError,
                   "not a diffusers model directory")  # fmt: skip


def test_calibrate_refuses_a_folder_as_out_before_calibrating(tmp_path, monkeypatch):
    import pipelines.build

    monkeypatch.setattr(pipelines.build, "build_generator", lambda *a, **k: pytest.fail("model built"))
    result = invoke("calibrate", "--out", str(tmp_path))  # was: a traceback after the whole calibration
    assert_refused(result, UserError, "is a folder", "plan.json")


def test_calibrate_refuses_an_unknown_preset_before_loading_the_model(tmp_path, monkeypatch):
    import pipelines.build

    monkeypatch.setattr(pipelines.build, "build_generator", lambda *a, **k: pytest.fail("model built"))
    result = invoke("calibrate", "--out", str(tmp_path / "plan.json"), "--preset", "bogus")
    assert_refused(result, UserError, "--preset 'bogus'", "balanced", "paper-dit-fast")
    assert not (tmp_path / "plan.json").exists()


def test_train_router_refuses_a_folder_as_plan_out(tmp_path):
    assert_refused(invoke("train-router", "--plan-out", str(tmp_path)), UserError, "--plan-out", "is a folder")


def test_plan_show_names_a_missing_plan(tmp_path):
    assert_refused(invoke("plan", "show", str(tmp_path / "plan.json")), UserError, "no such plan file")


def test_report_refuses_a_file_as_out_before_reading_the_run(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("mine")
    result = invoke("report", str(tmp_path / "no-run"), "--out", str(target))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: --out {target} is a file; give a folder for the report"
    assert target.read_text() == "mine"


def test_report_on_a_folder_without_a_run_is_one_line(tmp_path):
    result = invoke("report", str(tmp_path), "--out", str(tmp_path / "report"))
    assert result.exit_code == 2 and result.output.strip() == f"error: output {tmp_path} holds no .parquet files"
    assert not (tmp_path / "report").exists()


def test_main_prints_a_refusal_as_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["invardiff", "generate", "--out", str(tmp_path / "o"), "--classes", "abc"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: --classes: 'abc' is not a class id or a range like 0-9\n"


def test_help_paragraphs_are_not_broken_mid_sentence():
    result = invoke("generate", "--help")
    text = " ".join(result.output.split())
    assert "A rerun with the same --out generates the ids not written yet" in text
    assert "\n with the same --out" not in result.output  # the source's line break, no longer shown


def test_malformed_plan_is_one_line(tmp_path):
    from invardiff.plan import PlanError

    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    result = generate(tmp_path / "out", "--classes", "0-1", "--plan", str(bad))
    assert_refused(result, PlanError, "not a valid JSON document")
    assert not (tmp_path / "out").exists()


def test_the_python_api_refuses_zero_steps_too():
    from pipelines.build import GeneratorConfig

    with pytest.raises(ValueError, match="num_inference_steps must be at least 1, got 0"):
        GeneratorConfig(num_inference_steps=0)  # read as "the default" it would run 50 steps
    with pytest.raises(ValueError, match="height must be at least 1"):
        GeneratorConfig(model="tiny-flux", height=-5)


def test_calibrate_refuses_a_preset_or_tau_family_the_model_has_not_before_loading_it(monkeypatch, tmp_path):
    import pipelines.build

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the preset was checked")

    monkeypatch.setattr(pipelines.build, "build_generator", no_model)
    out = str(tmp_path / "plan.json")
    result = invoke("calibrate", "--preset", "paper-flux-fast", "--out", out)
    assert_refused(result, UserError, "no 'dit' preset named 'paper-flux-fast'")
    result = invoke("calibrate", "--preset", "paper-dit-fast", "--tau", "nope=0.1", "--out", out)
    assert_refused(result, UserError, "unknown family nope")


@pytest.mark.parametrize("flag, value, words", [("--dtype", "float8", "--dtype must be one of"),
                                                ("--device", "tpu", "is not a device")])
def test_bench_refuses_a_bad_dtype_or_device_in_one_line(tmp_path, flag, value, words):
    result = invoke("bench", "--out", str(tmp_path / "bench"), flag, value)
    assert_refused(result, UserError, words)
    assert not (tmp_path / "bench").exists()
