"""pyproject.toml declares the same pinned dependencies as the requirements files the images use."""

from __future__ import annotations

import tomllib
from pathlib import Path

from fixtures import ROOT


def _pins(path: Path) -> list[str]:
    """Requirement lines of a requirements file, without comments and ``-r`` includes."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith(("#", "-r"))]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_dependencies_are_the_runtime_pins_with_torch_pinned():
    dependencies = _project()["dependencies"]
    assert dependencies == _pins(ROOT / "requirements.txt")
    assert "torch==2.13.0" in dependencies and all(not d.startswith("torch") or "==" in d for d in dependencies)


def test_extras_match_the_cpu_and_dev_requirements():
    extras = _project()["optional-dependencies"]
    assert extras["cpu"] == _pins(ROOT / "requirements-cpu.txt")
    assert sorted(extras["dev"]) == sorted(_pins(ROOT / "requirements-dev.txt"))


def test_the_commands_are_installed_as_console_scripts():
    assert _project()["scripts"] == {
        "codegraph3d": "codegraph3d.cli:main", "codegraph3d-research": "codegraph3d_research.cli:main",
    }
