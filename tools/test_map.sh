#!/usr/bin/env bash
# The container test: build the MAP image (tools/build_map.sh) and run tests/container/test_map_container.py
# against it: the image on a generated cohort offline with a read-only input, its SEGs checked by
# dciodvfy and highdicom, its outputs compared with a plain `python app.py` run, and a bad input
# that must exit non-zero with its message in the logs.
#
# Usage: tools/test_map.sh [--no-build] [PYTEST_ARGS...]
#   --no-build   use the image as it is (it must exist); default: build it (layers are cached)
# Needs root (debootstrap, rootful podman), podman, runc, debootstrap and dicom3tools.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
version=$(sed -n 's/^  version: *//p' app.yaml | head -n1)
image="${CODEGRAPH3D_MAP_IMAGE:-localhost/codegraph3d-map:${version:-latest}}"
build=1
if [ "${1:-}" = "--no-build" ]; then build=0; shift; fi
tools/setup_venv.sh
command -v dciodvfy >/dev/null 2>&1 || { echo "test_map: dciodvfy missing: apt-get install -y dicom3tools" >&2; exit 2; }
if [ "$build" = 1 ]; then
  tools/build_map.sh --tag "$image"
fi
CODEGRAPH3D_MAP_IMAGE="$image" exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/container/test_map_container.py "$@"
