#!/usr/bin/env bash
# Set up .venv, generate the demo cohort and run the app on it with the weight-free intensity
# encoder. Outputs go under demo/ (git-ignored).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
[ -f demo/cohort/labels.json ] || .venv/bin/python tools/make_demo_cohort.py demo/cohort
rm -rf demo/output && mkdir -p demo/output demo/models
CODEGRAPH3D_CONFIG=tools/demo_config.yaml .venv/bin/python app.py -i demo/cohort/dicom -o demo/output -m demo/models
.venv/bin/python tools/print_report.py demo/output/report.json
