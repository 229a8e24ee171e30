"""The eager CPU path: what the ops' entry points run on CPU tensors outside ``torch.compile`` (no custom op).

The same numbers as :mod:`pica_kernels.reference` up to rounding, written to cost no more than they must on
CPU at small T, where a custom-op round trip cost more than the math:

* an fp32 ``M`` with bf16/fp16 activations is cast to the activation dtype once per change of ``M``, not once
  per call (:func:`cast_factor`; the custom ops' reference branches use the same cached cast);
* only ``t`` is saved for the backward (never ``x`` unless ``B`` trains), gradients of the factors are
  accumulated in fp32, and many fp32 tokens go through ``W + A @ B`` (:func:`merged_pays`);
* the adapter term alone (:func:`lowrank_term`) for front ends that add it to a base layer's own output;
* multi-task inference without a gather of ``m_stack[ids]`` (:func:`grouped_inference`).

Autocast is handled as by every entry point of :mod:`pica_kernels.ops` (:mod:`.dispatch`, "autocast").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import reference
from .dispatch import autocast_off, follows_autocast
from .factor_cache import FactorCache

#: Casts of factors to the activation dtype, one per (factor, dtype), until the factor changes.
CAST_CACHE = FactorCache()


def cast_factor(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (any shape) in ``dtype``, detached; a copy is made once per change of ``v``, not once per call
    (:class:`~.factor_cache.FactorCache`: also after a fused optimizer step, which leaves the version alone)."""
    if v.dtype == dtype:
        return v
    return CAST_CACHE.get(v, ("cast", dtype), lambda s: s.to(dtype))


# The merged form: y = x @ (W + A @ B).T and dx = dy @ (W + A @ B), with W + A @ B rebuilt (never
# kept) in forward and backward. It replaces T*r*(2*out + in) multiply-adds of the factored form
# (the A term of y, s = dy @ A, the B term of dx: skinny GEMMs that are memory bound on CPU, a full
# pass over y each) by 2*out*in*r and two passes over W; t = x @ B.T is still computed (dA needs it),
# so the activations saved are the same. Only where rounding W + A @ B costs nothing the factored
# form would not lose anyway: fp32/fp64 with both factors in x's dtype (in bf16 a small A @ B would
# vanish into W's rounding). MERGE_MARGIN: the factored form's extra multiply-adds must be this many
# times the merged form's before merging pays for its passes over W. Measured (fp32, one thread,
# forward + backward / frozen, shared 2-core machine): the two forms tie where the ratio is ~2
# (576->1536 at T = 1024: 1.175 factored vs 1.185 merged, ratio 2.1; 576->192 at T = 512: 1.43 vs
# 1.47, ratio 2.2); merged wins from ~2.7 on (576->576, T = 1024: 1.24 vs 1.20; 576->192, T = 1024:
# 1.42 vs 1.33) and by 8% at T = 4096.
MERGE_DTYPES = (torch.float32, torch.float64)
MERGE_MARGIN = 2.5


def merged_pays(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, training: bool) -> bool:
    """True when :func:`lowrank_linear` should compute y (and dx) through ``W + A @ B`` (see above).

    x: (T, in); weight: (out, in); a: (out, r); b: (r, in). ``training``: a backward will follow.
    """
    if not (x.dtype == a.dtype == b.dtype and x.dtype in MERGE_DTYPES) or x.device.type != "cpu":
        return False
    rows = x.shape[0]
    out_f, in_f = weight.shape
    factored = rows * (2 * out_f + in_f if training else out_f + in_f)
    merged = (2 if training else 1) * out_f * in_f
    return factored >= MERGE_MARGIN * merged


