"""tools/peak_memory.py: the summed resident memory of a command's whole process tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fixtures import ROOT

CHILD_ALLOCATES_150_MB = (
    "import subprocess, sys; "
    "child = subprocess.Popen([sys.executable, '-c', "
    "'x = bytearray(150 * 2**20); import time; time.sleep(1.5)']); "
    "sys.exit(child.wait() + 3)"
)


def test_counts_the_childs_memory_and_passes_the_exit_status_on(tmp_path: Path):
    figures_file = tmp_path / "peak.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "peak_memory.py"), "--interval", "0.1", "--json", str(figures_file),
         "--", sys.executable, "-c", CHILD_ALLOCATES_150_MB],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 3, completed.stderr
    figures = json.loads(figures_file.read_text(encoding="utf-8"))
    # The parent alone holds ~10 MB: only the child's 150 MB allocation can lift the peak this high.
    assert 150 <= figures["peak_tree_rss_mb"] < 400
    assert figures["exit_status"] == 3 and "peak resident memory" in completed.stderr


def test_refuses_a_missing_command():
    completed = subprocess.run([sys.executable, str(ROOT / "tools" / "peak_memory.py")], capture_output=True, text=True)
    assert completed.returncode == 2 and "give the command" in completed.stderr
