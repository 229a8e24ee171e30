#!/usr/bin/env bash
# One call on a GPU machine (H100/H200, torch+CUDA, triton; no network needed):
#   bash benchmarks/gpu.sh            # tests at real sizes in bf16, then the timing grid
#   bash benchmarks/gpu.sh --quick    # T=2048 only, r=16 and 256 (a few minutes)
# Writes benchmarks/results/kernels-<device>.{json,md} and gpu-tests-<device>.log;
# commit them. Extra arguments go to bench_kernels.py (e.g. --methods frozen pica_kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# The machine has no network: nothing is pip-installed; the checkout is put on
# PYTHONPATH (the kernels are Triton, JIT-compiled on first launch). Set PY to
# pick an interpreter; default: the project's .venv if present, else python3.
if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET PICA_KERNELS_BACKEND            # real kernels, default dispatch

QUICK=0
ARGS=()
for a in "$@"; do
  if [[ $a == --quick ]]; then QUICK=1; else ARGS+=("$a"); fi
done

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "no CUDA device visible: this script is for the GPU machine"
import triton
print("triton", triton.__version__, "device", torch.cuda.get_device_name())
import pica_kernels
print("pica_kernels from", pica_kernels.__file__)
PY
SLUG=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
mkdir -p benchmarks/results

echo "== kernel tests on the GPU (tests/ops: all shapes and dtypes, plus the real-size bf16 cases)"
if "$PY" -c "import pytest" 2>/dev/null; then
  # Not fatal: a failure is recorded in the log and the timings still run.
  "$PY" -m pytest -q -p no:cacheprovider tests/ops -rs --durations=10 2>&1 | tee "benchmarks/results/gpu-tests-$SLUG.log" || true
else
  echo "pytest is not installed here: tests skipped" | tee "benchmarks/results/gpu-tests-$SLUG.log"
fi

echo "== timings"
if [[ $QUICK == 1 ]]; then
  "$PY" benchmarks/bench_kernels.py --tokens 2048 --ranks 16 256 ${ARGS[@]+"${ARGS[@]}"}
else
  "$PY" benchmarks/bench_kernels.py ${ARGS[@]+"${ARGS[@]}"}
fi
echo "== done: benchmarks/results/kernels-$SLUG.md"
