"""``pica_linear``: the PiCa forward, ``y = x@W.T + low-rank term + b``.

Validates its arguments (a wrong shape must fail loudly here rather than
broadcast into a silently wrong result) and runs the generic op
:func:`pica_kernels.ops.lowrank.lowrank_linear` with the PiCa factors:
``(A, B) = (M, P)`` on the input side, ``(U_r, M)`` on the output side. That op
runs the fused Triton kernels for CUDA tensors and the reference math for CPU
tensors (rule and overrides in :mod:`pica_kernels.ops.backend`).
"""

from __future__ import annotations

import torch

from .. import reference
from .backend import eager_reference
from .lowrank import lowrank_linear


def _check(x, weight, bias, basis, m, side) -> None:
    reference.check_side(side)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x must be (..., in={in_f}), got shape {tuple(x.shape)}")
    if basis.dim() != 2 or m.dim() != 2:
        raise ValueError(f"basis and m must be 2-D, got {tuple(basis.shape)} and {tuple(m.shape)}")
    rank = basis.shape[0] if side == "input" else basis.shape[1]
    want_basis = reference.basis_shape(out_f, in_f, rank, side)
    want_m = reference.m_shape(out_f, in_f, rank, side)
    if tuple(basis.shape) != want_basis:
        raise ValueError(f"basis must be {want_basis} for side={side!r} and weight {tuple(weight.shape)}, "
                         f"got {tuple(basis.shape)}")
    if tuple(m.shape) != want_m:
        raise ValueError(f"m must be {want_m} for side={side!r}, rank {rank}, weight {tuple(weight.shape)}, "
                         f"got {tuple(m.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must be ({out_f},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("basis", basis), ("m", m)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}; cast one of them")


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
    """
    _check(x, weight, bias, basis, m, side)
    if eager_reference(backend, x):  # eager CPU: the reference's own autograd, no custom-op round trip
        return reference.pica_linear(x, weight, bias, basis, m, side)
    a, b = reference.lowrank_factors(basis, m, side)
    return lowrank_linear(x, weight, bias, a, b, backend=backend)
