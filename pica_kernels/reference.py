"""Pure-PyTorch math of every PiCa op: the specification.

Every fast path (Triton kernels, fused launches) is tested against these
functions. They are also the CPU path: eager CPU calls of
:func:`pica_kernels.ops.pica_linear` / :func:`pica_kernels.ops.lowrank_linear`
come straight here (no custom op), so the math is written to cost no more
than it must: the low-rank term is added in place (``addmm_``), only ``t``
is saved for the backward (never ``x`` unless ``B`` trains), an fp32 ``M``
is cast to the activation dtype once per change, gradients of the factors
are accumulated in fp32, and many fp32 tokens go through ``W + A @ B``.

Conventions (PyTorch)::

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

import contextlib

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

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


# ----------------------------------------------------------------- factor casts
# An fp32 ``M`` with bf16/fp16 activations is cast to the activation dtype for the GEMMs. The cast copy is
# kept per factor and reused while the factor is unchanged: its version counter (bumped by every in-place
# write: ``copy_`` under no_grad, most optimizer steps), storage and dtype must all match. Two writers leave
# the version counter alone: torch's fused optimizers (``AdamW(fused=True)``, transformers.Trainer's default
# ``adamw_torch_fused``: measured, torch 2.13, the version stays 0 across steps) -- every ``torch.optim``
# step therefore drops the casts of the parameters it stepped (:func:`_forget_stepped`, a global
# step hook) -- and a write through ``.data`` (it bypasses autograd's own checks too): call
# :func:`clear_cast_cache` after one.
_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def clear_cast_cache() -> None:
    """Forget every cached factor cast (only needed after writing a factor through ``.data``)."""
    _CASTS.clear()


def _forget_stepped(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any ``torch.optim`` step: drop the cached casts of the parameters it stepped (a fused step
    rewrites them without bumping their version counters, so the cache key cannot see it)."""
    if len(_CASTS) == 0:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            _CASTS.pop(p, None)


register_optimizer_step_post_hook(_forget_stepped)


