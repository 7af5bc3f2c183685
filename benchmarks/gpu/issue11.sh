#!/usr/bin/env bash
# The one prepared GPU check of issue 11 (item 5): scoring throughput on CUDA, decode to
# results, the three learned models (shipped weights), through the worker's decode-ahead
# pipeline (qgate/score/prefetch.py) and one series at a time; goal >= 500 slices/s on an
# H100. Three runs of benchmarks/score.py, each under its own timeout, about 7 minutes in
# all at most:
#   1. every slice scored (--max-slices all), default batch size (64 on CUDA);
#   2. the same with batch size 128 (does a larger batch fill the card better?);
#   3. the default configuration (per-slice models on 64 slices of the series).
#
#   OUT=/some/dir bash benchmarks/gpu/issue11.sh     # from the repository root
#
# Writes $OUT/issue11.md (the tables, with the GPU's name) and $OUT/issue11.log.
# QGATE_GPU_SMOKE=1 runs the same steps tiny and on CPU, to check the script anywhere.
#
# The device image has torch, numpy, scipy, safetensors, timm and PyYAML, not qgate's
# other dependencies: carry their wheels (Python 3.12, manylinux x86_64) in
# .cache/gpu-wheels (an ignored path: name it in the run's carry). Made here with
#   .venv/bin/pip download --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .cache/gpu-wheels pydicom==3.0.2 pydantic==2.14.4 pydantic-settings==2.16.3 \
#     python-dotenv==1.2.4
set -euo pipefail
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
WHEELS=${QGATE_GPU_WHEELS:-.cache/gpu-wheels}
mkdir -p "$OUT"
LOG="$OUT/issue11.log"
MD="$OUT/issue11.md"
: >"$LOG"

if ! $PY -c "import pydicom, pydantic_settings" 2>/dev/null; then
  SITE=$(mktemp -d)
  $PY -m pip install -q --no-index --find-links "$WHEELS" --target "$SITE" \
    pydicom pydantic pydantic-settings python-dotenv >>"$LOG" 2>&1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${QGATE_GPU_SMOKE:-0}" = 1 ]; then
  DEV=(--device cpu --threads 2) SLICES=8 SIZE=128 STREAM=2 REPS=1 LIMIT=300
else
  DEV=(--device cuda) SLICES=512 SIZE=512 STREAM=8 REPS=3 LIMIT=150
fi

{
  echo "# issue 11: scoring on CUDA, decode to results ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import os, torch; print('torch', torch.__version__, 'CPUs', os.cpu_count())"
  echo '```'
} >"$MD"

run() {  # run TITLE ARGS...: one benchmark, its tables appended to $MD
  local title=$1
  shift
  echo "## $title" >>"$MD"
  echo >>"$MD"
  local t0=$SECONDS rc=0
  timeout "$LIMIT" $PY benchmarks/score.py "${DEV[@]}" --slices "$SLICES" --size "$SIZE" \
    --reps "$REPS" --stream "$STREAM" --sets all "$@" >"$OUT/run.txt" 2>>"$LOG" || rc=$?
  cat "$OUT/run.txt" >>"$MD"
  cat "$OUT/run.txt" >>"$LOG"
  if [ "$rc" != 0 ]; then
    echo "**exit status $rc** (124: past the ${LIMIT} s limit)" >>"$MD"
  fi
  echo "($((SECONDS - t0)) s)" >>"$MD"
  echo >>"$MD"
}

run "every slice, default batch size" --max-slices all
run "every slice, batch size 128" --max-slices all --batch-size 128
run "default configuration (per-slice models on 64 slices)"
rm -f "$OUT/run.txt"
cat "$MD"
