"""A non-editable install (how a cluster image is built) carries what the code reads at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("invardiff", "pipelines", "jobs", "evaluation", "benchmarks")


@pytest.mark.slow
def test_non_editable_install_finds_prices_and_report_templates(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ behind
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    probe = """
import jobs.report, jobs.report_render
from jobs.report import load_prices
assert jobs.report.__file__.startswith(TARGET), jobs.report.__file__
prices = load_prices()
assert prices["H100"] > 0 and "cpu" in prices, prices
for name, escape in (("report.md.j2", False), ("report.html.j2", True)):
    jobs.report_render._templates(escape).get_template(name)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", f"TARGET = {str(target)!r}\n{probe}"],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
