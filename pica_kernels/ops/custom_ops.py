"""``torch.library`` custom ops and autograd of :func:`pica_kernels.ops.lowrank_linear`.

``pica_kernels::lowrank_linear`` (forward, returns ``y`` and the saved
activation ``t = x @ B.T``) and ``pica_kernels::lowrank_linear_backward``,
each with a fake kernel, and the autograd formula tying them together, so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work. Which
implementation runs inside (Triton launches or the reference math) is decided
at run time by :func:`pica_kernels.ops.backend.resolve_backend`; a launch that
fails to compile or runs out of resources on the user's GPU falls back to the
reference branch (warned once per shape class, see
:mod:`pica_kernels.ops.kernels.launchers`; ``PICA_KERNELS_STRICT=1`` raises).

Which factors are trainable is chosen by ``requires_grad``: the backward
computes only the gradients autograd asks for, and saves ``x`` only when a
gradient needs it (``dB`` or ``dW``). With ``B`` frozen (PiCa input side) the
only activation saved besides what the frozen layer needs is ``t``, (T, r).
"""

from __future__ import annotations

import torch

from .. import reference
from .backend import resolve_backend
from .kernels import launchers, padding


def reference_forward(x, weight, bias, a, b):
    """Same contract as :func:`launchers.triton_forward`; the math of :func:`pica_kernels.reference.lowrank_linear`.

    Autocast off: the op computes in its inputs' dtypes whatever region calls it (its fake kernel promises
    x.dtype; the entry points cast for autocast before the op, see :mod:`pica_kernels.reference`)."""
    with reference.autocast_off(x):
        return reference.lowrank_forward(x, weight, bias, a, b)


def reference_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db):
    """Same contract as :func:`launchers.triton_backward`: the gradients of the reference math, with dA
    and dB accumulated in (at least) fp32 like the kernels -- several layers may share M, and a bf16
    ``dy.T @ t`` is off by ~2e-3 relative -- and returned in a's / b's own dtype (the math lives once,
    in :func:`pica_kernels.reference.lowrank_backward`)."""
    with reference.autocast_off(dy):  # a backward inside an autocast region: the dtypes given, as the forward
        return reference.lowrank_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db)


@torch.library.custom_op("pica_kernels::lowrank_linear", mutates_args=())
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
    launches run that padded rank (:mod:`.kernels.padding`). :func:`~.lowrank.lowrank_linear` passes
    ``rank_align=16`` (the JIT's divisibility hint); the default 1 pads nothing (the layout before padding
    existed). The layout is an argument, and not the default, so that a compiled graph's code records it:
    ``torch.compile`` caches graphs by their code (which omits arguments equal to their default), not by
    what a fake kernel returns.
    """
    reference.check_ranks(a, b)  # the op is callable directly (torch.ops), past the entry points' checks
    if resolve_backend(backend, x.device, x.dtype) == "triton":
        try:
            return launchers.triton_forward(x, weight, bias, a, b, rank_align=rank_align)
        except launchers.KernelFallback:
            pass  # this shape class failed to compile or launch (warned once): the reference runs it
    y, t = reference_forward(x, weight, bias, a, b)
    # t laid out as the kernels lay it out, whichever branch ran: the fake kernel below promises one
    # layout, whatever the backend (a compiled graph is reused across backend choices).
    return y, padding.pad_cols_like_kernel(t, rank_align)


def fake_t(x: torch.Tensor, rows: int, rank: int, rank_align: int) -> torch.Tensor:
    """The saved ``t`` (rows, rank) as the op returns it: the (rows, rank) view of a (rows, padded_rank(rank))
    buffer (:mod:`.kernels.padding`; contiguous when the rank is a multiple of ``rank_align``)."""
    return x.new_empty(rows, padding.padded_rank(rank, rank_align))[:, :rank]


@lowrank_linear_op.register_fake
def _(x, weight, bias, a, b, backend, rank_align=1):
    return x.new_empty(x.shape[0], weight.shape[0]), fake_t(x, x.shape[0], a.shape[1], rank_align)


@torch.library.custom_op("pica_kernels::lowrank_linear_backward", mutates_args=())
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
    grads = None
    if resolve_backend(backend, dy.device, dy.dtype) == "triton":
        try:
            grads = launchers.triton_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db)
        except launchers.KernelFallback:
            pass  # this shape class failed to compile or launch (warned once): the reference runs it
    if grads is None:
        grads = reference_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db)
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
        dx, da, db = torch.ops.pica_kernels.lowrank_linear_backward(
            dy, x, t, weight, a, b, need_x, need_a, need_b, ctx.backend
        )
        dx, da, db = (g if n else None for g, n in ((dx, need_x), (da, need_a), (db, need_b)))
    with reference.autocast_off(dy):
        if need_w:  # not PiCa's case (W frozen); kept so the op is a complete linear layer
            dw = (dy.T @ x).to(weight.dtype)
        if need_bias:
            dbias = dy.sum(0)
    return (dx, dw, dbias, da, db, None) + (None,) * (ctx.num_inputs - 6)  # (rank_align, when given)


lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)
