#!/usr/bin/env bash
# Scoring time and peak memory against the batch size (docs/RESULTS.md, "Scoring at scale"):
# B in {30, 60, 120, 180} random token sets of 2,000 tokens x 384 dims (3 axes x 128), global
# matching and the radius-1 window, one batch size per process so that each peak RSS is its own.
# LAYERS (default 4) layers per batch; on a 2-core CPU global matching at B = 120 and 180 takes
# about 7 and 16 minutes per layer, so GLOBAL_LARGE_LAYERS (default 1) layers are timed there:
# layers are scored one after another on the same sizes, so the time scales exactly with them.
# The radius-1 window takes about 1/20 of global matching's time (position-grouped matmuls), and
# WINDOW_LARGE_LAYERS (default 1) layers are timed at B = 120 and 180.
# GLOBAL_SKIP lists batch sizes whose global run is skipped (e.g. "180": about 25 minutes for one
# layer here); the summary then says "not run".
# Outputs under demo/scoring_scale/ (one .md and .json per run) and a summary on stdout.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
py=.venv/bin/python
out=demo/scoring_scale
mkdir -p "$out"
layers="${LAYERS:-4}"
sizes="${SIZES:-30 60 120 180}"
for b in $sizes; do
  for mode in global window1; do
    n_layers="$layers"
    extra=()
    if [ "$mode" = window1 ]; then
      extra=(--scorer-window 1)
      [ "$b" -gt 60 ] && n_layers="${WINDOW_LARGE_LAYERS:-1}"
    elif [ "$b" -gt 60 ]; then
      n_layers="${GLOBAL_LARGE_LAYERS:-1}"
    fi
    name="$out/B${b}_${mode}"
    [ -f "$name.json" ] && continue
    if [ "$mode" = global ] && [[ " ${GLOBAL_SKIP:-} " == *" $b "* ]]; then
      continue
    fi
    $py -m codegraph3d_research.benchmark --skip-cohort --device cpu --scorer-sizes "$b" --scorer-tokens 2000 \
      --scorer-dim 384 --scorer-layers "$n_layers" --matmul-size 1024 "${extra[@]}" \
      --out "$name.md" --out "$name.partial.json" > /dev/null
    mv "$name.partial.json" "$name.json"
  done
done
$py - "$out" $sizes <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| B | matching | layers timed | seconds | seconds for 4 layers | RSS before / peak (MB) | scorer estimate, one layer (MB) | load average at end |")
print("|---|---|---|---|---|---|---|---|")
for b in sys.argv[2:]:
    for mode in ("global", "window1"):
        path = out / f"B{b}_{mode}.json"
        if not path.is_file():
            print(f"| {b} | {'global' if mode == 'global' else 'window r=1'} | not run | | | | | |")
            continue
        row = json.loads(path.read_text())["scorer"][0]
        per_layer = row["seconds"] / row["layers"]
        print(f"| {b} | {'global' if mode == 'global' else 'window r=1'} | {row['layers']} | {row['seconds']:.1f} | "
              f"{4 * per_layer:.1f} | {row['rss_before_mb']:.0f} / {row['peak_rss_mb']:.0f} | {row['estimate_mb']:.0f} | "
              f"{row['load_average_end'][0]:.1f} |")
PY
