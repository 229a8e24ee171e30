"""tools/svd_accuracy.py: the accuracy report the SVD tests and benchmarks measure with."""

from __future__ import annotations

import torch

from pica_kernels.svd import truncated_svd
from tools.svd_accuracy import accuracy_report


def _gapped(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    """(m, n) float64 with a 10x drop in the spectrum after index r (tests/svd/svd_helpers.make_matrix "gap<r>")."""
    gen = torch.Generator().manual_seed(seed)
    d = min(m, n)
    i = torch.arange(1, d + 1, dtype=torch.float64)
    s = torch.where(i <= r, 1.0 + 1.0 / i, 0.1 / i)
    u, _ = torch.linalg.qr(torch.randn(m, d, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
    return (u * s) @ v.T


def test_accuracy_report_detects_a_wrong_basis():
    w = _gapped(128, 128, 8)
    good = truncated_svd(w, 8, method="exact")[0]
    bad = torch.linalg.qr(good.T + 0.3 * torch.randn(128, 8, dtype=torch.float64))[0].T
    rep_good, rep_bad = accuracy_report(w, good), accuracy_report(w, bad)
    assert rep_good["cos2"] > 1 - 1e-12 and rep_bad["cos2"] < 0.99 and rep_bad["energy"] < 0.99

