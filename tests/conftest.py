"""Shared fixtures: small generated cohorts and a runner for the real application."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from codegraph3d_research.synthetic import make_cohort

ROOT = Path(__file__).resolve().parents[1]

# A tiny untrained ViT on an 8^3 token grid of 4^3-voxel cubes: the real code path, in seconds.
# The generated tiny cohort is skull-stripped and roughly aligned, so the slow stages (N4, deepbet,
# registration) are off here; tests of those stages run them on purpose.
STRIPPED_PREPROCESS = {"skull_strip": "none", "bias_correction": "none", "registration": "none", "workers": 1}
STRIPPED_PREPROCESS_YAML = "preprocess:\n" + "".join(f"  {k}: {v}\n" for k, v in STRIPPED_PREPROCESS.items())
TINY_VIT_CONFIG = STRIPPED_PREPROCESS_YAML + """\
encoder:
  name: untrained-tiny
  patch_size: 4
  layers: [1, 2]
  batch_size: 32
tokens:
  grid_size: 8
output:
  fractional: true
"""


@dataclass
class AppRun:
    returncode: int
    stdout: str
    stderr: str
    output: Path

    @property
    def report(self) -> dict:
        return json.loads((self.output / "report.json").read_text(encoding="utf-8"))

    @property
    def last_line(self) -> str:
        lines = [line for line in (self.stdout + self.stderr).splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_app(input_folder: Path, output: Path, models: Path, config_text: str, tmp: Path) -> AppRun:
    """Run ``python app.py -i -o -m`` as a user would, with a configuration override file."""
    config_file = tmp / "override.yaml"
    config_file.write_text(config_text, encoding="utf-8")
    output.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CODEGRAPH3D_CONFIG=str(config_file))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "-i", str(input_folder), "-o", str(output), "-m", str(models)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return AppRun(completed.returncode, completed.stdout, completed.stderr, output)


def copy_as_ct(source: Path, target: Path) -> Path:
    """Copy the DICOM files under ``source`` to ``target`` relabelled as CT: input with no MR series."""
    import pydicom

    for path in sorted(source.rglob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.Modality = "CT"
        copy = target / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(copy)
    return target


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six subjects (two with lesions), T2w + T1w each, localizers in some, coarse matrices."""
    folder = tmp_path_factory.mktemp("tiny_cohort")
    make_cohort(folder, n_subjects=6, lesion_fraction=1 / 3, matrix_scale=0.3, seed=1, with_localizer_fraction=0.5)
    return folder
