"""What tests share: the repository root, small-run configurations, the application runner, SEG sources.

Imported by name (``from fixtures import ROOT``; pytest puts ``tests/`` on the import path); the
pytest fixtures built on these live in ``conftest.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from pydicom.uid import generate_uid

from codegraph3d_research.synthetic import write_series

ROOT = Path(__file__).resolve().parents[1]

# A command prefix that runs a command in its own network namespace with only loopback up, so
# that servers it starts (Ray, Orthanc) cannot listen on or reach any other interface.
LOOPBACK_ONLY = ("unshare", "--net", "--map-root-user", "sh", "-c", 'ip link set lo up && exec "$@"', "sh")


def load_tool(name: str) -> ModuleType:
    """The script ``tools/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def loopback_only_available() -> bool:
    """Whether :data:`LOOPBACK_ONLY` works here (unshare with user namespaces, and ``ip``)."""
    try:
        return subprocess.run([*LOOPBACK_ONLY, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False

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


def run_app(input_folder: Path, output: Path, models: Path, config_text: str, tmp: Path,
            wrapper: Sequence[str] = ()) -> AppRun:
    """Run ``python app.py -i -o -m`` as a user would, with a configuration override file.

    ``wrapper`` prefixes the command (:data:`LOOPBACK_ONLY` runs it in its own network namespace).
    """
    config_file = tmp / "override.yaml"
    config_file.write_text(config_text, encoding="utf-8")
    output.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CODEGRAPH3D_CONFIG=str(config_file))
    completed = subprocess.run(
        [*wrapper, sys.executable, str(ROOT / "app.py"), "-i", str(input_folder), "-o", str(output), "-m", str(models)],
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


# A small oblique MR series for the SEG and SR writers' tests.
N, ROWS, COLS = 8, 16, 12


def write_sources(folder: Path) -> None:
    """A small oblique MR series with the tags a SEG copies (patient, study, frame of reference)."""
    angle = 0.25
    row, col = np.array([np.cos(angle), np.sin(angle), 0.0]), np.array([0.0, 0.0, -1.0])
    direction = np.stack([row, col, np.cross(row, col)], axis=1)
    volume = np.broadcast_to(np.arange(N, dtype=np.float32)[:, None, None], (N, ROWS, COLS))
    write_series(
        volume, (10.0, -5.0, 40.0), (1.1, 0.9, 3.0), direction, folder,
        patient_id="SEG1", patient_name="Seg^Test", study_uid=generate_uid(), series_uid=generate_uid(),
        series_description="T2 TSE COR", series_number=2, echo_time=100.0, repetition_time=4000.0,
        frame_of_reference_uid=generate_uid(),
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """The dciodvfy error lines of a DICOM file (the test is skipped where dicom3tools is absent)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed; DICOM conformance not checked")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
