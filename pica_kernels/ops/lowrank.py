"""``lowrank_linear``: ``y = x @ W.T + (x @ B.T) @ A.T + bias`` -- the backend entry point.

This is the op every adapter of this family runs on:

============  ==========================  ==========================
method        A (out, r)                  B (r, in)
============  ==========================  ==========================
PiCa input    M, trainable                P = Vh[:r], frozen basis
PiCa output   U_r = U[:, :r], frozen      M, trainable
LoRA          lora_B.weight, trainable    lora_A.weight, trainable
============  ==========================  ==========================

The entry point checks its arguments and dispatches to the custom op
(:mod:`.custom_ops`: autograd, backend choice); the Triton kernels and their
launchers live in :mod:`.kernels`.
"""

from __future__ import annotations

import torch

from .. import reference
from . import custom_ops  # noqa: F401  (registers torch.ops.pica_kernels.lowrank_linear)
from .backend import eager_reference
from .kernels.padding import RANK_ALIGN


def check_lowrank_args(x, weight, bias, a, b) -> None:
    """Raise a ValueError/TypeError naming the argument for any shape, device or dtype mismatch."""
    if weight.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"weight, a, b must be 2-D, got {tuple(weight.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x must be (..., in={in_f}), got shape {tuple(x.shape)}")
    if a.shape[0] != out_f or b.shape[1] != in_f or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"need a (out={out_f}, r), b (r, in={in_f}) with the same r, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must be ({out_f},), got {tuple(bias.shape)}")
    for name, v in (("weight", weight), ("a", a), ("b", b), ("bias", bias)):
        if v is not None and v.device != x.device:
            raise ValueError(f"{name} is on {v.device} but x is on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}; cast one of them")


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x @ W.T + (x @ B.T) @ A.T + bias``, differentiable in whatever requires grad.

    x: (..., in); weight: (out, in), same dtype as x; bias: (out,) or None;
    a: (out, r); b: (r, in), any floating dtype (cast to x.dtype on the fly).
    backend: "auto" | "reference" | "triton" (rule in :mod:`pica_kernels.ops.backend`).
    Returns (..., out) in x.dtype.

    This is the entry point for other libraries: PiCa passes ``(a, b) = (M, P)``
    or ``(U_r, M)``; LoRA passes ``(lora_B.weight * scaling, lora_A.weight)``
    with both requiring grad.
    """
    check_lowrank_args(x, weight, bias, a, b)
    if eager_reference(backend, x):  # eager CPU: the reference's own autograd, no custom-op round trip
        return reference.lowrank_linear(x, weight, bias, a, b)
    lead = x.shape[:-1]
    # rank_align passed explicitly: a compiled graph then records the layout of the saved t.
    y, _ = torch.ops.pica_kernels.lowrank_linear(x.reshape(-1, x.shape[-1]), weight, bias, a, b, backend,
                                                 RANK_ALIGN)
    return y.reshape(*lead, weight.shape[0])
