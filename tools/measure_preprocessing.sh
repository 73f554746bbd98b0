#!/usr/bin/env bash
# The preprocessing figures of docs/RESULTS.md ("Full preprocessing"): the harder demo cohort
# (whole heads, varied fields of view, mass effect) against the same subjects pre-stripped, the
# effect of N4 and of the analysis mask, over three seeds, brain-mask quality per method, and the
# per-step preprocessing time. About 4 hours on 2 CPU cores. Weight-free intensity encoder
# throughout. Outputs under demo/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
py=.venv/bin/python
mkdir -p demo/models
[ -f demo/models/template/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz ] \
  || $py -m codegraph3d.registration install demo/models
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
  $py -m codegraph3d.evaluate --run "$3" --truth "$2" --no-plots
}
variant() {  # variant EXTRA_PREPROCESS_YAML_LINES: the demo configuration with preprocess changes
  local file
  file="$(mktemp --suffix .yaml)"
  printf 'encoder:\n  name: intensity\nscoring:\n  window_radius: 1\noutput:\n  fractional: true\npreprocess:\n%b\n' "$1" > "$file"
  echo "$file"
}
subject="$(variant '  analysis_mask: subject')"
# 1. The product's preprocessing (analysis mask: the brain within the registered template brain)
#    on the harder cohort and on the same subjects pre-stripped, seeds 0-2.
run tools/demo_config.yaml demo/cohort_heads demo/exp_heads_inter
run tools/demo_config.yaml demo/cohort_heads_stripped demo/exp_s0_h0_inter
for seed in 1 2; do
  run tools/demo_config.yaml demo/seed$seed-h0.5 demo/exp_s${seed}_h0.5_inter
  run tools/demo_config.yaml demo/seed$seed-h0 demo/exp_s${seed}_h0_inter
done
# 2. The same with the subject's own brain mask as the analysis region (the earlier default).
run "$subject" demo/cohort_heads demo/output_heads
run "$subject" demo/cohort_heads_stripped demo/output_heads_stripped
for seed in 1 2; do
  run "$subject" demo/seed$seed-h0.5 demo/exp_s${seed}_h0.5_subject
  run "$subject" demo/seed$seed-h0 demo/exp_s${seed}_h0_subject
done
$py tools/summarise_runs.py \
  "heads, template_intersection=demo/exp_heads_inter-evaluation" \
  "heads, template_intersection=demo/exp_s1_h0.5_inter-evaluation" \
  "heads, template_intersection=demo/exp_s2_h0.5_inter-evaluation" \
  "pre-stripped, template_intersection=demo/exp_s0_h0_inter-evaluation" \
  "pre-stripped, template_intersection=demo/exp_s1_h0_inter-evaluation" \
  "pre-stripped, template_intersection=demo/exp_s2_h0_inter-evaluation" \
  "heads, subject=demo/output_heads-evaluation" \
  "heads, subject=demo/exp_s1_h0.5_subject-evaluation" \
  "heads, subject=demo/exp_s2_h0.5_subject-evaluation" \
  "pre-stripped, subject=demo/output_heads_stripped-evaluation" \
  "pre-stripped, subject=demo/exp_s1_h0_subject-evaluation" \
  "pre-stripped, subject=demo/exp_s2_h0_subject-evaluation" | tee demo/seeds_summary.md
# 3. Earlier single-seed comparisons, with the subject's brain mask as the analysis region:
#    the first demo cohort, all heads, no N4, Nyul landmarks within the template brain.
run "$subject" demo/cohort demo/output_stripped
run "$subject" demo/cohort_allheads demo/output_allheads
run "$(variant '  analysis_mask: subject\n  bias_correction: none')" demo/cohort_heads demo/output_heads_non4
run "$(variant '  analysis_mask: subject\n  landmark_region: template')" demo/cohort_heads demo/output_heads_lmt
run "$(variant '  analysis_mask: subject\n  landmark_region: template')" demo/cohort_heads_stripped demo/output_hs_lmt
# 4. Brain masks against the generator's truth: deepbet, the T1w mask carried, the template mask.
$py -m codegraph3d.mask_quality demo/cohort_heads --models demo/models --methods deepbet carried template \
  --out demo/mask_quality.md --out demo/mask_quality.json
# 5. Per-step preprocessing time, one worker, on the T1w series of the harder cohort.
$py -m codegraph3d.benchmark --encoder intensity --cohort-dir demo/cohort_heads --contrast T1w \
  --models demo/models --config tools/demo_config.yaml --out demo/benchmark_preprocess.md
