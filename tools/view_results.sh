#!/usr/bin/env bash
# The app's results in the OHIF viewer, on this machine only:
#   tools/view_results.sh INPUT OUTPUT [--port 8000]
# INPUT: the DICOM folder the app read; OUTPUT: its output folder (report.json, SEG/, SR/).
# Starts a throwaway Orthanc (temporary storage, remote access refused, no DICOM port) with its
# DICOMweb plugin, loads the source series, SEGs and SRs, serves OHIF 3.13.2 and the DICOMweb API
# on http://127.0.0.1:PORT, prints the URL of the most anomalous study and of every flagged series,
# and stops everything on Ctrl-C. Needs Debian's orthanc and orthanc-dicomweb, and npm the first
# time (OHIF's prebuilt files, about 50 MB, checked against the registry's integrity, kept in .cache/).
# From another machine: ssh -L 8000:127.0.0.1:8000 THIS_HOST, then open the printed URL there.
set -euo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
input="$(cd "$1" && pwd)"; output="$(cd "$2" && pwd)"; shift 2
cd "$root"
tools/setup_venv.sh
exec .venv/bin/python -m codegraph3d_research.viewer "$input" "$output" "$@"
