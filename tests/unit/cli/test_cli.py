"""The ``codegraph3d`` command: every subcommand answers ``--help`` and bad usage exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fixtures import ROOT

from codegraph3d.cli import build_parser, main

SUBCOMMANDS = ("bank", "landmarks", "template", "run-diff")


def test_python_dash_m_runs_the_command():
    completed = subprocess.run([sys.executable, "-m", "codegraph3d", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    for name in SUBCOMMANDS:
        assert name in completed.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_answers_help(name: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: codegraph3d " + name in capsys.readouterr().out


def test_unknown_arguments_are_refused(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main(["template", "install", "models", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_parser_lists_every_subcommand():
    help_text = build_parser().format_help()
    assert all(name in help_text for name in SUBCOMMANDS)