def _merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W + A @ B`` (out, in): one addmm, a fresh tensor laid out like a contiguous W."""
    return torch.addmm(weight, a, b)


class _LowRankLinear(torch.autograd.Function):
    """Autograd of :func:`reference.lowrank_forward` (or its merged form) with a closed-form backward.

    Saves ``t`` (T, r) and the factors; ``x`` only when ``dB`` or ``dW`` is asked for, so PiCa's input
    side (``B = P`` frozen) keeps the frozen layer's activations plus ``T * r``. Outputs ``(y, t)``;
    ``t`` is not differentiable. ``merge``: compute y and dx through ``W + A @ B``
    (:func:`merged_pays`); dA and dB come from ``t`` and ``s = dy @ A`` either way.
    """

    @staticmethod
    def forward(x, weight, bias, a, b, merge):
        if not merge:
            return reference.lowrank_forward(x, weight, bias, a, b, cast_factor)
        w_eff = _merged_weight(weight, a, b)
        y = torch.addmm(bias, x, w_eff.T) if bias is not None else x @ w_eff.T
        return y, x @ b.T

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, a, b, merge = inputs
        _, t = output
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if (need_b or need_w) else None, t, weight, a, b)
        ctx.mark_non_differentiable(t)
        ctx.merge = merge

    @staticmethod
    def backward(ctx, dy, _dt):
        with autocast_off(dy):  # a backward run inside an autocast region: the dtypes above, not autocast's
            return _LowRankLinear._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, t, weight, a, b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        if ctx.merge:
            dx = dy @ _merged_weight(weight, a, b) if need_x else None
            da = reference.grad_a(dy, t, a) if need_a else None
            db = reference.grad_b(dy @ a, x, b) if need_b else None
        else:
            dx, da, db = reference.lowrank_backward(dy, x, t, weight, a, b, need_x, need_a, need_b, cast_factor)
        dw = (dy.T @ x).to(weight.dtype) if need_w else None  # not PiCa's case: W is frozen there
        dbias = dy.sum(0) if need_bias else None
        return dx, dw, dbias, da, db, None


@follows_autocast("x", "weight", "bias")
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
    ``r``-wide matrix, never of ``W``, and is reused while the factor is unchanged.
    Differentiable in every argument; gradients of ``a``/``b`` come back in
    their own dtype, accumulated in fp32.

    How it runs (the same numbers up to rounding): with factors in x's dtype
    and few tokens, plain autograd through :func:`reference.lowrank_forward` (its
    mm/addmm nodes save ``t``, and ``x`` only when ``B`` requires grad; the
    C++ engine costs less per call than a Python ``autograd.Function``);
    factors of another dtype through :class:`_LowRankLinear` (dA/dB in fp32);
    many fp32 tokens through the merged weight (:func:`merged_pays`).

    Inside ``torch.autocast``: x, weight and bias run in the region's dtype, as F.linear's would; the factors
    keep their dtype (an fp32 ``M`` gets an fp32 gradient, accumulated in fp32). See "autocast" above.
    Arguments are checked by the caller (:func:`pica_kernels.ops.lowrank_linear`).
    """
    # 2-D x as is: a reshape is a view node in the graph, traversed again in backward (T = 1: ~5% of a step).
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    args = (x2, weight, bias, a, b)
    training = torch.is_grad_enabled() and (
        x.requires_grad or a.requires_grad or b.requires_grad or weight.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    merge = merged_pays(x2, weight, a, b, training)
    if training and (merge or not x.dtype == a.dtype == b.dtype):
        y, _ = _LowRankLinear.apply(*args, merge)
    elif merge:  # no graph: only y
        w_eff = _merged_weight(weight, a, b)
        y = torch.addmm(bias, x2, w_eff.T) if bias is not None else x2 @ w_eff.T
    else:
        y, _ = reference.lowrank_forward(*args, cast_factor)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


class _LowRankTerm(torch.autograd.Function):
    """``(x @ B.T) @ A.T`` alone with factors of another dtype than x: dA and dB accumulated in fp32."""

    @staticmethod
    def forward(x, a, b):
        t = x @ cast_factor(b, x.dtype).T
        return t @ cast_factor(a, x.dtype).T, t

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, a, b = inputs
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, output[1], a, b)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dy, _dt):
        x, t, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad
        with autocast_off(dy):
            s = dy @ cast_factor(a, dy.dtype) if (need_x or need_b) else None
            dx = s @ cast_factor(b, dy.dtype) if need_x else None
            return dx, reference.grad_a(dy, t, a) if need_a else None, reference.grad_b(s, x, b) if need_b else None


