#!/usr/bin/env bash
# The one GPU command (issue 12, item 7): under 8 minutes on one H100/H200, four phases, each with its own
# time limit; a phase that runs out writes what it has (labelled partial) and the next one starts.
#
#   bash benchmarks/gpu.sh                        # results into benchmarks/results/, table into the package
#   bash benchmarks/gpu.sh --results-dir "$OUT"   # everything (the tuned table too) into one folder
#   bash benchmarks/gpu.sh --dry-run              # CPU, tiny sizes, ~1 minute: checks the script itself
#
#   (a) tests   kernel tests at real sizes, bf16 and fp16 (pytest -m gpu in tests/ops), then the rest of
#               tests/ops on the GPU as time allows. Tests that need hypothesis skip when it is missing.
#   (b) tune    benchmarks/gpu_tune.py: the tuning sweep; merges the tuned-config table.
#   (c) smem    benchmarks/gpu_smem_check.py: the shared-memory model vs the JIT's metadata.shared for the
#               kernels the ops launch and the candidates (b) compiled.
#   (d) bench   benchmarks/bench_kernels.py: fused kernels vs the reference path on cuBLAS vs PEFT LoRA vs
#               the frozen layer; T in 1..8192, Llama-3-8B shapes, r 16..256; with (b)'s table in force.
#
# Files (8, the most a device call brings back): gpu-run-<device>.log (all output, phase summary at the end),
# tune-<device>.{json,md}, tuned_configs.json (with --results-dir; else the package's table is updated in
# place), smem-<device>.{json,md}, kernels-<device>.{json,md}. Commit them, naming the device.
# Phase limits in seconds (env): TESTS_S=150 TUNE_S=120 SMEM_S=45 BENCH_S=130. Exit status: 0 when every
# phase finished cleanly, 1 otherwise (the files are written either way).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset PICA_KERNELS_BACKEND PICA_KERNELS_AUTOTUNE

DRY=0
RESULTS=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --results-dir) RESULTS=$2; shift ;;
    *) echo "gpu.sh: unknown argument $1 (expected --dry-run, --results-dir DIR)" >&2; exit 2 ;;
  esac
  shift
done
TESTS_S=${TESTS_S:-150} TUNE_S=${TUNE_S:-120} SMEM_S=${SMEM_S:-45} BENCH_S=${BENCH_S:-130}

if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""   # the CPU, also on a machine with a GPU
  SLUG=dry-run
  RESULTS=${RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/pica-gpu-dry-XXXXXX")}
else
  unset TRITON_INTERPRET
  SLUG=$("$PY" -c "import re, torch; assert torch.cuda.is_available(), 'no CUDA device: use --dry-run'; \
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))") || exit 1
fi
if [[ -n $RESULTS ]]; then
  mkdir -p "$RESULTS"
  TABLE=$RESULTS/tuned_configs.json
  [[ -f $TABLE ]] || cp pica_kernels/ops/kernels/tuned_configs.json "$TABLE"
else
  RESULTS=benchmarks/results
  TABLE=pica_kernels/ops/kernels/tuned_configs.json
fi
RESULTS=$(cd "$RESULTS" && pwd)
LOG=$RESULTS/gpu-run-$SLUG.log
SUMMARY=()
STATUS=0

# run_phase NAME LIMIT_S CMD...: the command under a hard limit (SIGINT first: pytest and the scripts
# write what they have; SIGKILL 15 s later), its status and seconds into the summary.
run_phase() {
  local name=$1 limit=$2
  shift 2
  echo "== phase $name (limit ${limit} s): $*"
  local t0=$SECONDS rc
  timeout -s INT -k 15 "$limit" "$@"
  rc=$?
  local what=ok
  if [[ $rc == 124 || $rc == 130 || $rc == 137 ]]; then what="TIME LIMIT (partial)"; STATUS=1
  elif [[ $rc != 0 ]]; then what="FAILED"; STATUS=1; fi
  LAST_S=$((SECONDS - t0))
  SUMMARY+=("phase $name: $what, rc=$rc, $LAST_S s")
  echo "== phase $name: $what (rc=$rc, $((SECONDS - t0)) s)"
}

main() {
echo "== environment ($(date -u '+%Y-%m-%d %H:%M UTC'))"
[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import importlib.util, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
import triton
print("triton", triton.__version__, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
print("hypothesis", "installed" if importlib.util.find_spec("hypothesis") else "MISSING (property tests skip)")
import pica_kernels
print("pica_kernels from", pica_kernels.__file__)
PY
echo "results: $RESULTS; table: $TABLE"

# (a) kernel tests. Real sizes first (-m gpu), then the rest of tests/ops with the time left.
if [[ $DRY == 1 ]]; then
  run_phase tests "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu \
    tests/ops/test_lowrank_linear.py tests/ops/kernels/test_tuned_configs.py
else
  run_phase tests-real-sizes "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -rs --durations=5 -m gpu tests/ops
  LEFT=$((TESTS_S - LAST_S))
  if (( LEFT > 20 )); then
    run_phase tests-rest "$LEFT" "$PY" -m pytest -q -p no:cacheprovider -rs -m "not gpu" tests/ops
  fi
fi

# (b) tuning sweep (stops itself 15 s before the phase limit, keeping every finished bucket).
TUNE_ARGS=(--table "$TABLE" --results "$RESULTS/tune-$SLUG.json" --time-limit $((TUNE_S - 15)))
[[ $DRY == 1 ]] && TUNE_ARGS+=(--dry-run) || TUNE_ARGS+=(--max-candidates 6 --reps 15)
run_phase tune "$TUNE_S" "$PY" benchmarks/gpu_tune.py "${TUNE_ARGS[@]}"
export PICA_KERNELS_TUNED_CONFIGS=$TABLE   # (c) and (d) run with the table just written

# (c) shared-memory model vs compiler.
SMEM_ARGS=(--out-dir "$RESULTS" --tune-results "$RESULTS/tune-$SLUG.json" --time-limit $((SMEM_S - 10)))
[[ $DRY == 1 ]] && SMEM_ARGS+=(--dry-run)
run_phase smem "$SMEM_S" "$PY" benchmarks/gpu_smem_check.py "${SMEM_ARGS[@]}"

# (d) timing grid.
if [[ $DRY == 1 ]]; then
  run_phase bench "$BENCH_S" "$PY" benchmarks/bench_kernels.py --smoke --device cpu --tokens 17 --ranks 4 --shapes 48x40 --reps 2 \
    --out-dir "$RESULTS"
else
  run_phase bench "$BENCH_S" "$PY" benchmarks/bench_kernels.py --reps 15 --time-limit $((BENCH_S - 25)) \
    --out-dir "$RESULTS"
fi

echo "== summary ($SLUG, $SECONDS s in all)"
printf '%s\n' "${SUMMARY[@]}"
ls -1 "$RESULTS"
return $STATUS
}

# All output into the log as well; the pipeline's status is main's.
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
