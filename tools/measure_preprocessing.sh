#!/usr/bin/env bash
# The preprocessing figures of docs/RESULTS.md ("Full preprocessing"): the harder demo cohort
# (whole heads, varied fields of view, mass effect) against the same subjects pre-stripped, the
# effect of N4 and of the analysis mask, over three seeds, brain-mask quality per method, and the
# per-step preprocessing time. About 4 hours on 2 CPU cores. Weight-free intensity encoder
# throughout. Outputs under demo/.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
py=.venv/bin/python
mkdir -p demo/models
[ -f demo/models/template/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz ] \
  || $py -m codegraph3d template install demo/models
[ -f demo/cohort/labels.json ] || $py tools/make_demo_cohort.py demo/cohort --quiet
[ -f demo/cohort_heads/labels.json ] || $py tools/make_demo_cohort.py demo/cohort_heads \
  --head-fraction 0.5 --mass-effect-fraction 1.0 --vary-fov --quiet
[ -f demo/cohort_heads_stripped/labels.json ] || $py tools/make_demo_cohort.py demo/cohort_heads_stripped \
  --head-fraction 0 --mass-effect-fraction 1.0 --vary-fov --quiet
[ -f demo/cohort_allheads/labels.json ] || $py tools/make_demo_cohort.py demo/cohort_allheads \
  --head-fraction 1.0 --mass-effect-fraction 1.0 --vary-fov --quiet
# Two more seeds of the harder cohort and of its subjects without heads.
for seed in 1 2; do
  for heads in 0.5 0; do
    [ -f demo/seed$seed-h$heads/labels.json ] || $py tools/make_demo_cohort.py demo/seed$seed-h$heads \
      --seed $seed --head-fraction $heads --mass-effect-fraction 1.0 --vary-fov --quiet
  done
done

run() {  # run CONFIG INPUT_COHORT OUTPUT
  rm -rf "$3" && mkdir -p "$3"
  CODEGRAPH3D_CONFIG="$1" $py app.py -i "$2/dicom" -o "$3" -m demo/models
  $py -m codegraph3d_research.evaluate --run "$3" --truth "$2" --no-plots
}
variant() {  # variant EXTRA_PREPROCESS_YAML_LINES: the demo configuration with preprocess changes
  local file
  file="$(mktemp --suffix .yaml)"
  printf 'encoder:\n  name: intensity\nscoring:\n  window_radius: 1\noutput:\n  fractional: true\npreprocess:\n%b\n' "$1" > "$file"
  echo "$file"
}
earlier="$(variant '  analysis_mask: subject\n  carry_t1w_registration: false')"
no_carry="$(variant '  carry_t1w_registration: false')"
# 1. The product's preprocessing (T2w registered through the study's T1w series; analysis mask
#    the brain within the registered template brain) on the harder cohort and on the same
#    subjects pre-stripped, seeds 0-2.
run tools/demo_config.yaml demo/cohort_heads demo/exp_s0_h0.5_carry
run tools/demo_config.yaml demo/cohort_heads_stripped demo/exp_s0_h0_carry
for seed in 1 2; do
  run tools/demo_config.yaml demo/seed$seed-h0.5 demo/exp_s${seed}_h0.5_carry
  run tools/demo_config.yaml demo/seed$seed-h0 demo/exp_s${seed}_h0_carry
done
carry_a="demo/exp_s0_h0_carry-evaluation demo/exp_s1_h0_carry-evaluation demo/exp_s2_h0_carry-evaluation"
carry_b="demo/exp_s0_h0.5_carry-evaluation demo/exp_s1_h0.5_carry-evaluation demo/exp_s2_h0.5_carry-evaluation"
# shellcheck disable=SC2086
$py -m codegraph3d_research.compare --a $carry_a --b $carry_b --name-a pre-stripped --name-b heads \
  --json demo/compare_heads_vs_stripped.json | tee demo/compare_heads_vs_stripped.md
# 2. Each series registered on its own (no T1w carry), the same seeds.
run "$no_carry" demo/cohort_heads demo/exp_heads_inter
run "$no_carry" demo/cohort_heads_stripped demo/exp_s0_h0_inter
for seed in 1 2; do
  run "$no_carry" demo/seed$seed-h0.5 demo/exp_s${seed}_h0.5_inter
  run "$no_carry" demo/seed$seed-h0 demo/exp_s${seed}_h0_inter
done
$py -m codegraph3d_research.compare --a demo/exp_s0_h0_inter-evaluation demo/exp_s1_h0_inter-evaluation \
  demo/exp_s2_h0_inter-evaluation --b demo/exp_heads_inter-evaluation demo/exp_s1_h0.5_inter-evaluation \
  demo/exp_s2_h0.5_inter-evaluation --name-a pre-stripped --name-b heads | tee demo/compare_no_carry.md
# shellcheck disable=SC2086
$py -m codegraph3d_research.compare --a demo/exp_heads_inter-evaluation demo/exp_s1_h0.5_inter-evaluation \
  demo/exp_s2_h0.5_inter-evaluation --b $carry_b --name-a "own registration" --name-b "T1w carried" \
  | tee demo/compare_carry_heads.md
# 3. The earlier default (the subject's brain mask as the analysis region, own registration), seed 0.
run "$earlier" demo/cohort_heads demo/output_heads
run "$earlier" demo/cohort_heads_stripped demo/output_heads_stripped
$py -m codegraph3d_research.compare --a demo/output_heads-evaluation --b demo/exp_heads_inter-evaluation \
  --name-a "subject mask" --name-b "within template" | tee demo/compare_analysis_mask.md
# Where the false positives lie, with either analysis mask.
$py tools/edge_false_positives.py --run demo/output_heads --truth demo/cohort_heads | tee demo/edge_subject.md
$py tools/edge_false_positives.py --run demo/exp_heads_inter --truth demo/cohort_heads | tee demo/edge_inter.md
# 4. Earlier single-seed comparisons, with the subject's brain mask as the analysis region:
#    the first demo cohort, all heads, no N4, Nyul landmarks within the template brain.
run "$earlier" demo/cohort demo/output_stripped
run "$earlier" demo/cohort_allheads demo/output_allheads
run "$(variant '  analysis_mask: subject\n  carry_t1w_registration: false\n  bias_correction: none')" demo/cohort_heads demo/output_heads_non4
run "$(variant '  analysis_mask: subject\n  carry_t1w_registration: false\n  landmark_region: template')" demo/cohort_heads demo/output_heads_lmt
run "$(variant '  analysis_mask: subject\n  carry_t1w_registration: false\n  landmark_region: template')" demo/cohort_heads_stripped demo/output_hs_lmt
# 5. Brain masks against the generator's truth: deepbet, the T1w mask carried, the template mask.
$py -m codegraph3d_research.mask_quality demo/cohort_heads --models demo/models --methods deepbet carried template \
  --out demo/mask_quality.md --out demo/mask_quality.json
# 6. Per-step preprocessing time, one worker, on the T1w series of the harder cohort.
$py -m codegraph3d_research.benchmark --encoder intensity --cohort-dir demo/cohort_heads --contrast T1w \
  --models demo/models --config tools/demo_config.yaml --out demo/benchmark_preprocess.md
