"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and fail on a violation."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fixtures import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(folder: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with ``folder`` first on the import path and its pyproject.toml as config."""
    env = {**os.environ, "PYTHONPATH": str(folder)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(folder / "pyproject.toml")],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )


LAYERS = ("cli", "run", "store", "decision", "scoring", "features", "preprocess", "io", "core")
PACKAGES = ("codegraph3d", "codegraph3d_research", "operators")


def packages(folder: Path) -> Path:
    """Empty stand-ins of the root packages and the product's layers, with the project's contracts."""
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    for package in ("codegraph3d", "codegraph3d_research", "operators",
                    *(f"codegraph3d/{layer}" for layer in LAYERS)):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text("")
    return folder


def test_the_product_keeps_its_import_contracts():
    completed = lint_imports(ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "0 broken" in completed.stdout


def test_the_stand_in_packages_keep_the_contracts(tmp_path: Path):
    completed = lint_imports(packages(tmp_path))
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_contract_fails_when_the_product_imports_research_code(tmp_path: Path):
    packages(tmp_path)
    (tmp_path / "codegraph3d_research" / "metrics.py").write_text("def auroc():\n    return 1.0\n")
    # An import inside a function counts: it still ships the research code's dependency.
    (tmp_path / "codegraph3d" / "run" / "report.py").write_text(
        "def write():\n    from codegraph3d_research.metrics import auroc\n    return auroc()\n")
    completed = lint_imports(tmp_path)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "BROKEN" in completed.stdout and "codegraph3d.run.report -> codegraph3d_research.metrics" in completed.stdout


def test_the_contract_fails_on_an_import_cycle_in_the_product(tmp_path: Path):
    packages(tmp_path)
    scoring = tmp_path / "codegraph3d" / "scoring"
    (scoring / "musc.py").write_text("from codegraph3d.scoring.codegraph import rescore\n")
    # The way back hides inside a function, where a lazy import used to hide such cycles.
    (scoring / "codegraph.py").write_text(
        "def rescore():\n    from codegraph3d.scoring import musc\n    return musc\n")
    completed = lint_imports(tmp_path)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "No import cycles in the product" in completed.stdout and "BROKEN" in completed.stdout


def test_the_contract_fails_when_a_lower_layer_imports_a_higher_one(tmp_path: Path):
    packages(tmp_path)
    (tmp_path / "codegraph3d" / "run" / "config.py").write_text("LIMIT = 1\n")
    # The writer of SEGs reading the run's configuration is the kind of back-call the layers forbid.
    (tmp_path / "codegraph3d" / "io" / "seg.py").write_text(
        "def write():\n    from codegraph3d.run.config import LIMIT\n    return LIMIT\n")
    completed = lint_imports(tmp_path)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "import only downward" in completed.stdout and "BROKEN" in completed.stdout
    assert "codegraph3d.io.seg -> codegraph3d.run.config" in completed.stdout


def test_the_contract_fails_when_an_operator_reaches_below_the_run_layer(tmp_path: Path):
    packages(tmp_path)
    (tmp_path / "codegraph3d" / "scoring" / "musc.py").write_text("def musc_scores():\n    return 0\n")
    (tmp_path / "operators" / "scorer.py").write_text("from codegraph3d.scoring.musc import musc_scores\n")
    completed = lint_imports(tmp_path)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "The SDK operators call run stages only" in completed.stdout and "BROKEN" in completed.stdout


def test_no_test_imports_a_private_name():
    # Tests use what the package offers; a private name a test needs is made public instead.
    private = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                private += [f"{path.relative_to(ROOT)}: {alias.name}" for alias in node.names
                            if alias.name.startswith("_") and alias.name != "__version__"]
    assert not private, private


def test_unit_tests_mirror_the_layers_and_each_folder_carries_its_marker():
    unit = {folder.name for folder in (ROOT / "tests" / "unit").iterdir() if folder.is_dir()}
    assert unit == set(LAYERS), unit ^ set(LAYERS)
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "unit and not integration", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    collected = [line for line in completed.stdout.splitlines() if "::" in line]
    assert collected and all(line.startswith("tests/unit/") for line in collected), completed.stdout[-2000:]
