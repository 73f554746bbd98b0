#!/usr/bin/env bash
# Set up .venv, generate the demo cohort and run the app on it with the weight-free intensity
# encoder and the full preprocessing (N4, deepbet, affine registration to the MNI152 template).
# Outputs go under demo/ (git-ignored).
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
cohort=demo/cohort_heads
# Twelve subjects, half of them whole heads (skull, scalp, face, neck), varied fields of view and
# matrices, four with lesions pushing the anatomy around them (mass effect).
[ -f "$cohort/labels.json" ] || .venv/bin/python tools/make_demo_cohort.py "$cohort" \
    --head-fraction 0.5 --mass-effect-fraction 1.0 --vary-fov
rm -rf demo/output && mkdir -p demo/output demo/models
[ -f demo/models/template/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz ] \
    || .venv/bin/python -m codegraph3d template install demo/models
CODEGRAPH3D_CONFIG=tools/demo_config.yaml .venv/bin/python app.py -i "$cohort/dicom" -o demo/output -m demo/models
.venv/bin/python tools/print_report.py demo/output/report.json
