"""The results in OHIF: the app's binary SEGs drawn where their frames mark, in a real browser.

Runs the app on the tiny cohort, then ``tests/viewer_check.py`` in its own network namespace
(only loopback exists there): Orthanc with DICOMweb, OHIF 3.13.2 behind the one-origin proxy and
headless chromium. Needs Debian's ``orthanc``, ``orthanc-dicomweb``, ``chromium`` and
``chromium-driver``, selenium, user namespaces, and OHIF's files (fetched once with npm). Without
them the module is skipped, unless ``CODEGRAPH3D_REQUIRE_VIEWER=1`` (set by CI, which installs
them), where anything missing is a failure. Screenshots stay under the test's temporary folder
(printed on failure).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import LOOPBACK_ONLY, ROOT, TINY_VIT_CONFIG, loopback_only_available, run_app

from codegraph3d_research.viewer.ohif import ensure_ohif
from codegraph3d_research.viewer.orthanc import DICOMWEB_PLUGIN, find_orthanc


def _missing() -> list[str]:
    missing = []
    if find_orthanc() is None:
        missing.append("Orthanc (apt-get install orthanc)")
    if not DICOMWEB_PLUGIN.is_file():
        missing.append("the DICOMweb plugin (apt-get install orthanc-dicomweb)")
    for binary, package in (("/usr/bin/chromium", "chromium"), ("/usr/bin/chromedriver", "chromium-driver")):
        if not os.access(binary, os.X_OK):
            missing.append(f"{binary} (apt-get install {package})")
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium (pip install -r requirements-dev.txt)")
    if not loopback_only_available():
        missing.append("a network namespace (unshare --net --map-root-user, ip)")
    if not missing:
        try:
            ensure_ohif()
        except RuntimeError as error:
            missing.append(f"OHIF's files ({error})")
    return missing


_MISSING = _missing()
if _MISSING:
    if os.environ.get("CODEGRAPH3D_REQUIRE_VIEWER") == "1":
        raise RuntimeError("CODEGRAPH3D_REQUIRE_VIEWER=1 but missing: " + "; ".join(_MISSING))
    pytest.skip("viewer test needs: " + "; ".join(_MISSING), allow_module_level=True)


@pytest.fixture(scope="module")
def viewed(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("viewer")
    run = run_app(tiny_cohort / "dicom", tmp / "output", tmp / "models", TINY_VIT_CONFIG, tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    results = tmp / "viewer"
    done = subprocess.run(
        [*LOOPBACK_ONLY, sys.executable, str(ROOT / "tests" / "viewer_check.py"), str(tiny_cohort / "dicom"),
         str(run.output), str(results)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, f"screenshots in {results}\n{done.stderr[-4000:]}"
    result = json.loads((results / "result.json").read_text())
    result["folder"] = str(results)
    return result


def test_the_flagged_binary_seg_is_drawn_where_its_frame_marks(viewed: dict) -> None:
    case = viewed["cases"]["flagged"]
    assert "error" not in case, f"{case} (screenshot in {viewed['folder']})"
    assert case["segmentation_listed"] and case["frame_shown"], case
    # Every marked pixel of the frame, magnified by the viewport's zoom, and nothing elsewhere.
    assert case["expected_pixels"] > 0
    assert abs(case["drawn_pixels"] - case["expected_pixels"]) <= 0.1 * case["expected_pixels"], case
    assert case["dice"] >= 0.9, f"{case} (screenshot in {viewed['folder']})"


@pytest.mark.parametrize("name", ["blanked", "unflagged"])
def test_a_seg_without_marks_draws_nothing(viewed: dict, name: str) -> None:
    """The blanked copy of the flagged SEG (same frame shown) is the negative control: the check
    above would fail on it; an unflagged series' empty SEG draws nothing either."""
    case = viewed["cases"][name]
    assert "error" not in case, f"{case} (screenshot in {viewed['folder']})"
    assert case["frame_shown"] and case["drawn_pixels"] == 0, f"{case} (screenshot in {viewed['folder']})"


def test_every_file_was_stored_and_only_loopback_was_there(viewed: dict) -> None:
    assert viewed["loaded"]["refused"] == [] and viewed["loaded"]["stored"] > 0
    # Orthanc listens on every interface it has: in the namespace that is loopback alone.
    assert viewed["interfaces"] == ["lo"]


def test_the_key_slice_sr_draws_the_finding_on_its_key_slice(viewed: dict) -> None:
    """OHIF draws the key-slice SR's rectangle where the SR puts it, and nothing at the control place."""
    case = viewed["cases"]["key_slices"]
    assert "error" not in case, f"{case} (screenshot in {viewed['folder']})"
    assert case["frame_shown"] and case["control_canvas"] is not None, case
    # The outline is dashed: about half of its length is drawn; the control place gets none.
    assert case["coverage"] >= 0.4, f"{case} (screenshot in {viewed['folder']})"
    assert case["control_coverage"] <= 0.1, f"{case} (screenshot in {viewed['folder']})"
