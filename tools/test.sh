#!/usr/bin/env bash
# Set up .venv and run the test suite.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
# The layer contracts first (pyproject.toml [tool.importlinter]): a violation fails the run.
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"
