"""Tests of the built MAP image: run the container the way a clinical host would and check it.

They need podman and a built image, so the README's test command skips them; ``tools/test_map.sh``
builds the image and runs them (``CODEGRAPH3D_MAP_IMAGE`` names the image). The container runs
with ``--network none``, the input mounted read-only and the app as uid 1000 (``tools/run_map.sh``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from fixtures import ROOT, copy_as_ct, run_app

from codegraph3d.run.diff import compare_runs
from codegraph3d_research.synthetic import make_cohort

IMAGE = os.environ.get("CODEGRAPH3D_MAP_IMAGE", "")
CONFIG = ROOT / "tools" / "demo_config.yaml"

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(not IMAGE, reason="needs the MAP image: run tools/test_map.sh (builds it and sets CODEGRAPH3D_MAP_IMAGE)"),
]


def run_map(input_folder: Path, output: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "tools" / "run_map.sh"), "--image", IMAGE, *options, str(input_folder), str(output)],
        capture_output=True, text=True, timeout=1800,
    )


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six T2w subjects, three with lesions, half-size matrices, varied orientations."""
    folder = tmp_path_factory.mktemp("map_cohort")
    make_cohort(folder, n_subjects=6, lesion_fraction=0.5, seed=7, contrasts=("T2w",), matrix_scale=0.5)
    return folder / "dicom"


@pytest.fixture(scope="module")
def container_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    """The container on the cohort with the demo configuration (full preprocessing, intensity encoder)."""
    before = folder_digest(cohort)
    base = tmp_path_factory.mktemp("map_run")
    completed = run_map(cohort, base / "output", "--config", str(CONFIG), "--logs", str(base / "logs"))
    return completed, base / "output", base / "logs", before


def test_show_prints_both_manifests(tmp_path: Path):
    (tmp_path / "input").mkdir()
    completed = run_map(tmp_path / "input", tmp_path / "output", "--verb", "show")
    assert completed.returncode == 0, completed.stderr
    assert "/etc/holoscan/app.json:" in completed.stdout and "/etc/holoscan/pkg.json:" in completed.stdout
    package = json.loads(completed.stdout.split("/etc/holoscan/pkg.json:\n", 1)[1])
    assert package["applicationRoot"] == "/opt/holoscan/app" and package["modelRoot"] == "/opt/holoscan/models"
    assert set(package["resources"]) == {"cpu", "gpu", "memory", "gpuMemory"}


def test_container_scores_the_cohort(container_run):
    completed, output, _, _ = container_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "completed" and report["encoder"]["name"] == "intensity"
    scored = [s for s in report["series"] if s["status"] == "scored"]
    assert len(scored) == 6 and all(s["contrast"] == "T2w" for s in scored)
    # The full preprocessing ran inside the image: deepbet from its wheel, the baked-in template.
    assert all(s["qa"]["skull_strip"]["method"] == "deepbet" for s in scored)
    assert all("stop_condition" in s["qa"]["registration"] for s in scored)
    # Written by the container's uid 1000, not by root.
    assert (output / "report.json").stat().st_uid == 1000


def test_container_segs_and_srs_are_valid_and_reference_their_source(container_run, cohort: Path):
    import highdicom as hd

    completed, output, _, _ = container_run
    assert completed.returncode == 0
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    for series in (s for s in report["series"] if s["status"] == "scored"):
        for name in ("seg_binary", "seg_score"):
            path = output / series[name]
            segmentation = hd.seg.segread(path)
            referenced = {r.SeriesInstanceUID for r in segmentation.ReferencedSeriesSequence}
            assert referenced == {series["series_instance_uid"]}
            assert not dciodvfy_errors(path), path.name
    for study in report["studies"]:
        for name in ("sr", "sr_key_slices"):
            if name == "sr_key_slices" and study[name] is None:  # a study without findings has none
                continue
            sr = hd.sr.srread(output / study[name])
            assert sr.StudyInstanceUID == study["study_instance_uid"]
            assert not dciodvfy_errors(output / study[name]), study[name]


def test_container_logs_to_the_logs_folder_and_leaves_input_untouched(container_run, cohort: Path):
    completed, _, logs, before = container_run
    assert completed.returncode == 0
    log_files = sorted(logs.glob("app-*.log"))
    assert len(log_files) == 1
    assert "entrypoint: application exited with status 0" in log_files[0].read_text(encoding="utf-8")
    assert folder_digest(cohort) == before


def test_container_matches_a_plain_run(container_run, cohort: Path, template_models: Path, tmp_path: Path):
    completed, output, _, _ = container_run
    assert completed.returncode == 0
    plain = run_app(cohort, tmp_path / "plain", template_models, CONFIG.read_text(encoding="utf-8"), tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    result = compare_runs(plain.output, output, score_tolerance=1e-4, mask_tolerance=1e-3)
    assert result.agree, result.problems
    assert len([s for s in result.series if s.score_difference is not None]) == 6


@pytest.fixture(scope="module")
def template_models() -> Path:
    """A model folder with the registration template, for the plain run (the image has its own)."""
    folder = ROOT / "work" / "map-test-models"
    if not (folder / "template").is_dir():
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "codegraph3d", "template", "install", str(folder)],
            check=True, capture_output=True,
        )
    return folder


def test_bad_input_exits_non_zero_with_its_message_in_the_logs(cohort: Path, tmp_path: Path):
    """No MR series (every series relabelled as CT): exit status 2, the reason in log and report."""
    source = sorted(p for p in cohort.iterdir())[0]
    input_folder = copy_as_ct(source, tmp_path / "input")
    completed = run_map(input_folder, tmp_path / "output", "--config", str(CONFIG), "--logs", str(tmp_path / "logs"))
    assert completed.returncode == 2, completed.stdout[-2000:]
    log_text = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "logs").glob("app-*.log"))
    assert "no brain MR series to score" in log_text
    assert "entrypoint: application exited with status 2" in log_text
    report = json.loads((tmp_path / "output" / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "failed" and report["exit_code"] == 2
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["report.json"]


def test_image_ships_the_product_without_the_research_tooling():
    """The MAP holds codegraph3d only: evaluation, experiments and synthetic cohorts stay outside."""
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({name: u.find_spec(name) is not None for name in "
        "('codegraph3d', 'codegraph3d.run.pipeline', 'codegraph3d_research', 'codegraph3d.synthetic', 'codegraph3d.evaluate')}))"
    )
    # The podman options of tools/run_map.sh (runc, no network, its ulimits, PODMAN_RUN_OPTS).
    extra = os.environ.get("PODMAN_RUN_OPTS", "").split()
    completed = subprocess.run(
        ["podman", "run", "--rm", "--runtime", "runc", "--network", "none",
         "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096", *extra,
         "--entrypoint", "/opt/holoscan/venv/bin/python", IMAGE, "-c", probe],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {
        "codegraph3d": True, "codegraph3d.run.pipeline": True,
        "codegraph3d_research": False, "codegraph3d.synthetic": False, "codegraph3d.evaluate": False,
    }


def test_missing_image_is_named(tmp_path: Path):
    (tmp_path / "input").mkdir()
    completed = subprocess.run(
        [str(ROOT / "tools" / "run_map.sh"), "--image", "localhost/no-such-image:0", str(tmp_path / "input"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert completed.returncode == 2 and "tools/build_map.sh" in completed.stderr
