"""``lowrank_linear``: ``y = x @ W.T + (x @ B.T) @ A.T + bias`` -- the backend entry point -- and ``pica_linear``.

This is the op every adapter of this family runs on:

============  ==========================  ==========================
method        A (out, r)                  B (r, in)
============  ==========================  ==========================
PiCa input    M, trainable                P = Vh[:r], frozen basis
PiCa output   U_r = U[:, :r], frozen      M, trainable
LoRA          lora_B.weight, trainable    lora_A.weight, trainable
============  ==========================  ==========================

The entry points check their arguments once (:mod:`.checks`; ``pica_linear`` names ``basis`` and ``m``, not
a factor) and dispatch (:mod:`.dispatch`): eager CPU calls run :mod:`.eager`; everything else runs the custom
ops ``pica::lowrank_linear`` (forward, returns ``y`` and the saved activation ``t = x @ B.T``) and
``pica::lowrank_linear_backward``, each with a fake kernel, tied together by the autograd formula below, so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work. Inside them the Triton launches
(:mod:`.kernels.launchers`) or the reference math run, decided at run time (:func:`.dispatch.run_op`).

Which factors are trainable is chosen by ``requires_grad``: the backward computes only the gradients autograd
asks for, and saves ``x`` only when a gradient needs it (``dB`` or ``dW``). With ``B`` frozen (PiCa input
side) the only activation saved besides what the frozen layer needs is ``t``, (T, r).
"""

from __future__ import annotations

import torch

from .. import reference
from . import checks, eager
from .dispatch import autocast_off, follows_autocast, run_op, use_eager
from .kernels import launchers, padding


# ------------------------------------------------------------------- custom ops
def reference_forward(x, weight, bias, a, b):
    """Same contract as :func:`launchers.triton_forward`: (y (T, out), t (T, r)), the reference math with the
    eager path's cached factor casts."""
    return reference.lowrank_forward(x, weight, bias, a, b, eager.cast_factor)


def reference_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db):
    """Same contract as :func:`launchers.triton_backward`: dA and dB accumulated in (at least) fp32 like the
    kernels -- several layers may share M, and a bf16 ``dy.T @ t`` is off by ~2e-3 relative -- and returned
    in a's / b's own dtype."""
    return reference.lowrank_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db, eager.cast_factor)


@torch.library.custom_op("pica::lowrank_linear", mutates_args=())
def lowrank_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    backend: str,
    rank_align: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, in) -> (y (T, out), t = x @ B.T (T, r)), both in x.dtype. ``t`` is saved for backward.

    ``t`` is the (T, r) view of a (T, padded_rank(r, rank_align)) buffer, whichever branch runs; the Triton
    launches run that padded rank (:mod:`.kernels.padding`). :func:`lowrank_linear` passes ``rank_align=16``
    (the JIT's divisibility hint); the default 1 pads nothing. The layout is an argument, and not the
    default, so that a compiled graph's code records it: ``torch.compile`` caches graphs by their code
    (which omits arguments equal to their default), not by what a fake kernel returns.
    """
    reference.check_ranks(a, b)  # the op is callable directly (torch.ops), past the entry points' checks
    return run_op(backend, x,
                  lambda: launchers.triton_forward(x, weight, bias, a, b, rank_align=rank_align),
                  lambda: reference_forward(x, weight, bias, a, b),
                  lambda out: (out[0], padding.pad_cols_like_kernel(out[1], rank_align)))


@lowrank_linear_op.register_fake
def _(x, weight, bias, a, b, backend, rank_align=1):
    t = x.new_empty(x.shape[0], padding.padded_rank(a.shape[1], rank_align))[:, :a.shape[1]]
    return x.new_empty(x.shape[0], weight.shape[0]), t


@torch.library.custom_op("pica::lowrank_linear_backward", mutates_args=())
def lowrank_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    t: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx (T, in), dA (out, r), dB (r, in)); a gradient not asked for is an empty (0,) tensor.

    ``t`` is (T, r), any strides (the forward's is a view of a wider, padded buffer on the Triton path).
    """
    reference.check_ranks(a, b)
    grads = run_op(backend, dy,
                   lambda: launchers.triton_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db),
                   lambda: reference_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db))
    like = (dy, a, b)
    return tuple(g if g is not None else like[i].new_empty(0) for i, g in enumerate(grads))