@follows_autocast("x")
def lowrank_term(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The adapter term alone, ``(x @ B.T) @ A.T``: x (..., in), a (out, r), b (r, in) -> (..., out) in x.dtype.

    For front ends that add it to a base layer's own output (several active adapters, quantized bases).
    Factors of another dtype than x are cast like in :func:`lowrank_linear`, and their gradients are
    accumulated in fp32 (autograd through a bf16 cast would round dM to bf16). Inside ``torch.autocast``, x runs
    in the region's dtype (as in :func:`lowrank_linear`; the factors keep theirs).
    """
    if x.dtype == a.dtype == b.dtype:
        return (x @ b.T) @ a.T
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y, _ = _LowRankTerm.apply(x2, a, b)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], a.shape[0])


#: Fewest rows (tokens) per GEMM for which :func:`grouped_inference` adds each run of consecutive sequences of
#: one adapter with its own GEMM; below, one GEMM per adapter over its gathered rows. SmolLM2 up_proj (576 ->
#: 1536, r = 32), 64 sequences x 16 tokens, 64 adapters, one thread: 64 per-sequence ``addmm_`` added 2.0 ms,
#: per-adapter gather + ``index_add_`` 3.1 ms, the reference's gather + batched GEMM 3.4 ms.
MIN_ROWS_PER_RUN = 16


def grouped_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    basis: torch.Tensor,
    m_stack: torch.Tensor | Sequence[torch.Tensor],
    adapter_ids: torch.Tensor,
) -> torch.Tensor:
    """:func:`reference.multitask_forward`'s ``y`` without a graph (shapes in :mod:`pica_kernels.ops.multitask`;
    arguments checked by the caller): ``y = x @ W.T + b`` and ``t = x @ P.T`` once for all sequences, then
    ``y[rows] += t[rows] @ M_a.T`` per adapter ``a`` in place, with no copy of ``m_stack[ids]``.

    ``rows``: each run of consecutive sequences with one adapter (an ``addmm_`` into a view of ``y``; one
    adapter for the whole batch is one GEMM over every token) where runs have at least
    :data:`MIN_ROWS_PER_RUN` tokens on average or each adapter's sequences are one run; otherwise (short
    sequences, adapters interleaved: decoding) all sequences of the adapter, gathered from ``t`` and added
    with ``index_add_`` -- one GEMM per adapter."""
    y = torch.nn.functional.linear(x, weight, bias)  # (B, S, out), contiguous
    nseq, seq_len, out_f = y.shape
    if nseq == 0 or seq_len == 0:
        return y
    rank = basis.shape[0]
    t = x @ cast_factor(basis, x.dtype).T  # (B, S, r): the shrink, once for every adapter
    ids = adapter_ids.tolist()
    runs, start = [], 0  # (adapter, first sequence, end)
    for i in range(1, nseq + 1):
        if i == nseq or ids[i] != ids[start]:
            runs.append((ids[start], start, i))
            start = i
    used = dict.fromkeys(ids)
    if len(runs) == len(used) or len(runs) * MIN_ROWS_PER_RUN <= nseq * seq_len:
        for a, lo, hi in runs:
            y[lo:hi].view(-1, out_f).addmm_(t[lo:hi].reshape(-1, rank), m_stack[a].to(x.dtype).T)
        return y
    for a in used:
        rows = torch.tensor([i for i, k in enumerate(ids) if k == a], device=x.device)
        y.index_add_(0, rows, t[rows] @ m_stack[a].to(x.dtype).T)
    return y
