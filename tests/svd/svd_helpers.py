"""Shared pieces of the truncated_svd tests: matrices with known singular vectors, tolerances, checks."""

from __future__ import annotations

import math

import torch

from tools.svd_accuracy import accuracy_report

# Per-dtype tolerances (one table, FlagGems style): orthonormality of the basis
# and singular-value error relative to sigma_1.
ORTHO_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SIGMA_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def make_matrix(m: int, n: int, spectrum: str, seed: int = 0) -> torch.Tensor:
    """(m, n) float64 with known singular vectors and an LLM-like spectrum (or an MP bulk)."""
    gen = torch.Generator().manual_seed(seed)
    d = min(m, n)
    i = torch.arange(1, d + 1, dtype=torch.float64)
    if spectrum == "mp":
        # Marchenko-Pastur bulk (Gaussian noise, edge 1 + sqrt(d/max)) plus a
        # decaying tail of 24 spikes above it: trained weights look like this.
        noise = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(max(m, n))
        spikes = 2.0 + 6.0 * torch.linspace(1, 0, 24, dtype=torch.float64) ** 2
        return noise + (_orthonormal(m, 24, gen) * spikes) @ _orthonormal(n, 24, gen).T
    if spectrum == "power":  # sigma_i = i^-0.5: flat, like real projections
        s = i**-0.5
    elif spectrum == "steep":
        s = i**-1.0
    elif spectrum.startswith("gap"):  # "gap<r>": a 10x drop after index r
        r = int(spectrum[3:])
        s = torch.where(i <= r, 1.0 + 1.0 / i, 0.1 / i)
    elif spectrum.startswith("lowrank"):  # "lowrank<k>": exactly rank k
        k = int(spectrum[7:])
        s = torch.where(i <= k, 1.0 / i, torch.zeros_like(i))
    else:
        raise ValueError(spectrum)
    return (_orthonormal(m, d, gen) * s) @ _orthonormal(n, d, gen).T


def check(weight, basis, sigma, side, *, energy, cos2, dtype=torch.float32):
    rep = accuracy_report(weight, basis, side, sigma)
    assert rep["ortho"] <= ORTHO_TOL[dtype], rep
    assert rep["energy"] >= energy, rep
    assert rep["cos2"] >= cos2, rep
    return rep



def plan_dict(plan) -> dict:
    """A :class:`pica_kernels.svd.Plan` as the settings a call runs: method, path, algorithm, block, steps."""
    return {"method": plan.method, "path": plan.path, "algorithm": plan.algorithm, "block": plan.block,
            "steps": plan.steps}
