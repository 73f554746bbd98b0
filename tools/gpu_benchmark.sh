#!/usr/bin/env bash
# The paper's Table 6 at full size on one GPU: ViT-L/14 tokeniser + global MuSc at B = 30 and 180.
#
# For a GPU machine whose own python3 has torch and transformers (no venv, nothing to install;
# PYTHON=... picks another interpreter). From the repo root:
#
#     OUT=/some/folder bash tools/gpu_benchmark.sh
#
# Results: $OUT/gpu_benchmark.md (the table), $OUT/gpu_benchmark.json, $OUT/gpu_benchmark.log,
# $OUT/gpu_scorer.jsonl (tools/gpu_scorer.py: the scorer against the one-sided reference, float32
# and TF32 selection, and its phases at B = 180), $OUT/environment.txt. Without $OUT (elsewhere)
# they go to work/gpu_benchmark/.
#
# What it runs (python -m codegraph3d_research.benchmark --gpu-table): a float32 and a bf16 8192^3 matmul
# (the machine's rates); an UNTRAINED ViT-L/14 of DINOv2's size (the product's transformers-based
# encoder, or a plain-torch ViT of identical size when transformers fails there) with bf16 autocast,
# blocks 6/12/18/24, tokenising 8 random 224^3 volumes (3 axes x 224 slices each, ~1500 kept
# tokens); then global MuSc, 4 layers, D = 384, at B = 30 and B = 180 on random token sets of those
# sizes. Extraction for B volumes is extrapolated from the 8 measured volumes, as the table says.
#
# Time budget (estimate): ViT-L/14 is 162 GFLOP per 224^2 slice, ~100 TFLOP per volume, about a
# second per volume even at a third of the H200's ~790 TFLOP/s bf16; MuSc at B = 180 is 4 x 16,110
# pairs x 2 x 1500^2 x 384 = 111 TFLOP of float32 matmul, seconds to a minute. Start-up, building
# the 304M-parameter ViT on the CPU and data generation add well under a minute. The inner timeout
# (420 s, then 110 s for tools/gpu_scorer.py) stops a runaway run within 10 minutes with the
# log kept. Measured on an H200 (docs/RESULTS.md, "A GPU"): about 70 s
# for the benchmark and 40 s for tools/gpu_scorer.py.
set -euo pipefail
# --help: the comment block at the top of this file, then stop.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/work/gpu_benchmark}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    uptime
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "nvidia-smi failed"
    "$python" - <<'EOF'
import sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError as error:
    print("transformers missing (the plain-torch ViT-L/14 is used):", error)
EOF
} 2>&1 | tee "$out/environment.txt"

set +e
timeout 420 "$python" -m codegraph3d_research.benchmark --gpu-table --device cuda \
    --encoder untrained-vit-l14 --layers 6 12 18 24 --tokenise-volumes 8 --scorer-sizes 30 180 \
    --out "$out/gpu_benchmark.md" --out "$out/gpu_benchmark.json" "$@" 2>&1 | tee "$out/gpu_benchmark.log"
status=${PIPESTATUS[0]}
# The scorer against the one-sided reference and its phases (one JSON line per row).
timeout 110 "$python" tools/gpu_scorer.py --device cuda 2>&1 | tee "$out/gpu_scorer.jsonl"
[ "${PIPESTATUS[0]}" -eq 0 ] || echo "gpu_benchmark: tools/gpu_scorer.py failed; see $out/gpu_scorer.jsonl" >&2
set -e
uptime | tee -a "$out/environment.txt"
if [ "$status" -ne 0 ]; then
    echo "gpu_benchmark: the benchmark exited with status $status (124: stopped by the 420 s timeout); see $out/gpu_benchmark.log" >&2
fi
exit "$status"
