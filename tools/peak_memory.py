#!/usr/bin/env python3
"""Run a command and report the peak resident memory of its whole process tree.

``report.json``'s ``peak_rss_mb`` counts the app's main process only; preprocessing workers run
in their own processes. A container's memory request (``resources.memory`` in app.yaml) must
cover them all at once, so this samples the summed RSS of the command and every descendant
(Linux /proc, every ``--interval`` seconds) and prints the peak.

Usage: python tools/peak_memory.py [--interval 0.5] [--json FILE] -- COMMAND [ARGS...]
The exit status is the command's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the parent pid follows the last ')'.
            stat = Path(entry.path, "stat").read_text(encoding="utf-8", errors="replace")
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def tree_rss_bytes(root: int) -> int:
    """Summed resident memory of ``root`` and all its descendants (0 for vanished processes)."""
    tree = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            resident_pages = 0
        total += resident_pages * PAGE_BYTES
        stack.extend(tree.get(pid, []))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.interval <= 0:
        parser.error("--interval must be > 0")
    started = time.monotonic()
    process = subprocess.Popen(command)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        time.sleep(args.interval)
    seconds = time.monotonic() - started
    figures = {"command": command, "exit_status": process.returncode, "seconds": round(seconds, 1),
               "peak_tree_rss_mb": round(peak / 2**20, 1), "interval_s": args.interval}
    print(f"peak_memory: peak resident memory of the process tree {figures['peak_tree_rss_mb']} MB "
          f"over {figures['seconds']} s (sampled every {args.interval} s); exit status {process.returncode}",
          file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
