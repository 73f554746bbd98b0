"""A real two-node Ray cluster on loopback: same results as a local run, a lost worker node, a bad address.

Each scenario runs inside its own network namespace (only loopback exists there), starts its
nodes with ``ray start --block`` in their own process groups and stops them by id
(``tests/ray_cluster.py``). Without network namespaces they skip, except under
``CODEGRAPH3D_REQUIRE_RAY_CLUSTER=1`` (set by CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codegraph3d.run.diff import compare_runs
from fixtures import LOOPBACK_ONLY, ROOT, TINY_VIT_CONFIG, loopback_only_available, run_app

pytest.importorskip("ray", reason="ray is not installed (pip install .[ray])")

# Chunks of 3 volumes: two chunks per contrast, scored as parallel Ray tasks.
LOCAL_CONFIG = TINY_VIT_CONFIG + "scoring:\n  batch_size: 3\n"
CLUSTER_CONFIG = LOCAL_CONFIG + "execution:\n  backend: ray\n  ray_address: 127.0.0.1:6390\n"


@pytest.fixture(scope="module")
def namespace() -> None:
    if not loopback_only_available():
        if os.environ.get("CODEGRAPH3D_REQUIRE_RAY_CLUSTER") == "1":  # set by CI: this test must run there
            raise RuntimeError("CODEGRAPH3D_REQUIRE_RAY_CLUSTER=1 but unshare --net --map-root-user or ip fails here")
        pytest.skip("no network namespace here (unshare --net --map-root-user, ip): no cluster on a shared network")


@pytest.fixture(scope="module")
def killed_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory, namespace: None) -> tuple[Path, dict, Path]:
    """The local run, and the cluster run that lost its worker node after the first series."""
    tmp = tmp_path_factory.mktemp("ray_cluster")
    local = run_app(tiny_cohort / "dicom", tmp / "local", tmp / "models", LOCAL_CONFIG, tmp)
    assert local.returncode == 0, local.stderr[-3000:]
    config = tmp / "cluster.yaml"
    config.write_text(CLUSTER_CONFIG, encoding="utf-8")
    result = tmp / "result.json"
    command = [sys.executable, str(ROOT / "tests" / "ray_cluster.py"), "--work", str(tmp), "--input",
               str(tiny_cohort / "dicom"), "--output", str(tmp / "cluster"), "--models", str(tmp / "models"),
               "--config", str(config), "--result", str(result), "--kill-worker"]
    # The scenario bounds the app (480 s) and stops its nodes itself; this bound is only a backstop.
    completed = subprocess.run([*LOOPBACK_ONLY, *command], capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return local.output, json.loads(result.read_text(encoding="utf-8")), tmp / "cluster"


def test_a_cluster_that_loses_its_worker_node_still_writes_what_a_local_run_writes(killed_run):
    local, result, cluster = killed_run
    log = result["log"]
    assert result["returncode"] == 0, log[-4000:]
    assert result["killed"], "the worker node was never killed: no series was reported preprocessed"
    assert "ray: joined 127.0.0.1:6390" in log
    assert "ray: 1 encoder actor(s) on 1 node(s), CPU" in log  # the head has no CPUs: one node works
    assert "scoring: 4 chunk task(s) submitted to Ray" in log
    # Studies were still to come when the node died: they ran again on the replacement node.
    after_kill = log.split("=== worker node killed ===", 1)[1]
    assert "preprocessed" in after_kill, log[-4000:]
    difference = compare_runs(local, cluster, score_tolerance=1e-4, mask_tolerance=0.0)
    assert difference.agree, difference.problems
    assert len(difference.series) == len(json.loads((local / "report.json").read_text())["series"])
    assert difference.max_mask_fraction == 0.0
    config = json.loads((cluster / "report.json").read_text())["config"]
    assert config["execution"] == {"backend": "ray", "ray_address": "127.0.0.1:6390"}


def test_no_cluster_port_listens_beyond_loopback(killed_run):
    listening = [line.split()[3] for line in killed_run[1]["listening"] if line.strip()]
    assert listening, "ss listed nothing while the cluster ran"
    outside = [address for address in listening
               if not address.rpartition(":")[0].strip("[]").removeprefix("::ffff:").startswith("127.")]
    assert not outside, f"listening beyond 127.0.0.0/8: {outside}"


def test_an_unreachable_cluster_exits_2_naming_its_address(tiny_cohort: Path, tmp_path: Path, namespace: None):
    config = CLUSTER_CONFIG.replace("127.0.0.1:6390", "127.0.0.1:6391")  # nothing listens there
    run = run_app(tiny_cohort / "dicom", tmp_path / "out", tmp_path / "models", config, tmp_path, wrapper=LOOPBACK_ONLY)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "127.0.0.1:6391" in run.last_line and "execution.ray_address" in run.last_line, run.last_line
    report = run.report  # the failure report: no series, the reason
    assert (report["status"], report["exit_code"], report["series"]) == ("failed", 2, [])
    assert "nothing answers at 127.0.0.1:6391" in report["message"]
