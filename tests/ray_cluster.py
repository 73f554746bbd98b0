"""A two-node Ray cluster on loopback, and the app run on it: the scenario of ``test_ray_cluster``.

Run inside a network namespace of its own (``fixtures.LOOPBACK_ONLY``)::

    python tests/ray_cluster.py --work DIR --input DICOM --output OUT --models M --config C.yaml \\
        [--kill-worker] --result RESULT.json

1. A head node (``ray start --head --node-ip-address 127.0.0.1``) with no CPUs of its own, and a
   worker node with 2 CPUs: every preprocessing task runs on the worker. Both are started with
   ``--block`` in their own process groups, token authentication on (a fresh token for this
   run), usage statistics off, no dashboard.
2. The app runs with ``execution.ray_address`` naming the head. With ``--kill-worker`` the worker
   node's whole process group is killed (SIGKILL) as soon as the app reports its first
   preprocessed study, and a replacement worker node is started: the studies lost with it (in
   flight, or finished but held in its object store) must be run again.
3. ``ss -ltn`` lists what listens, then every node is stopped by its process group, and any Ray
   process left (found by this run's temporary folder) by its process id.

The outcome (return code, log, the progress lines after the kill, the listening addresses) is
written to ``--result`` as JSON for the test to judge.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
PORT = 6390
APP_TIMEOUT_S = 480
PROGRESS = re.compile(r"preprocessed \d+/\d+ series")


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``ray start ... --block`` in a process group of its own (stopped by that group's id)."""
    with log.open("ab") as handle:
        return subprocess.Popen([RAY, "start", *args, "--block"], stdout=handle, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait_for_cpus(cpus: int, env: dict[str, str], timeout_s: float = 90.0) -> None:
    """Wait (bounded) until the cluster reports ``cpus`` CPUs in total."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{PORT}"], capture_output=True, text=True,
                                env=env, timeout=60)
        if status.returncode == 0 and f"/{float(cpus)} CPU" in status.stdout:
            return
        time.sleep(1.0)
    raise TimeoutError(f"the cluster did not reach {cpus} CPUs in {timeout_s:.0f} s")


def _stop(nodes: list[subprocess.Popen[bytes]], marker: str) -> None:
    """Stop every node by its process group, then any process of this run's Ray folder by its id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for node in nodes:
            try:
                os.killpg(node.pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3.0 if sig == signal.SIGTERM else 0.5)
    for pid in _pids_mentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for node in nodes:
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:  # reported by the caller's check of what is left
            pass


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (this run's Ray folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _run_app(args: argparse.Namespace, env: dict[str, str], on_first_progress: Callable[[], None]) -> tuple[int, str]:
    """Run the app, calling ``on_first_progress`` once when its first study is preprocessed; stopped on any error."""
    command = [sys.executable, str(ROOT / "app.py"), "-i", str(args.input), "-o", str(args.output), "-m", str(args.models)]
    app = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=dict(env, CODEGRAPH3D_CONFIG=str(args.config)), cwd=args.work)
    watchdog = threading.Timer(APP_TIMEOUT_S, app.kill)
    watchdog.start()
    lines, fired = [], False
    try:
        for line in app.stdout:
            lines.append(line)
            if not fired and PROGRESS.search(line):
                fired = True
                on_first_progress()
                lines.append("=== worker node killed ===\n")
        return app.wait(), "".join(lines)
    finally:
        watchdog.cancel()
        if app.poll() is None:  # an error above: the app must not outlive the scenario
            app.kill()
            app.wait()


def main() -> int:
    """Start the cluster, run the app on it (optionally losing the worker node), stop everything, write the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("work", "input", "output", "models", "config", "result"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--kill-worker", action="store_true")
    args = parser.parse_args()
    temp = tempfile.mkdtemp(prefix="raytest", dir="/tmp")  # short: Ray's socket paths are length-limited
    home = args.work / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0")
    common = ["--node-ip-address", "127.0.0.1", "--temp-dir", temp, "--disable-usage-stats"]
    worker_args = ["--address", f"127.0.0.1:{PORT}", "--num-cpus", "2", *common]
    nodes: list[subprocess.Popen[bytes]] = []
    result: dict[str, object] = {"killed": False}
    try:
        nodes.append(_start_node(["--head", "--port", str(PORT), "--num-cpus", "0", "--include-dashboard", "false",
                                  *common], args.work / "head.log", env))
        nodes.append(_start_node(worker_args, args.work / "worker.log", env))
        _wait_for_cpus(2, env)

        def kill_worker() -> None:
            if args.kill_worker:
                os.killpg(nodes[1].pid, signal.SIGKILL)
                result["killed"] = True
                nodes.append(_start_node(worker_args, args.work / "replacement.log", env))

        result["returncode"], result["log"] = _run_app(args, env, kill_worker)
        result["listening"] = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout.split("\n")
    finally:
        _stop(nodes, temp)
        shutil.rmtree(temp, ignore_errors=True)
    args.result.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
