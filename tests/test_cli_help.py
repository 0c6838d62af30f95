"""The CLI's help and its quieter defaults: exit codes in every command's --help; `plan show` writes only on request."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from jobs.cli import app


def leaf_commands(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            found += leaf_commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


COMMANDS = leaf_commands(typer.main.get_command(app))


def test_every_command_is_covered():
    assert {("generate",), ("calibrate",), ("report",), ("bench",), ("plan", "show"), ("submit", "generate"),
            ("jobs", "logs")} <= set(COMMANDS)  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_lists_exit_codes(command):
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Exit codes: 0" in text and "2 bad input" in text
    if command == ("calibrate",):
        assert "3 --refresh: the new plan is stored but not promoted" in text


def test_plan_show_writes_heatmaps_only_when_asked(tmp_path, monkeypatch):
    from test_plan import CREATED_AT, make_rates, make_signature

    from invardiff.plan import Plan

    plan = Plan.from_rates(make_signature(), make_rates(2), taus={"step": 0.4, "attn": 0.3, "ff": 0.3},
                           nonskip_rate=0.0, rho_phase1=make_rates(1), created_at=CREATED_AT)  # fmt: skip
    plan.save(str(tmp_path / "plan.json"))
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(app, ["plan", "show", "plan.json"])
    assert shown.exit_code == 0, shown.output
    assert plan.plan_id in shown.output and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]

    written = CliRunner().invoke(app, ["plan", "show", "plan.json", "--heatmaps", "figures"])
    assert written.exit_code == 0, written.output
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["plan.png", "rho_phase1.png", "rho_phase2.png"]
