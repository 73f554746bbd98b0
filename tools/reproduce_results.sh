#!/usr/bin/env bash
# Regenerate every figure of docs/RESULTS.md on this machine (about 45 minutes on 2 CPU cores).
# Outputs go under demo/ (git-ignored). Quality figures use the weight-free intensity encoder
# with the first version's preprocessing (tools/prestripped_config.yaml); speed figures also use an untrained ViT-L/14, which costs what
# DINOv2 ViT-L/14 costs.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
py=.venv/bin/python
export CODEGRAPH3D_CONFIG=tools/prestripped_config.yaml
mkdir -p demo/models

# 1. The 12-subject demo cohort and the 48-subject cohort (48 series per contrast, so B/12 >= 4).
[ -f demo/cohort/labels.json ] || $py tools/make_demo_cohort.py demo/cohort --quiet
[ -f demo/cohort48/labels.json ] || $py tools/make_demo_cohort.py demo/cohort48 --subjects 48 --seed 1 --quiet
[ -f demo/cohort_normal/labels.json ] || $py tools/make_demo_cohort.py demo/cohort_normal --lesion-fraction 0 --seed 7 --quiet

# 2. The app on each, then the evaluation (metrics.json, metrics.md, pictures beside the run).
for name in cohort cohort48 cohort_normal; do
  rm -rf "demo/output_$name" && mkdir -p "demo/output_$name"
  $py app.py -i "demo/$name/dicom" -o "demo/output_$name" -m demo/models
done
$py -m codegraph3d_research.evaluate --run demo/output_cohort --truth demo/cohort
$py -m codegraph3d_research.evaluate --run demo/output_cohort48 --truth demo/cohort48

# 3. The per-position z-score baseline on the same cohorts, side by side with the product.
$py -m codegraph3d_research.baseline --input demo/cohort/dicom --truth demo/cohort --out demo/baseline_cohort \
  --compare demo/output_cohort-evaluation/metrics.json
$py -m codegraph3d_research.baseline --input demo/cohort48/dicom --truth demo/cohort48 --out demo/baseline_cohort48 \
  --compare demo/output_cohort48-evaluation/metrics.json

# 4. Ablations from the token cache (views, chunked batches, projection size, layers; 3 seeds).
$py -m codegraph3d_research.ablations fill --input demo/cohort48/dicom --cache demo/cache48
$py -m codegraph3d_research.ablations --cache demo/cache48 --truth demo/cohort48 --seeds 0 1 2 \
  --json demo/ablations48.json --markdown demo/ablations48.md

# 5. Speed: the pipeline on 8 generated volumes and the scorer at B = 30 (intensity encoder),
#    and the untrained ViT-L/14 encoder alone.
unset CODEGRAPH3D_CONFIG
$py -m codegraph3d_research.benchmark --encoder intensity --n 8 --config tools/prestripped_config.yaml --out demo/benchmark.md
$py -m codegraph3d_research.benchmark --encoder-only --encoder untrained-vit-l14 --slices 32 --out demo/encoder_speed.md
# On a GPU machine: bash tools/gpu_benchmark.sh (writes gpu_benchmark.md).
# The full preprocessing chain (skull stripping, registration, QA): tools/measure_preprocessing.sh.
# CoDeGraph against MuSc (40-subject cohorts, 3 seeds, about 1.5 hours): tools/measure_codegraph.sh,
#   then the settings sweep from its token cache: python tools/sweep_codegraph.py demo/codegraph.
# Cohort bank thresholds: tools/measure_bank_threshold.sh. Scoring time and memory against the
#   batch size (B = 30-180, about 1.5 hours): tools/measure_scoring_scale.sh.
# The MAP container (root, podman): tools/build_map.sh, then the container against a plain run on
#   the demo cohort, and the plain run's memory:
#   tools/run_map.sh --config tools/demo_config.yaml demo/cohort_heads/dicom work/demo_map
#   CODEGRAPH3D_CONFIG=tools/demo_config.yaml $py tools/peak_memory.py -- \
#     $py app.py -i demo/cohort_heads/dicom -o work/demo_plain -m demo/models
#   $py -m codegraph3d run-diff work/demo_plain work/demo_map