@lowrank_linear_backward_op.register_fake
def _(dy, x, t, weight, a, b, need_dx, need_da, need_db, backend):
    return (
        dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(0),
        a.new_empty(a.shape) if need_da else a.new_empty(0),
        b.new_empty(b.shape) if need_db else b.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, a, b, backend = inputs[:6]
    # Gradients go to the arguments the dispatcher kept: it drops rank_align when it equals its default.
    ctx.num_inputs = 6 + (inputs[6] != 1)
    _, t = output
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    # x is kept only when a gradient needs it: with B frozen (PiCa input side)
    # the saved activation is t alone, (T, r).
    ctx.save_for_backward(x if (need_b or need_w) else None, t, weight, a, b)
    ctx.flags = (need_x, need_w, need_bias, need_a, need_b)
    ctx.backend = backend
    ctx.mark_non_differentiable(t)


def _backward(ctx, dy, _dt):
    x, t, weight, a, b = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.flags
    dx = da = db = dw = dbias = None
    if need_x or need_a or need_b:
        dx, da, db = torch.ops.pica.lowrank_linear_backward(dy, x, t, weight, a, b, need_x, need_a, need_b,
                                                            ctx.backend)
        dx, da, db = (g if n else None for g, n in ((dx, need_x), (da, need_a), (db, need_b)))
    with autocast_off(dy):
        if need_w:  # not PiCa's case (W frozen); kept so the op is a complete linear layer
            dw = (dy.T @ x).to(weight.dtype)
        if need_bias:
            dbias = dy.sum(0)
    return (dx, dw, dbias, da, db, None) + (None,) * (ctx.num_inputs - 6)  # (rank_align, when given)


lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------- entry points
@follows_autocast("x", "weight", "bias")
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
    accumulated in fp32 (:mod:`.dispatch`, "autocast"; docs/design.md, "Mixed precision (autocast)").
    """
    checks.check_lowrank_args(x, weight, bias, a, b)
    return run_lowrank(x, weight, bias, a, b, backend)


@follows_autocast("x", "weight", "bias")
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
    """PiCa forward: :func:`lowrank_linear` with ``(A, B) = (M, P)`` on the input side, ``(U_r, M)`` on the
    output side.

    x: (..., in); weight: (out, in); bias: (out,) or None;
    side="input": basis (r, in), m (out, r); side="output": basis (out, r), m (r, in).
    backend: "auto" | "reference" | "triton" (see :mod:`pica_kernels.ops.backend`).
    Returns (..., out) in x.dtype. Differentiable in x and m (and weight/basis
    if they require grad). Saved for backward: ``t = x @ P.T`` (T, r) on the
    input side, ``x`` on the output side (``dM`` needs it there).

    Inside ``torch.autocast``: x, weight and bias in the region's dtype, ``basis`` and ``m`` in their own
    (as :func:`lowrank_linear`); ``m``'s gradient comes back in m's dtype, accumulated in fp32.
    """
    checks.check_pica_args(x, weight, bias, basis, m, side)
    a, b = reference.lowrank_factors(basis, m, side)
    return run_lowrank(x, weight, bias, a, b, backend)


def run_lowrank(x, weight, bias, a, b, backend: str) -> torch.Tensor:
    """:func:`lowrank_linear` on arguments its caller has checked (each argument is checked once per call) and
    cast for autocast (autocast is off here)."""
    if use_eager(backend, x):  # eager CPU: the eager path's own autograd, no custom-op round trip
        return eager.lowrank_linear(x, weight, bias, a, b)
    lead = x.shape[:-1]
    # rank_align passed explicitly: a compiled graph then records the layout of the saved t.
    y, _ = torch.ops.pica.lowrank_linear(x.reshape(-1, x.shape[-1]), weight, bias, a, b, backend,
                                         padding.RANK_ALIGN)
    return y.reshape(*lead, weight.shape[0])