def cast_factor(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (any shape) in ``dtype``, detached; a copy is made once per change of ``v``, not once per call."""
    if v.dtype == dtype:
        return v
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        # Compiled graphs fuse the cast; an inference tensor may not enter a later autograd graph.
        return v.detach().to(dtype)
    key = (v._version, v.data_ptr(), v.device, dtype)
    hit = _CASTS.get(v)
    if hit is not None and hit[0] == key:
        return hit[1]
    cast = v.detach().to(dtype)
    _CASTS[v] = (key, cast)
    return cast


# ------------------------------------------------------------------- autocast
# PiCa follows autocast as nn.Linear does. Inside ``torch.autocast(device, dtype)`` the operands autocast would
# cast for F.linear -- x, the frozen weight and the bias, where floating point and not float64 -- run in the
# region's dtype (bf16 or fp16); the output is in that dtype. The factors are NOT cast by autocast: an fp32 ``M``
# (and basis) stays fp32, is cast for the GEMMs by :func:`cast_factor` (once per change), and ``dM`` is
# accumulated in fp32 and returned fp32 -- autocast's own cast of M would put a cast node in the graph and round
# dM to bf16. The math then runs with autocast off: every GEMM below is written for the dtypes it is handed
# (``_mm_fp32`` would otherwise be cast back to bf16, and ``addmm_`` into a bf16 output refuses an fp32 operand).
# The public entry points (these functions and pica_kernels.ops) do the cast; the custom ops run in their
# inputs' dtypes with autocast off inside, like the functions here that take no such cast.


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype of the autocast region enabled for ``x``'s device type, or None outside one (or for a
    device type autocast does not know, e.g. meta)."""
    # One C call answers the common case (no region anywhere) before the per-device queries: the entry points
    # and the layers ask on every call.
    if not torch._C._is_any_autocast_enabled() or not isinstance(x, torch.Tensor):
        return None
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def autocast_operand(v, dtype: torch.dtype | None):
    """``v`` as autocast hands an operand of F.linear to the GEMM in a ``dtype`` region: a floating-point
    tensor other than float64 cast to ``dtype``; anything else (None, float64, integers, a non-tensor that the
    argument checks will refuse) unchanged. A list or tuple is cast item by item (grouped weights)."""
    if isinstance(v, (list, tuple)):
        return type(v)(autocast_operand(item, dtype) for item in v)
    if dtype is None or not isinstance(v, torch.Tensor) or not v.is_floating_point() \
            or v.dtype in (dtype, torch.float64):
        return v
    return v.to(dtype)


def compute_dtype(v: torch.Tensor) -> torch.dtype:
    """The dtype ``v`` (x or a frozen weight) takes in a linear layer's GEMM under the current autocast state."""
    amp = autocast_dtype(v)
    return amp if amp is not None and v.is_floating_point() and v.dtype != torch.float64 else v.dtype


def autocast_off(x: torch.Tensor):
    """A context with autocast off for ``x``'s device type (a no-op context where it is off already)."""
    if autocast_dtype(x) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def _mm_fp32(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``p @ q`` accumulated AND returned in fp32 (fp64 for fp64): a gradient of an fp32 parameter
    (``dM = dy.T @ t``, a reduction over every token) must not be rounded to bf16/fp16 on the way
    (rounding alone put it ~2e-3 relative from float64; CPU has no mm with an fp32 out dtype)."""
    if p.dtype in (torch.float16, torch.bfloat16):
        return p.float() @ q.float()
    return p @ q


# ------------------------------------------------------------------ generic op
def check_ranks(a: torch.Tensor, b: torch.Tensor) -> None:
    """``a`` (out, r) and ``b`` (r, in) share their rank: a ValueError naming both otherwise (the kernels pad the
    rank and would read past the narrower factor; the GEMMs here would fail with a bare shape error)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a (out, r) and b (r, in) must share the rank r: a has shape {tuple(a.shape)}, "
                         f"b has shape {tuple(b.shape)}")


def lowrank_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of :func:`lowrank_linear` on 2-D ``x`` (T, in): returns ``(y (T, out), t = x @ B.T (T, r))``.

    ``t`` is rounded to ``x.dtype`` (it is what the backward saves). The low-rank term is accumulated
    into ``y`` in place (``addmm_``, beta = 1): no second pass over ``y`` and no (T, out) temporary.
    """
    t = x @ cast_factor(b, x.dtype).T
    return lowrank_expand(x, weight, bias, a, t), t


def lowrank_expand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """``y = x @ W.T + t @ A.T + bias`` (T, out) for a shrink ``t = x @ B.T`` (T, r) computed already (alone, or one
    column slice of a grouped shrink); the low-rank term accumulated into ``y`` in place."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    y.addmm_(t, cast_factor(a, x.dtype).T)
    return y


def rank_slices(ranks: list[int]):
    off = 0
    for r in ranks:
        yield off, off + r
        off += r


def grouped_lowrank_forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    a: list[torch.Tensor],
    b_cat: torch.Tensor,
    ranks: list[int],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Projections sharing ``x`` (T, in): ``t = x @ B_cat.T`` (T, Σr) once, then ``y_i = x @ W_i.T + t_i @ A_i.T + b_i``
    with ``t_i`` the columns of projection i. Returns ``([y_i (T, out_i)], t)``; the same numbers as
    :func:`lowrank_forward` per projection."""
    t = x @ cast_factor(b_cat, x.dtype).T
    ys = [lowrank_expand(x, w, bias, ai, t[:, lo:hi]) for (lo, hi), w, bias, ai in zip(rank_slices(ranks), weights, biases, a)]
    return ys, t


# ------------------------------------------------------------- multi-task batch
def multitask_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    m_stack: torch.Tensor,
    basis: torch.Tensor,
    adapter_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-side PiCa with one adapter per sequence: x (B, S, in), basis P (r, in) shared, m_stack (n, out, r),
    adapter_ids (B,). Sequence i runs ``x_i @ W.T + (x_i @ P.T) @ m_stack[ids[i]].T + b``.
    Returns ``(y (B, S, out), t = x @ P.T (B, S, r))``. Differentiable (plain autograd) in x, m_stack and bias."""
    t = x @ basis.to(x.dtype).T
    low = torch.bmm(t, m_stack.to(x.dtype)[adapter_ids].transpose(1, 2))
    return torch.nn.functional.linear(x, weight, bias) + low, t


def multitask_backward(
    dy: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    m_stack: torch.Tensor,
    basis: torch.Tensor,
    adapter_ids: torch.Tensor,
    need_x: bool,
    need_bias: bool,
    need_m: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form backward of :func:`multitask_forward` (W and P frozen): ``(dx, dbias, dm_stack)``, None where not
    asked for. ``dM`` of each adapter sums its sequences' ``dy_i.T @ t_i`` in fp32 through a one-hot matmul
    (deterministic, no scatter-add), returned in m_stack's dtype."""
    dx = dbias = dm = None
    if need_x:
        s = torch.bmm(dy, m_stack.to(dy.dtype)[adapter_ids])  # (B, S, r)
        dx = dy @ weight + s @ basis.to(dy.dtype)
    if need_m:
        per_seq = torch.bmm(dy.transpose(1, 2).float(), t.float())  # (B, out, r), fp32
        onehot = torch.nn.functional.one_hot(adapter_ids.long(), m_stack.shape[0]).to(per_seq.dtype)  # (B, n)
        dm = (onehot.T @ per_seq.flatten(1)).view(m_stack.shape).to(m_stack.dtype)
    if need_bias:
        dbias = dy.sum((0, 1))
    return dx, dbias, dm


def lowrank_backward(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    t: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form backward of :func:`lowrank_forward` for ``x``, ``A`` and ``B``.

    dy (T, out); x (T, in), needed only for ``dB``; t (T, r). Returns ``(dx (T, in) in dy.dtype,
    dA (out, r) in a.dtype, dB (r, in) in b.dtype)``, None where not asked for:
    ``s = dy @ A``; ``dx = dy @ W + s @ B`` (the second term added in place); ``dA = dy.T @ t`` and
    ``dB = s.T @ x`` accumulated in fp32 whatever the activation dtype.
    """
    dt = dy.dtype
    s = dy @ cast_factor(a, dt) if (need_dx or need_db) else None
    dx = None
    if need_dx:
        dx = dy @ weight
        dx.addmm_(s, cast_factor(b, dt))
    return dx, _grad_a(dy, t, a) if need_da else None, _grad_b(s, x, b) if need_db else None


def _grad_a(dy: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``dA = dy.T @ t`` (out, r) in fp32, returned in a.dtype. Computed as ``(t.T @ dy).T``: the same
    numbers, and with a (r, out) result MKL ran it in 5.0 ms against 7.2 ms for ``dy.T @ t``
    (T = 4096, out = 1536, r = 32, one thread). Made contiguous like ``a`` (an (out, r) copy): custom
    ops promise contiguous outputs, and ``.grad`` would be re-laid out anyway."""
    return _mm_fp32(t.T, dy).T.to(a.dtype).contiguous()


def _grad_b(s: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dB = s.T @ x`` (r, in) in fp32, returned in b.dtype."""
    return _mm_fp32(s.T, x).to(b.dtype)


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
    """Autograd of :func:`lowrank_forward` (or its merged form) with a closed-form backward.

    Saves ``t`` (T, r) and the factors; ``x`` only when ``dB`` or ``dW`` is asked for, so PiCa's input
    side (``B = P`` frozen) keeps the frozen layer's activations plus ``T * r``. Outputs ``(y, t)``;
    ``t`` is not differentiable. ``merge``: compute y and dx through ``W + A @ B``
    (:func:`merged_pays`); dA and dB come from ``t`` and ``s = dy @ A`` either way.
    """

    @staticmethod
    def forward(x, weight, bias, a, b, merge):
        if not merge:
            return lowrank_forward(x, weight, bias, a, b)
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
            da = _grad_a(dy, t, a) if need_a else None
            db = _grad_b(dy @ a, x, b) if need_b else None
        else:
            dx, da, db = lowrank_backward(dy, x, t, weight, a, b, need_x, need_a, need_b)
        dw = (dy.T @ x).to(weight.dtype) if need_w else None  # not PiCa's case: W is frozen there
        dbias = dy.sum(0) if need_bias else None
        return dx, dw, dbias, da, db, None


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
    and few tokens, plain autograd through :func:`lowrank_forward` (its
    mm/addmm nodes save ``t``, and ``x`` only when ``B`` requires grad; the
    C++ engine costs less per call than a Python ``autograd.Function``);
    factors of another dtype through :class:`_LowRankLinear` (dA/dB in fp32);
    many fp32 tokens through the merged weight (:func:`merged_pays`).

    Inside ``torch.autocast``: x, weight and bias run in the region's dtype, as F.linear's would; the factors
    keep their dtype (an fp32 ``M`` gets an fp32 gradient, accumulated in fp32). See "autocast" above.
    """
    check_ranks(a, b)
    amp = autocast_dtype(x)
    if amp is not None:
        x, weight, bias = autocast_operand((x, weight, bias), amp)
        with torch.autocast(x.device.type, enabled=False):
            return lowrank_linear(x, weight, bias, a, b)
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
        y, _ = lowrank_forward(*args)
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
            return dx, _grad_a(dy, t, a) if need_a else None, _grad_b(s, x, b) if need_b else None


def lowrank_term(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The adapter term alone, ``(x @ B.T) @ A.T``: x (..., in), a (out, r), b (r, in) -> (..., out) in x.dtype.

    For front ends that add it to a base layer's own output (several active adapters, quantized bases).
    Factors of another dtype than x are cast like in :func:`lowrank_linear`, and their gradients are
    accumulated in fp32 (autograd through a bf16 cast would round dM to bf16). Inside ``torch.autocast``, x runs
    in the region's dtype (as in :func:`lowrank_linear`; the factors keep theirs).
    """
    amp = autocast_dtype(x)
    if amp is not None:
        x = autocast_operand(x, amp)
        with torch.autocast(x.device.type, enabled=False):
            return lowrank_term(x, a, b)
    if x.dtype == a.dtype == b.dtype:
        return (x @ b.T) @ a.T
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y, _ = _LowRankTerm.apply(x2, a, b)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], a.shape[0])


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
