"""pytest-benchmark suite of truncated_svd (time; accuracy in extra_info and asserted for "accurate").

    pytest benchmarks/test_svd_bench.py --benchmark-only            # CPU, 1024² and 2048², r=64
    PICA_BENCH_SIZES=4096 PICA_BENCH_RANKS=64,256 pytest benchmarks/test_svd_bench.py --benchmark-only
    PICA_BENCH_DEVICE=cuda pytest benchmarks/test_svd_bench.py --benchmark-only

The baseline to compare against is ``full_fp32`` (``torch.linalg.svd(W.float())``, what the official
PiCa code runs per layer); ``accurate-v1`` is the preset before v2.

Not part of the test suite (pyproject's testpaths = tests). For the recorded
tables (JSON + markdown, SmolLM2 and Llama-shaped models) use run_svd_bench.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pica_kernels
from svd_common import llm_like_matrix  # noqa: E402

from pica_kernels.svd import truncated_svd  # noqa: E402
from tools.svd_accuracy import accuracy_report  # noqa: E402

DEVICE = os.environ.get("PICA_BENCH_DEVICE", "cpu")
SIZES = [int(s) for s in os.environ.get("PICA_BENCH_SIZES", "1024,2048").split(",")]
RANKS = [int(s) for s in os.environ.get("PICA_BENCH_RANKS", "64").split(",")]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}x{n}")
def case(request):
    w = llm_like_matrix(request.param, request.param)
    ref = torch.linalg.svd(w.double(), full_matrices=False)
    return w.to(DEVICE), w, ref


def _basis(method: str, w: torch.Tensor, rank: int) -> torch.Tensor:
    if method == "full_fp64":
        return torch.linalg.svd(w.double(), full_matrices=False)[2][:rank]
    if method == "full_fp32":
        return torch.linalg.svd(w.float(), full_matrices=False)[2][:rank]
    if method.startswith("svd_lowrank"):
        q, niter = {"svd_lowrank": (rank + 8, 4), "svd_lowrank_matched": (rank + 16, 16)}[method]
        return torch.svd_lowrank(w, q=q, niter=niter)[2][:, :rank].T
    return truncated_svd(w, rank, method=method)[0]


@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize(
    "method", ["accurate", "accurate-v1", "fast", "svd_lowrank", "svd_lowrank_matched", "full_fp32", "full_fp64"])
def test_truncated_svd(benchmark, case, method, rank):
    w, w_cpu, ref = case

    def run():
        out = _basis(method, w, rank)
        _sync()
        return out

    basis = benchmark.pedantic(run, rounds=1 if method.startswith("full") else 3, warmup_rounds=0)
    rep = accuracy_report(w_cpu, basis.cpu(), "input", reference=ref)
    benchmark.extra_info.update({"device": DEVICE, "rank": rank, **rep})
    if method == "accurate":
        assert rep["energy"] >= 0.9999 and rep["cos2"] >= 0.99, rep
