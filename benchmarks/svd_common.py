"""Shared pieces of the SVD benchmarks: LLM-like test matrices, SmolLM2 weights, timing."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def llm_like_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """(m, n) float32 with a real projection's spectrum: flat power law sigma_i = i^-0.5 plus a
    Marchenko-Pastur noise bulk of 5% of sigma_1 (no gap at any r)."""
    gen = torch.Generator().manual_seed(seed)
    d = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, d, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, d, generator=gen))
    s = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
    noise = torch.randn(m, n, generator=gen) * (0.05 / (math.sqrt(m) + math.sqrt(n)))
    return (u * s) @ v.T + noise


def smollm2_projections() -> dict[str, torch.Tensor]:
    """All 210 linear projections (30 layers x q,k,v,o,gate,up,down) of SmolLM2-135M, float32 (out, in)."""
    from pica_kernels.registry_models import load_smollm2

    model, _ = load_smollm2(dtype=torch.float32)
    roles = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(roles)}


def best_time(fn: Callable[[], object], repeats: int = 3) -> tuple[float, object]:
    """Minimum wall time over ``repeats`` calls (the CPU is shared: the minimum is the least disturbed)."""
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
