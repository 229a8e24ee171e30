"""Pure-PyTorch math of every PiCa op: the specification.

Every fast path (Triton kernels, fused launches) is tested against these
functions. They are written for clarity, not speed, but they are also the
CPU path of :class:`pica_kernels.PiCaLinear`, so they avoid needless copies.

Conventions (PyTorch, see DESIGN.md section 1)::

    weight  W : (out, in)          y = x @ W.T + b
    x         : (..., in)          any leading dims
    side="input"  (default, the paper's experiments):
        basis P = Vh[:r]  : (r, in)   frozen
        m     M           : (out, r)  trainable, zero-init
        delta_weight = M @ P                         (out, in)
        y = x @ W.T + (x @ P.T) @ M.T + b
    side="output":
        basis U_r = U[:, :r] : (out, r) frozen
        m     M              : (r, in)  trainable, zero-init
        delta_weight = U_r @ M                       (out, in)
        y = x @ W.T + (x @ M.T) @ U_r.T + b

Both are the generic low-rank form ``y = x@W.T + (x@B.T)@A.T + b`` with
``(A, B) = (M, P)`` on the input side and ``(U_r, M)`` on the output side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIDES = ("input", "output")


def check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    return side


def basis_shape(out_features: int, in_features: int, rank: int, side: str) -> tuple[int, int]:
    """Shape of the frozen basis of one layer: ``(r, in)`` input side, ``(out, r)`` output side."""
    check_side(side)
    return (rank, in_features) if side == "input" else (out_features, rank)


def m_shape(out_features: int, in_features: int, rank: int, side: str) -> tuple[int, int]:
    """Shape of the trainable ``M``: ``(out, r)`` input side, ``(r, in)`` output side."""
    check_side(side)
    return (out_features, rank) if side == "input" else (rank, in_features)


def lowrank_factors(basis: torch.Tensor, m: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``delta_weight = A @ B``: ``A`` is ``(out, r)``, ``B`` is ``(r, in)``."""
    check_side(side)
    return (m, basis) if side == "input" else (basis, m)


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """Generic ``y = x @ W.T + (x @ B.T) @ A.T + bias``.

    x: (..., in); weight: (out, in); bias: (out,) or None; a: (out, r); b: (r, in).
    Returns (..., out) in ``x.dtype``. ``a``/``b`` are cast to ``x.dtype`` when
    they differ (e.g. an fp32 ``M`` with bf16 activations); the cast is of an
    ``r``-wide matrix, never of ``W``.
    """
    if a.dtype != x.dtype:
        a = a.to(x.dtype)
    if b.dtype != x.dtype:
        b = b.to(x.dtype)
    return F.linear(x, weight, bias) + F.linear(F.linear(x, b), a)


def pica_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    basis: torch.Tensor,
    m: torch.Tensor,
    side: str = "input",
) -> torch.Tensor:
    """PiCa forward. Shapes in the module docstring; returns (..., out)."""
    a, b = lowrank_factors(basis, m, side)
    return lowrank_linear(x, weight, bias, a, b)


def delta_weight(basis: torch.Tensor, m: torch.Tensor, side: str = "input") -> torch.Tensor:
    """``ΔW`` of shape (out, in), computed in float32 (float64 if either input is float64)."""
    a, b = lowrank_factors(basis, m, side)
    acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(acc) @ b.to(acc)


def pica_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    basis: torch.Tensor,
    m: torch.Tensor,
    grad_out: torch.Tensor,
    side: str = "input",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form backward of :func:`pica_linear` with W and the basis frozen.

    x: (T, in); grad_out: (T, out). Returns ``(grad_x (T, in), grad_m)``, grad_m
    shaped like ``m``. Input side: ``t = x@P.T``; ``dM = dy.T @ t``;
    ``dx = dy@W + (dy@M)@P``. Output side: ``dM = (dy@U_r).T @ x``;
    ``dx = dy@W + (dy@U_r)@M``.
    """
    check_side(side)
    if side == "input":
        t = x @ basis.T
        grad_m = grad_out.T @ t
        grad_x = grad_out @ weight + (grad_out @ m) @ basis
    else:
        s = grad_out @ basis
        grad_m = s.T @ x
        grad_x = grad_out @ weight + s @ m
    return grad_x, grad_m
