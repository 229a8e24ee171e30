"""Accuracy of a truncated-SVD basis against the float64 SVD (docs/svd.md, "Accuracy metrics").

A benchmark and test tool, not part of the runtime package: benchmarks/run_svd_bench.py,
benchmarks/test_svd_bench.py and tests/svd report with it.
"""

from __future__ import annotations

import torch

from pica_kernels.reference import check_side


def accuracy_report(
    weight: torch.Tensor, basis: torch.Tensor, side: str = "input", singular_values: torch.Tensor | None = None,
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Accuracy of a basis of one weight against the float64 SVD, worst over a batch.

    weight (out, in) or (L, out, in); basis as :func:`pica_kernels.truncated_svd` returns it
    ((r, in) / (L, r, in) for side "input", (out, r) / (L, out, r) for "output");
    singular_values (r,) or (L, r), optional; reference: a precomputed
    ``torch.linalg.svd(weight.double(), full_matrices=False)``. Returns

    * ``energy``: ``‖W V‖²_F / Σ_{i≤r} σ_i²`` (input side; ``‖Uᵀ W‖²_F`` output side), 1 is optimal;
    * ``cos2``: mean cos² of the principal angles to the exact subspace, ``‖V_refᵀ V‖²_F / r``;
    * ``ortho``: ``‖VᵀV − I‖_max``;
    * ``sigma_rel_err``: ``max_i |σ_i − σ_ref,i| / σ_ref,1`` (nan without singular_values).
    """
    check_side(side)
    w = weight.detach().to("cpu", torch.float64)
    b = basis.detach().to("cpu", torch.float64)
    if w.dim() == 2:
        w, b = w.unsqueeze(0), b.unsqueeze(0)
    vecs = b if side == "input" else b.transpose(-1, -2)  # (L, r, n or m)
    r = vecs.shape[-2]
    u, s, vh = reference if reference is not None else torch.linalg.svd(w, full_matrices=False)
    if u.dim() == 2:
        u, s, vh = u.unsqueeze(0), s.unsqueeze(0), vh.unsqueeze(0)
    u, s, vh = u.to(torch.float64), s.to(torch.float64), vh.to(torch.float64)
    ref_vecs = vh[..., :r, :] if side == "input" else u[..., :, :r].transpose(-1, -2)
    proj = w @ vecs.transpose(-1, -2) if side == "input" else vecs @ w
    energy = proj.pow(2).sum((-1, -2)) / s[..., :r].pow(2).sum(-1)
    cos2 = (ref_vecs @ vecs.transpose(-1, -2)).pow(2).sum((-1, -2)) / r
    ortho = (vecs @ vecs.transpose(-1, -2) - torch.eye(r, dtype=torch.float64)).abs().amax((-1, -2))
    sig_err = float("nan")
    if singular_values is not None:
        sv = singular_values.detach().to("cpu", torch.float64).reshape(s.shape[0], r)
        sig_err = float(((sv - s[..., :r]).abs().amax(-1) / s[..., 0]).max())
    return {
        "energy": float(energy.min()), "cos2": float(cos2.min()), "ortho": float(ortho.max()),
        "sigma_rel_err": sig_err,
    }
