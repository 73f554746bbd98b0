"""Every command the README and docs show still runs: each answers ``--help``, shell tools included.

The commands are read from the documents themselves, so a command documented later is checked
without a change here, and a module or script that is renamed fails here before a user finds it.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from fixtures import ROOT

from codegraph3d_research.cli import COMMANDS

DOCUMENTS = [ROOT / "README.md", ROOT / "models" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `python -m MODULE [SUBCOMMAND]` and `python tools/SCRIPT.py`, as the documents write them.
_MODULE = re.compile(r"python3? -m (codegraph3d[a-z_0-9]*(?:\.[a-z_0-9]+)*)(?: ([a-z][a-z-]*)\b)?")
_SCRIPT = re.compile(r"python3? (tools/[a-z_]+\.py)")


def _documented() -> tuple[set[tuple[str, ...]], set[str]]:
    modules: set[tuple[str, ...]] = set()
    scripts: set[str] = set()
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for module, word in _MODULE.findall(text):
            # A word after the module is a subcommand only where the module has subcommands.
            sub = word if module == "codegraph3d" or (module.endswith("ablations") and word == "fill") else ""
            modules.add((module, sub) if sub else (module,))
        scripts.update(_SCRIPT.findall(text))
    return modules, scripts


MODULES, SCRIPTS = _documented()


def _help(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_documents_show_commands():
    # The reader below must find the commands the README is known to show.
    assert ("codegraph3d_research.evaluate",) in MODULES and ("codegraph3d", "bank") in MODULES
    assert "tools/sweep_codegraph.py" in SCRIPTS


@pytest.mark.parametrize("command", sorted(MODULES), ids=" ".join)
def test_each_documented_module_command_answers_help(command: tuple[str, ...]):
    completed = _help(["-m", *command])
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "usage:" in completed.stdout


@pytest.mark.parametrize("script", sorted({*SCRIPTS, *(str(p.relative_to(ROOT)) for p in (ROOT / "tools").glob("*.py"))}))
def test_each_tool_script_answers_help(script: str):
    completed = _help([script])
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "usage:" in completed.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_research_subcommand_answers_help(name: str):
    completed = _help(["-m", "codegraph3d_research", name])
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "usage:" in completed.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "tools").glob("*.sh")))
def test_each_shell_tool_parses_and_answers_help(script: str):
    path = ROOT / "tools" / script
    completed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    # --help prints the script's header comment and stops before doing anything.
    completed = subprocess.run(["bash", str(path), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    header = path.read_text(encoding="utf-8").splitlines()[1].lstrip("# ").strip()
    assert completed.returncode == 0 and completed.stdout.splitlines()[0].strip() == header, completed.stdout[:300]


def test_every_documented_tool_exists():
    missing = [script for script in SCRIPTS if not (ROOT / script).is_file()]
    shell = {m for d in DOCUMENTS for m in re.findall(r"(tools/[a-z_]+\.sh)", d.read_text(encoding="utf-8"))}
    missing += [script for script in shell if not (ROOT / script).is_file()]
    assert not missing, f"documented but absent: {missing}"
