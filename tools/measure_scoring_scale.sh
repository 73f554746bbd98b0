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
# BASELINE (default ca6876a, the scorer before its matmul-limit work; empty: none) runs the same
# sizes with the scorer of that commit, from a temporary git worktree, on the same machine;
# BASELINE_GLOBAL_SKIP does for it what GLOBAL_SKIP does for today's scorer. The summary puts
# both times side by side.
# Outputs under demo/scoring_scale/today/ and demo/scoring_scale/<commit>/ (one .md and .json per
# run; a finished run is not repeated) and a summary on stdout.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools/setup_venv.sh
py=.venv/bin/python
out="$root/demo/scoring_scale"
layers="${LAYERS:-4}"
sizes="${SIZES:-30 60 120 180}"
baseline="${BASELINE-ca6876a}"

# run_sizes FOLDER SKIP: every size and matching mode, with the scorer of the current directory.
run_sizes() {
  local folder="$1" skip="$2" b mode n_layers name
  mkdir -p "$folder"
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
      name="$folder/B${b}_${mode}"
      [ -f "$name.json" ] && continue
      if [ "$mode" = global ] && [[ " $skip " == *" $b "* ]]; then
        continue
      fi
      "$root/$py" -m codegraph3d_research.benchmark --skip-cohort --device cpu --scorer-sizes "$b" \
        --scorer-tokens 2000 --scorer-dim 384 --scorer-layers "$n_layers" --matmul-size 1024 "${extra[@]}" \
        --out "$name.md" --out "$name.partial.json" > /dev/null
      mv "$name.partial.json" "$name.json"
    done
  done
}

run_sizes "$out/today" "${GLOBAL_SKIP:-}"
if [ -n "$baseline" ]; then
  worktree="$(mktemp -d)"
  trap 'git -C "$root" worktree remove --force "$worktree" >/dev/null 2>&1 || true; rm -rf "$worktree"' EXIT
  git -C "$root" worktree add --detach --force "$worktree" "$baseline" >/dev/null
  # python -m puts the working directory first on the path: the worktree's codegraph3d is imported.
  (cd "$worktree" && run_sizes "$out/$baseline" "${BASELINE_GLOBAL_SKIP:-}")
fi
$py - "$out" "$baseline" $sizes <<'PY'
import json, sys
from pathlib import Path
out, baseline, sizes = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]


def row(folder: str, b: str, mode: str) -> dict | None:
    path = out / folder / f"B{b}_{mode}.json"
    return json.loads(path.read_text())["scorer"][0] if path.is_file() else None


def four_layers(r: dict | None) -> str:
    return "not run" if r is None else f"{4 * r['seconds'] / r['layers']:.1f}"


before = f"seconds for 4 layers, {baseline}" if baseline else "no baseline"
print(f"| B | matching | layers timed | {before} | seconds for 4 layers, today | speed-up | "
      "RSS before / peak today (MB) | scorer estimate, one layer (MB) | load average at end |")
print("|---|---|---|---|---|---|---|---|---|")
for b in sizes:
    for mode in ("global", "window1"):
        now, old = row("today", b, mode), (row(baseline, b, mode) if baseline else None)
        label = "global" if mode == "global" else "window r=1"
        speed = f"{old['seconds'] / old['layers'] / (now['seconds'] / now['layers']):.2f}x" if now and old else ""
        if now is None:
            print(f"| {b} | {label} | | {four_layers(old)} | not run | | | | |")
            continue
        print(f"| {b} | {label} | {now['layers']} | {four_layers(old)} | {four_layers(now)} | {speed} | "
              f"{now['rss_before_mb']:.0f} / {now['peak_rss_mb']:.0f} | {now['estimate_mb']:.0f} | "
              f"{now['load_average_end'][0]:.1f} |")
PY
