"""``pica_linear``: the PiCa forward, ``y = x@W.T + low-rank term + b``.

Validates its arguments once (a wrong shape must fail loudly here rather than
broadcast into a silently wrong result; :mod:`.checks`) and runs the generic op
:func:`pica_kernels.ops.lowrank.lowrank_linear` with the PiCa factors:
``(A, B) = (M, P)`` on the input side, ``(U_r, M)`` on the output side. That op
runs the fused Triton kernels for CUDA tensors and the reference math for CPU
tensors (rule and overrides in :mod:`pica_kernels.ops.backend`).
"""

from __future__ import annotations

import torch

from .. import reference
from . import checks
from .lowrank import run_lowrank


def check_pica_args(x, weight, bias, basis, m, side) -> None:
    """Every argument of :func:`pica_linear`, once; errors name the argument (``basis``, ``m``, not a factor)."""
    reference.check_side(side)
    checks.check_matrix(weight, "weight")
    out_f, in_f = weight.shape
    checks.check_x(x, in_f)
    checks.check_weight(weight, x)
    checks.check_bias(bias, out_f, x)
    if basis.dim() != 2 or m.dim() != 2:
        raise ValueError(f"basis and m must be 2-D, got {tuple(basis.shape)} and {tuple(m.shape)}")
    rank = basis.shape[0] if side == "input" else basis.shape[1]
    checks.check_factor(basis, reference.basis_shape(out_f, in_f, rank, side), x, "basis",
                        f" for side={side!r} and weight {tuple(weight.shape)}")
    checks.check_factor(m, reference.m_shape(out_f, in_f, rank, side), x, "m",
                        f" for side={side!r}, rank {rank}, weight {tuple(weight.shape)}")


def pica_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    basis: torch.Tensor,
    m: torch.Tensor,
    side: str = "input",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """PiCa forward.

    x: (..., in); weight: (out, in); bias: (out,) or None;
    side="input": basis (r, in), m (out, r); side="output": basis (out, r), m (r, in).
    backend: "auto" | "reference" | "triton" (see :mod:`pica_kernels.ops.backend`).
    Returns (..., out) in x.dtype. Differentiable in x and m (and weight/basis
    if they require grad). Saved for backward: ``t = x @ P.T`` (T, r) on the
    input side, ``x`` on the output side (``dM`` needs it there).

    Inside ``torch.autocast``: x, weight and bias in the region's dtype, ``basis`` and ``m`` in their own
    (as :func:`~pica_kernels.ops.lowrank_linear`); ``m``'s gradient comes back in m's dtype, accumulated in fp32.
    """
    amp = reference.autocast_dtype(x)
    if amp is not None:
        x, weight, bias = reference.autocast_operand((x, weight, bias), amp)
        with torch.autocast(x.device.type, enabled=False):
            return pica_linear(x, weight, bias, basis, m, side, backend=backend)
    check_pica_args(x, weight, bias, basis, m, side)
    a, b = reference.lowrank_factors(basis, m, side)
    return run_lowrank(x, weight, bias, a, b, backend)
