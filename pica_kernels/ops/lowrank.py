"""``lowrank_linear``: ``y = x @ W.T + (x @ B.T) @ A.T + bias`` -- the backend entry point.

This is the op every adapter of this family runs on:

============  ==========================  ==========================
method        A (out, r)                  B (r, in)
============  ==========================  ==========================
PiCa input    M, trainable                P = Vh[:r], frozen basis
PiCa output   U_r = U[:, :r], frozen      M, trainable
LoRA          lora_B.weight, trainable    lora_A.weight, trainable
============  ==========================  ==========================

The entry point checks its arguments (:mod:`.checks`) and dispatches to the custom op
(:mod:`.custom_ops`: autograd, backend choice); the Triton kernels and their
launchers live in :mod:`.kernels`.
"""

from __future__ import annotations

import torch

from .. import reference
from . import (
    checks,
    custom_ops,  # noqa: F401  (registers torch.ops.pica_kernels.lowrank_linear)
)
from .backend import eager_reference
from .kernels.padding import RANK_ALIGN


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

    Inside ``torch.autocast`` it follows autocast as ``nn.Linear`` does: x, weight and bias run in the
    region's dtype (bf16/fp16) and y comes back in it; ``a``/``b`` keep their dtype and their gradients are
    accumulated in fp32 (:mod:`pica_kernels.reference`, "autocast").
    """
    amp = reference.autocast_dtype(x)
    if amp is not None:  # cast here, not by the custom op: see docs/design.md, "Mixed precision (autocast)"
        x, weight, bias = reference.autocast_operand((x, weight, bias), amp)
        with torch.autocast(x.device.type, enabled=False):
            return lowrank_linear(x, weight, bias, a, b, backend=backend)
    checks.check_lowrank_args(x, weight, bias, a, b)
    return run_lowrank(x, weight, bias, a, b, backend)


def run_lowrank(x, weight, bias, a, b, backend: str) -> torch.Tensor:
    """:func:`lowrank_linear` on arguments its caller has checked (each argument is checked once per call) and
    cast for autocast (autocast is off here)."""
    if eager_reference(backend, x):  # eager CPU: the reference's own autograd, no custom-op round trip
        return reference.lowrank_linear(x, weight, bias, a, b)
    lead = x.shape[:-1]
    # rank_align passed explicitly: a compiled graph then records the layout of the saved t.
    y, _ = torch.ops.pica_kernels.lowrank_linear(x.reshape(-1, x.shape[-1]), weight, bias, a, b, backend,
                                                 RANK_ALIGN)
    return y.reshape(*lead, weight.shape[0])
