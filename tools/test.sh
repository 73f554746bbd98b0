#!/usr/bin/env bash
# Set up .venv and run the test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
# The layer contracts first (pyproject.toml [tool.importlinter]): a violation fails the run.
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"
