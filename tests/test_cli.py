"""Command line: the top-level help describes every command."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from churn.cli import app


def test_top_level_help_names_every_command_in_its_description():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    description = " ".join(result.output.split("Options")[0].split())
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert len(commands) == 10
    named = set(re.findall(r"[a-z]+", description))
    assert [c for c in commands if c not in named] == []
    assert "ingest, features, train, evaluate, score and report run in that order" in description
