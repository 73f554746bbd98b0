#!/usr/bin/env bash
# Very large series (docs/RESULTS.md, "Very large series"): time and peak memory of the whole
# process tree for the product's full preprocessing (tools/demo_config.yaml, weight-free intensity
# encoder) on T2w cohorts acquired at 0.5 mm and 0.42 mm isotropic (about 60 and 100 million voxels
# a series), with the default two workers and selection.max_voxels (which skips the 0.42 mm
# cohort's 106-million-voxel series). About 20 minutes on 2 CPU cores. Outputs under demo/.
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
for case in "0.5 4" "0.42 3"; do
  set -- $case
  voxel=$1 subjects=$2
  cohort=demo/large_$voxel
  [ -f $cohort/labels.json ] || $py tools/make_demo_cohort.py $cohort --subjects $subjects --seed 11 \
      --contrasts T2w --localizer-fraction 0 --voxel-mm $voxel --quiet
  rm -rf $cohort/output && mkdir -p $cohort/output
  CODEGRAPH3D_CONFIG=tools/demo_config.yaml $py tools/peak_memory.py --json $cohort/peak.json -- \
      $py app.py -i $cohort/dicom -o $cohort/output -m demo/models > $cohort/run.log 2>&1
  $py - "$cohort" "$voxel" <<'PY'
import json, sys
from pathlib import Path
import pydicom
cohort, voxel = Path(sys.argv[1]), sys.argv[2]
sizes = []
for folder in sorted({p.parent for p in (cohort / "dicom").rglob("*.dcm")}):
    files = list(folder.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    sizes.append(int(first.Rows) * int(first.Columns) * len(files) / 1e6)
report = json.loads((cohort / "output" / "report.json").read_text())
peak = json.loads((cohort / "peak.json").read_text())
scored = sum(s["status"] == "scored" for s in report["series"])
print(f"{voxel} mm: {len(sizes)} series of {min(sizes):.0f}-{max(sizes):.0f} Mvoxels, {scored} scored; "
      f"wall {peak['seconds']:.0f} s; peak process tree {peak['peak_tree_rss_mb']:.0f} MB; "
      f"main process {report['peak_rss_mb']:.0f} MB; stages (s) {report['timings_s']}")
PY
done
