"""The package layering of docs/contracts.md, checked on the import statements themselves.

`invardiff/` is the caching library that users embed in their own pipelines: pulling in ray or our job code would
make it heavy and circular. `pipelines/` runs one batch and must stay usable without a Ray cluster.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "invardiff": {"ray", "jobs", "pipelines", "evaluation", "benchmarks"},
    "pipelines": {"ray", "jobs", "benchmarks"},
    "evaluation": {"ray", "jobs", "benchmarks"},
}


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_levels(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import ray.data\n    from jobs.cli import app\n")
    assert imported_top_levels(module) == {"ray", "jobs"}
