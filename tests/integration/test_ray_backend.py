"""``execution.backend: ray``: the same report, SEGs and decisions as a local run of the same input.

The Ray run starts an embedded Ray instance inside its own network namespace (only loopback),
so nothing it starts listens beyond this machine, and the namespace goes with the process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codegraph3d.run.diff import compare_runs
from fixtures import LOOPBACK_ONLY, TINY_VIT_CONFIG, loopback_only_available, run_app

pytest.importorskip("ray", reason="ray is not installed (pip install .[ray])")

RAY_CONFIG = TINY_VIT_CONFIG.replace("  workers: 1\n", "  workers: 2\n") + "execution:\n  backend: ray\n"


@pytest.fixture(scope="module")
def runs(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory):
    if not loopback_only_available():
        pytest.skip("no network namespace here (unshare --net --map-root-user, ip): Ray is not started on a shared network")
    tmp = tmp_path_factory.mktemp("ray_backend")
    local = run_app(tiny_cohort / "dicom", tmp / "local", tmp / "models", TINY_VIT_CONFIG, tmp)
    ray = run_app(tiny_cohort / "dicom", tmp / "ray", tmp / "models", RAY_CONFIG, tmp, wrapper=LOOPBACK_ONLY)
    return local, ray


def test_a_ray_run_writes_what_a_local_run_writes(runs):
    local, ray = runs
    assert local.returncode == 0, local.stderr[-2000:]
    assert ray.returncode == 0, ray.stderr[-3000:]
    assert "ray: embedded instance started (127.0.0.1:" in ray.stdout + ray.stderr
    assert "ray: 1 encoder actor(s) on 1 node(s), CPU" in ray.stdout + ray.stderr  # pixels encoded in Ray
    assert "scoring: 2 chunk task(s) submitted to Ray" in ray.stdout + ray.stderr  # one per contrast
    assert (ray.stdout + ray.stderr).count("embedded instance started") == 1  # one instance for every stage
    difference = compare_runs(local.output, ray.output, score_tolerance=1e-4, mask_tolerance=0.0)
    assert difference.agree, difference.problems
    assert len(difference.series) == len(local.report["series"])
    assert difference.max_mask_fraction == 0.0
    flags = [[(s["series_instance_uid"], s["flagged"]) for s in run.report["series"]] for run in (local, ray)]
    assert flags[0] == flags[1]
    config = json.loads((ray.output / "report.json").read_text())["config"]
    assert config["execution"] == {"backend": "ray", "ray_address": ""}
