#!/usr/bin/env bash
# CoDeGraph against MuSc (docs/RESULTS.md, "CoDeGraph"): 40-subject T2w cohorts, 35 % of subjects
# with a lesion of 16-24 mm mean semi-axis (large enough that some 14^3-voxel tokens lie wholly
# inside it: smaller lesions give only partial-volume tokens, which differ from lesion to lesion
# and are not a consistent anomaly for the intensity encoder), three seeds, lesion models
# (APPEARANCES, default "striped varied"):
#   striped  - every lesion has one laminated texture that no normal tissue has (a consistent
#              anomaly, where MuSc drops);
#   distinct - every lesion has one uniform intensity unlike any normal tissue; consistent, but to
#              the intensity encoder barely anomalous (normal brains hold near-uniform tokens at
#              every standardised intensity), so it does not test CoDeGraph;
#   varied   - every lesion draws its own intensities (dissimilar anomalies, the control);
#   typical  - the default appearance (between grey matter and CSF on T2w: intensity tokens of
#              such lesions find lookalikes at every CSF border, so globally they barely stand out).
# Each cohort is preprocessed and encoded once (token cache); MuSc and CoDeGraph then score the
# same tokens, with global matching (the paper) and with the radius-1 window (the demo's).
# Differences are paired over the same subjects, with bootstrap intervals (codegraph3d_research.compare).
# The cohorts are generated pre-skull-stripped on one grid, so preprocessing is the first version's
# (tools/prestripped_config.yaml: no bias correction, stripping or registration): both methods score
# the same tokens, and what differs is only the scorer. Weight-free intensity encoder.
# About 1.5 hours on 2 CPU cores. Outputs under demo/codegraph/.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
py=.venv/bin/python
out=demo/codegraph
mkdir -p "$out" demo/models
[ -f demo/models/template/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz ] \
  || $py -m codegraph3d template install demo/models
seeds="${SEEDS:-11 12 13}"
appearances="${APPEARANCES:-striped varied}"
for appearance in $appearances; do
  for seed in $seeds; do
    cohort="$out/cohort_${appearance}_$seed"
    # labels.json is written last: without it the cohort is incomplete (an interrupted run) and is redone.
    [ -f "$cohort/labels.json" ] || $py tools/make_demo_cohort.py "$cohort" --subjects 40 --seed "$seed" \
      --lesion-fraction 0.35 --contrasts T2w --localizer-fraction 0 --lesion-appearance "$appearance" \
      --lesion-radius-mm 16 24 \
      --overwrite --quiet
  done
done

config() {  # config METHOD WINDOW_RADIUS -> a YAML file
  local file
  file="$(mktemp --suffix .yaml)"
  printf 'preprocess:\n  bias_correction: none\n  skull_strip: none\n  registration: none\n  intensity_scaling: landmarks\nencoder:\n  name: intensity\nscoring:\n  window_radius: %s\n  method: %s\noutput:\n  fractional: true\ncache:\n  folder: %s\n' \
    "$2" "$1" "$root/$out/token_cache" > "$file"
  echo "$file"
}
for appearance in $appearances; do
  for seed in $seeds; do
    cohort="$out/cohort_${appearance}_$seed"
    for method in musc codegraph; do
      for radius in -1 1; do
        run="$out/run_${appearance}_${seed}_${method}_r${radius}"
        [ -f "$run-evaluation/metrics.json" ] && continue
        rm -rf "$run" && mkdir -p "$run"
        CODEGRAPH3D_CONFIG="$(config "$method" "$radius")" $py app.py -i "$cohort/dicom" -o "$run" -m demo/models
        $py -m codegraph3d_research.evaluate --run "$run" --truth "$cohort" --no-plots
      done
    done
  done
done

for appearance in $appearances; do
  for radius in -1 1; do
    a=() b=()
    for seed in $seeds; do
      a+=("$out/run_${appearance}_${seed}_musc_r${radius}-evaluation")
      b+=("$out/run_${appearance}_${seed}_codegraph_r${radius}-evaluation")
    done
    echo "## lesions: $appearance, window radius $radius (-1 = global)"
    $py -m codegraph3d_research.compare --a "${a[@]}" --b "${b[@]}" --name-a MuSc --name-b CoDeGraph --contrasts T2w \
      --json "$out/compare_${appearance}_r${radius}.json"
  done
done | tee "$out/summary.md"
$py tools/summarise_codegraph.py "$out" --appearances $appearances --seeds $seeds | tee "$out/per_seed.md"
