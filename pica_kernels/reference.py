"""Pure-PyTorch math of every PiCa op: the specification.

Every implementation (the Triton kernels, the eager CPU path of :mod:`pica_kernels.ops.eager`) is tested
against these functions; the ops' custom ops run them where no kernel runs. Plain torch: no caches, no
autograd.Function, no autocast handling (the ops' entry points cast for autocast before they get here).

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

Factors may be in another floating dtype than ``x`` (an fp32 ``M`` with bf16 activations): they are cast to
``x.dtype`` for the GEMMs by ``cast`` (default :func:`to_dtype`; the eager path passes its cached cast), and
the closed-form backward accumulates their gradients in fp32 (:func:`mm_fp32`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def to_dtype(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` in ``dtype`` (``v`` itself when it is in ``dtype`` already): the default ``cast`` below."""
    return v.to(dtype)


Cast = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


def mm_fp32(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
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
    cast: Cast = to_dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of :func:`lowrank_linear` on 2-D ``x`` (T, in): returns ``(y (T, out), t = x @ B.T (T, r))``.

    ``t`` is rounded to ``x.dtype`` (it is what the backward saves). The low-rank term is accumulated
    into ``y`` in place (``addmm_``, beta = 1): no second pass over ``y`` and no (T, out) temporary.
    """
    t = x @ cast(b, x.dtype).T
    return lowrank_expand(x, weight, bias, a, t, cast), t


def lowrank_expand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   t: torch.Tensor, cast: Cast = to_dtype) -> torch.Tensor:
    """``y = x @ W.T + t @ A.T + bias`` (T, out) for a shrink ``t = x @ B.T`` (T, r) computed already (alone, or one
    column slice of a grouped shrink); the low-rank term accumulated into ``y`` in place."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    y.addmm_(t, cast(a, x.dtype).T)
    return y


def rank_slices(ranks: list[int]):
    """(lo, hi) of each rank's rows in a concatenation of factors (``B_cat``: sum r_i rows)."""
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
    cast: Cast = to_dtype,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Projections sharing ``x`` (T, in): ``t = x @ B_cat.T`` (T, Σr) once, then ``y_i = x @ W_i.T + t_i @ A_i.T + b_i``
    with ``t_i`` the columns of projection i. Returns ``([y_i (T, out_i)], t)``; the same numbers as
    :func:`lowrank_forward` per projection."""
    t = x @ cast(b_cat, x.dtype).T
    ys = [lowrank_expand(x, w, bias, ai, t[:, lo:hi], cast)
          for (lo, hi), w, bias, ai in zip(rank_slices(ranks), weights, biases, a)]
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
    cast: Cast = to_dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form backward of :func:`lowrank_forward` for ``x``, ``A`` and ``B``.

    dy (T, out); x (T, in), needed only for ``dB``; t (T, r). Returns ``(dx (T, in) in dy.dtype,
    dA (out, r) in a.dtype, dB (r, in) in b.dtype)``, None where not asked for:
    ``s = dy @ A``; ``dx = dy @ W + s @ B`` (the second term added in place); ``dA = dy.T @ t`` and
    ``dB = s.T @ x`` accumulated in fp32 whatever the activation dtype.
    """
    dt = dy.dtype
    s = dy @ cast(a, dt) if (need_dx or need_db) else None
    dx = None
    if need_dx:
        dx = dy @ weight
        dx.addmm_(s, cast(b, dt))
    return dx, grad_a(dy, t, a) if need_da else None, grad_b(s, x, b) if need_db else None


def grad_a(dy: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``dA = dy.T @ t`` (out, r) in fp32, returned in a.dtype. Computed as ``(t.T @ dy).T``: the same
    numbers, and with a (r, out) result MKL ran it in 5.0 ms against 7.2 ms for ``dy.T @ t``
    (T = 4096, out = 1536, r = 32, one thread). Made contiguous like ``a`` (an (out, r) copy): custom
    ops promise contiguous outputs, and ``.grad`` would be re-laid out anyway."""
    return mm_fp32(t.T, dy).T.to(a.dtype).contiguous()


def grad_b(s: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dB = s.T @ x`` (r, in) in fp32, returned in b.dtype."""
    return mm_fp32(s.T, x).to(b.dtype)


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """Generic ``y = x @ W.T + (x @ B.T) @ A.T + bias``.

    x: (..., in); weight: (out, in); bias: (out,) or None; a: (out, r); b: (r, in).
    Returns (..., out) in ``x.dtype``; ``a``/``b`` are cast to ``x.dtype`` when they differ. Differentiable
    (plain autograd) in every argument.
    """
    check_ranks(a, b)
    y, _ = lowrank_forward(x.reshape(-1, x.shape[-1]), weight, bias, a, b)
    return y.reshape(*x.shape[:-1], weight.shape[0])


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
