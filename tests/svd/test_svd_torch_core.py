"""The pure-torch twin of the C++ core (pica_kernels/svd/torch_core.py) gives the extension's bits."""

from __future__ import annotations

import pytest
import torch
from svd_helpers import make_matrix

from pica_kernels import svd as svd_mod
from pica_kernels.svd import truncated_svd


def test_cpp_backend_matches_torch_fallback_bit_for_bit():
    if not svd_mod.HAS_CPP:
        pytest.skip(f"C++ extension not built: {svd_mod.backend_error()}")
    for shape, rank, side, kw in [
        ((2, 256, 384), 12, "input", {}),  # Krylov v2
        ((2, 256, 384), 12, "input", {"method": "accurate-v1"}),  # Krylov v1
        ((384, 256), 12, "output", {"method": "fast"}),  # Krylov v2, tall
        ((384, 256), 12, "output", {}),  # Krylov, tall
        ((192, 576), 64, "output", {}),  # Gram
        ((384, 384), 16, "input", {"steps": 4, "exact_ratio": 1e9}),  # eigh orthonormalisation (v2)
        ((384, 384), 16, "input", {"steps": 4, "exact_ratio": 1e9, "method": "accurate-v1"}),  # (v1)
        ((128, 96), 8, "input", {"method": "exact"}),
    ]:
        spectrum = "lowrank40" if "exact_ratio" in kw else "power"
        w = make_matrix(*shape[-2:], spectrum).float()
        if len(shape) == 3:
            w = torch.stack([w, w.flip(0)])
        a = truncated_svd(w, rank, side, backend="cpp", **kw)
        b = truncated_svd(w, rank, side, backend="torch", **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (shape, rank, side, kw)


