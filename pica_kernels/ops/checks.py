"""Argument checks of the ops' public entry points, one function per kind of argument.

Every entry point (:func:`~pica_kernels.ops.lowrank_linear`, :func:`~pica_kernels.ops.pica_linear`,
:func:`~pica_kernels.ops.grouped_lowrank_linear`, :func:`~pica_kernels.ops.multitask_pica_linear`)
checks each of its arguments exactly once, before it picks a backend, so the reference path, the Triton
path and the eager CPU shortcut refuse the same arguments with the same message: a ``ValueError`` (shape,
device) or ``TypeError`` (dtype) naming the argument. Nothing below the entry points checks again, but for the
factors' shared rank (:func:`pica_kernels.reference.check_ranks`, an int comparison): the custom ops can be
called directly (``torch.ops.pica``), and a Triton launch with mismatched ranks would read past the
narrower factor.
"""

from __future__ import annotations

import torch

from .. import reference


def check_x(x: torch.Tensor, in_features: int) -> None:
    """``x`` (..., in) floating point: a 0-d ``x`` or a wrong last dimension names ``x``."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must be (..., in={in_features}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def check_matrix(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def check_weight(weight: torch.Tensor, x: torch.Tensor, name: str = "weight") -> None:
    """The frozen weight (out, in): on x's device, in x's dtype (shape against x: :func:`check_x`)."""
    check_matrix(weight, name)
    check_device(weight, x, name)
    if weight.dtype != x.dtype:
        raise TypeError(f"x has dtype {x.dtype} but {name} has {weight.dtype}; cast one of them")


def check_bias(bias: torch.Tensor | None, out_features: int, x: torch.Tensor, name: str = "bias") -> None:
    """``bias`` (out,) or None, on x's device and in x's dtype (the kernels add it in the output dtype)."""
    if bias is None:
        return
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name} must be ({out_features},), got {tuple(bias.shape)}")
    check_device(bias, x, name)
    if bias.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {bias.dtype} but x has {x.dtype}; cast the layer (module.to(dtype))")


def check_factor(t: torch.Tensor, shape: tuple[int, ...], x: torch.Tensor, name: str, why: str = "") -> None:
    """A low-rank factor (``a``, ``b``, ``basis``, ``m``, ...): exactly ``shape``, on x's device, floating point
    (any floating dtype: it is cast to x's on the fly; an integer or bool factor would be cast silently)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {tuple(shape)}{why}, got {tuple(t.shape)}")
    check_device(t, x, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_device(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_lowrank_args(x, weight, bias, a, b, names: tuple[str, str] = ("a", "b")) -> None:
    """All arguments of ``y = x @ W.T + (x @ B.T) @ A.T + bias``: a (out, r), b (r, in), r taken from ``a``."""
    check_matrix(weight, "weight")
    out_f, in_f = weight.shape
    check_x(x, in_f)
    check_weight(weight, x)
    check_bias(bias, out_f, x)
    check_matrix(a, names[0])
    check_factor(a, (out_f, a.shape[1]), x, names[0], f" (out={out_f}, r)")
    check_factor(b, (a.shape[1], in_f), x, names[1], f" (r={a.shape[1]}, in={in_f})")


def check_pica_args(x, weight, bias, basis, m, side) -> None:
    """Every argument of :func:`pica_linear`, once; errors name the argument (``basis``, ``m``, not a factor)."""
    reference.check_side(side)
    check_matrix(weight, "weight")
    out_f, in_f = weight.shape
    check_x(x, in_f)
    check_weight(weight, x)
    check_bias(bias, out_f, x)
    if basis.dim() != 2 or m.dim() != 2:
        raise ValueError(f"basis and m must be 2-D, got {tuple(basis.shape)} and {tuple(m.shape)}")
    rank = basis.shape[0] if side == "input" else basis.shape[1]
    check_factor(basis, reference.basis_shape(out_f, in_f, rank, side), x, "basis",
                        f" for side={side!r} and weight {tuple(weight.shape)}")
    check_factor(m, reference.m_shape(out_f, in_f, rank, side), x, "m",
                        f" for side={side!r}, rank {rank}, weight {tuple(weight.shape)}")
