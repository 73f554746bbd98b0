#!/usr/bin/env bash
# The preprocessing figures of docs/RESULTS.md ("Full preprocessing"): the harder demo cohort
# (whole heads, varied fields of view, mass effect) against the same subjects pre-stripped, the
# effect of N4, brain-mask quality per method, and the per-step preprocessing time. About 110
# minutes on 2 CPU cores. Weight-free intensity encoder throughout. Outputs under demo/.
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

run() {  # run CONFIG INPUT_COHORT OUTPUT
  rm -rf "$3" && mkdir -p "$3"
  CODEGRAPH3D_CONFIG="$1" $py app.py -i "$2/dicom" -o "$3" -m demo/models
  $py -m codegraph3d.evaluate --run "$3" --truth "$2" --no-plots
}
# 1. The product's preprocessing on the harder cohort and on the same subjects pre-stripped.
run tools/demo_config.yaml demo/cohort_heads demo/output_heads
run tools/demo_config.yaml demo/cohort demo/output_stripped
run tools/demo_config.yaml demo/cohort_heads_stripped demo/output_heads_stripped
run tools/demo_config.yaml demo/cohort_allheads demo/output_allheads
# 2. Without N4.
no_n4="$(mktemp --suffix .yaml)"
printf 'encoder:\n  name: intensity\nscoring:\n  window_radius: 1\noutput:\n  fractional: true\npreprocess:\n  bias_correction: none\n' > "$no_n4"
run "$no_n4" demo/cohort_heads demo/output_heads_non4
# 3. Brain masks against the generator's truth: deepbet, the T1w mask carried, the template mask.
$py -m codegraph3d.mask_quality demo/cohort_heads --models demo/models --methods deepbet carried template \
  --out demo/mask_quality.md --out demo/mask_quality.json
# 4. Per-step preprocessing time, one worker, on the T1w series of the harder cohort.
$py -m codegraph3d.benchmark --encoder intensity --cohort-dir demo/cohort_heads --contrast T1w \
  --models demo/models --config tools/demo_config.yaml --out demo/benchmark_preprocess.md
