#!/usr/bin/env bash
# Cohort-bank thresholds (docs/RESULTS.md, "Cohort bank"): which threshold policy flags fewer
# volumes and voxels of all-normal batches, at equal Dice on batches with lesions?
#   batch          - robust_z on the batch alone (no bank);
#   bank_refs      - bank volumes join every batch as references; robust_z over the whole batch;
#   bank_threshold - threshold.policy bank: bounds from the bank volumes' scores in the batch.
# Bank: 30 healthy T2w subjects (seed 21). Test batches: 12 T2w subjects, seeds 31-33, once all
# normal and once with 35 % lesions. Pre-stripped cohorts on one grid, so preprocessing is
# tools/prestripped_config.yaml's; weight-free intensity encoder, window radius 1.
# About 40 minutes on 2 CPU cores. Outputs under demo/bank_threshold/.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
py=.venv/bin/python
out=demo/bank_threshold
mkdir -p "$out" demo/models
seeds="${SEEDS:-31 32 33}"
make_cohort() {  # make_cohort FOLDER SUBJECTS SEED LESION_FRACTION
  # labels.json is written last: without it the cohort is incomplete (an interrupted run) and is redone.
  [ -f "$1/labels.json" ] || $py tools/make_demo_cohort.py "$1" --subjects "$2" --seed "$3" \
    --lesion-fraction "$4" --contrasts T2w --localizer-fraction 0 --overwrite --quiet > /dev/null
}
base="$(mktemp --suffix .yaml)"
printf 'preprocess:\n  bias_correction: none\n  skull_strip: none\n  registration: none\n  intensity_scaling: landmarks\nencoder:\n  name: intensity\nscoring:\n  window_radius: 1\noutput:\n  fractional: true\ncache:\n  folder: %s\n' \
  "$root/$out/token_cache" > "$base"

make_cohort "$out/bank_cohort" 30 21 0
if [ ! -f "$out/bank/bank.json" ]; then
  rm -rf "$out/bank"
  CODEGRAPH3D_CONFIG="$base" $py -m codegraph3d bank add "$out/bank" -i "$out/bank_cohort/dicom" -m demo/models
fi
CODEGRAPH3D_CONFIG="$base" $py -m codegraph3d bank check "$out/bank"

arm_config() {  # arm_config ARM -> a YAML file
  local file
  file="$(mktemp --suffix .yaml)"
  cat "$base" > "$file"
  case "$1" in
    batch) ;;
    bank_refs) printf 'bank:\n  folder: %s\n  min_patients: 1000\n' "$root/$out/bank" >> "$file" ;;
    bank_threshold) printf 'bank:\n  folder: %s\nthreshold:\n  policy: bank\n' "$root/$out/bank" >> "$file" ;;
  esac
  echo "$file"
}
for seed in $seeds; do
  for kind in normal lesions; do
    cohort="$out/cohort_${kind}_$seed"
    make_cohort "$cohort" 12 "$seed" "$([ "$kind" = normal ] && echo 0 || echo 0.35)"
    for arm in batch bank_refs bank_threshold; do
      run="$out/run_${kind}_${seed}_${arm}"
      [ -f "$run-evaluation/metrics.json" ] && continue
      rm -rf "$run" && mkdir -p "$run"
      CODEGRAPH3D_CONFIG="$(arm_config "$arm")" $py app.py -i "$cohort/dicom" -o "$run" -m demo/models > "$run.log" 2>&1
      $py -m codegraph3d_research.evaluate --run "$run" --truth "$cohort" --no-plots > /dev/null
    done
  done
done
$py tools/summarise_thresholds.py "$out" --arms batch bank_refs bank_threshold --seeds $seeds | tee "$out/summary.md"
