#!/usr/bin/env bash
# The one prepared GPU job of issue 10: build domain-randomised data on CUDA and train the
# three models on it, within about 8 minutes of a lent GPU. Everything also runs on a CPU
# (slowly); QGATE_GPU_SCALE=0.02 makes a smoke-test run of it anywhere.
#
#   bash training/gpu/issue10.sh OUT_DIR [REALCT_DIR]
#
# Needs: this checkout installed (pip install -e .) with torch, and the real CT sources
# materialised by `python -m training.anatomy.sources build` into REALCT_DIR (default
# .cache/realct). The device tool carries at most 64 MiB: carry a subset of the .npz files
# and their manifest.json, or build them on the machine from staged raw files.
# Writes OUT_DIR/{mdiqa,n2q,chestiqa}.safetensors, histories and logs; it never touches
# qgate/weights/ (promote by copying after `qgate-train evaluate-independent --weights-dir`).
set -euo pipefail
OUT=${1:?usage: issue10.sh OUT_DIR [REALCT_DIR]}
REALCT=${2:-.cache/realct}
SCALE=${QGATE_GPU_SCALE:-1}
PY=${PYTHON:-python3}
blocks() { $PY -c "import sys; print(max(1, round(float(sys.argv[1]) * $SCALE)))" "$1"; }
mkdir -p "$OUT"
export QGATE_REALCT="$REALCT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt" || true
t0=$(date +%s)
# 1. data (GPU: projector and FBP on CUDA); two builders share the card. Round 11's
# recipes (training/reports/REPORT.md): kernels in the pixel's frequency for both; half the
# real objects keep part of their source's texture in the second set, which Noise2Quality
# trains on beside the first (MD-IQA lost routine ranking and ladders on it: plain only).
$PY -m training.cli build-randomized "$OUT/dr" --blocks "$(blocks 300)" --seed 5 --pixel-kernels 0.8 --realct "$REALCT" > "$OUT/build0.log" 2>&1 &
$PY -m training.cli build-randomized "$OUT/dr_tex" --blocks "$(blocks 300)" --seed 4 --pixel-kernels 0.8 --texture 0.5 --realct "$REALCT" > "$OUT/build1.log" 2>&1 &
$PY -m training.cli build-chest "$OUT/chest" --blocks "$(blocks 120)" --doses-per-class 3 --seed 2 --routine 1.0 --soft-cutoff 0.6,1.0 --texture 0.5 --realct "$REALCT" > "$OUT/chest_build.log" 2>&1
wait
echo "data: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
# 2. training, the two slice models side by side on the card, then the chest model
$PY -m training.cli fit-randomized mdiqa "$OUT" --data "$OUT/dr" --steps "$(blocks 6000)" --budget "$(blocks 180)" > "$OUT/fit_mdiqa.log" 2>&1 &
$PY -m training.cli fit-randomized n2q "$OUT" --data "$OUT/dr" --data "$OUT/dr_tex" --crops 96,128,160 --map-loss l1 --steps "$(blocks 6000)" --budget "$(blocks 180)" > "$OUT/fit_n2q.log" 2>&1 &
wait
$PY -m training.cli fit-chest "$OUT" --data "$OUT/chest" --steps "$(blocks 2000)" --budget "$(blocks 60)" --dose-label hann --noise-edge-hu 5.3 > "$OUT/fit_chest.log" 2>&1
echo "total: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
ls -l "$OUT"/*.safetensors
