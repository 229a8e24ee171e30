"""``grouped_lowrank_linear``: projections that share their input (q/k/v, gate/up), one shrink launch.

For n projections ``y_i = x @ W_i.T + (x @ B_i.T) @ A_i.T + bias_i`` of the
same ``x``, the shrinks of all of them run as ONE launch against the
concatenated bases ``B_cat = cat(B_i)`` (sum r_i, in): ``t = x @ B_cat.T``
(T, sum r_i), read ``x`` once. Each projection then runs its concatenated-K
GEMM ``[x | t_i] @ [W_i | A_i].T`` with ``t_i`` a strided column slice of ``t``
(no copy). Ranks that are not multiples of 16 run padded (:mod:`.kernels.padding`):
``B_cat`` with one zero-padded slot per projection (copied once per basis, cached),
``t`` in the same slots. n + 1 launches instead of 2n, and ``x`` is read n + 1 times
instead of 2n.

``B_cat`` is an argument, not built per call: PiCa's bases are frozen, so the
caller concatenates them once (e.g. at ``apply_pica`` time) and keeps it.

Shapes: x (T, in) (or (..., in)); weights[i] (out_i, in); biases[i] (out_i,)
or None; a[i] (out_i, r_i); b_cat (sum r_i, in); ranks = [r_i].
Returns [y_i (..., out_i)].
"""

from __future__ import annotations

import torch

from .. import reference
from . import checks, eager
from .dispatch import follows_autocast, run_op
from .kernels import launchers, padding


@torch.library.custom_op("pica::grouped_lowrank_linear", mutates_args=())
def _grouped_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    a: list[torch.Tensor],
    b_cat: torch.Tensor,
    ranks: list[int],
    backend: str,
    rank_align: int = 1,
) -> list[torch.Tensor]:
    """x (T, in) -> [y_i (T, out_i)] + [t] (t last, saved for backward): t is (T, sum padded_rank(r_i,
    rank_align)), each projection's r_i columns at the start of its slot (the kernels' layout, whichever
    branch ran; ``rank_align`` as in ``pica::lowrank_linear``)."""
    return run_op(backend, x,
                  lambda: launchers.triton_grouped_forward(x, weights, biases, a, b_cat, ranks, rank_align),
                  lambda: reference.grouped_lowrank_forward(x, weights, biases, a, b_cat, ranks, eager.cast_factor),
                  lambda out: [*out[0], padding.pad_slots_like_kernel(out[1], ranks, rank_align)])


@_grouped_op.register_fake
def _(x, weights, biases, a, b_cat, ranks, backend, rank_align=1):
    width = padding.slot_offsets(ranks, rank_align)[-1]
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights] + [x.new_empty(x.shape[0], width)]


def _setup_context(ctx, inputs, output):
    x, weights, biases, a, b_cat, ranks, backend = inputs[:7]
    # Gradients go to the arguments the dispatcher kept: it drops rank_align when it equals its default.
    ctx.num_inputs = 7 + (inputs[7] != 1)
    ctx.rank_align = inputs[7]
    # needs_input_grad is laid out over flattened list arguments; ask the tensors.
    need_x, need_b = x.requires_grad, b_cat.requires_grad
    ctx.save_for_backward(x if need_b else None, output[-1], b_cat, *weights, *a)
    ctx.n = len(weights)
    # torch.library flattens a list of optional tensors holding a None as ONE leaf (its gradient is
    # a single None), but a list of tensors only as one leaf per tensor (a list of n gradients).
    ctx.biases_are_one_leaf = any(bias is None for bias in biases)
    ctx.ranks = list(ranks)
    ctx.need_x, ctx.need_b = need_x, need_b
    ctx.need_a = any(ai.requires_grad for ai in a)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[-1])


def _backward(ctx, grads):
    x, t, b_cat, *rest = ctx.saved_tensors
    weights, a = rest[: ctx.n], rest[ctx.n :]
    dx = None
    da, db = [], []
    t_cols = padding.slot_slices(ctx.ranks, ctx.rank_align)
    for i, ((lo, hi), (b_lo, b_hi), dy) in enumerate(zip(t_cols, reference.rank_slices(ctx.ranks), grads[:-1])):
        gx, ga, gb = torch.ops.pica.lowrank_linear_backward(
            dy, x, t[:, lo:hi], weights[i], a[i], b_cat[b_lo:b_hi], ctx.need_x, ctx.need_a, ctx.need_b, ctx.backend
        )
        if ctx.need_x:
            dx = gx if dx is None else dx + gx
        da.append(ga if ctx.need_a else None)
        db.append(gb)
    dbiases = None if ctx.biases_are_one_leaf else [None] * ctx.n  # frozen biases only
    grads = (dx, [None] * ctx.n, dbiases, da, torch.cat(db) if ctx.need_b else None, None, None)
    return grads + (None,) * (ctx.num_inputs - 7)  # (rank_align, when given)


_grouped_op.register_autograd(_backward, setup_context=_setup_context)


def check_grouped_args(x, weights, biases, a, b_cat, ranks) -> None:
    """Every argument of :func:`grouped_lowrank_linear`, each once (``x`` and ``b_cat`` once, not per projection)."""
    if not (len(weights) == len(biases) == len(a) == len(ranks)) or not weights:
        raise ValueError("weights, biases, a and ranks must be non-empty lists of the same length")
    checks.check_matrix(b_cat, "b_cat")
    in_f = b_cat.shape[1]
    checks.check_x(x, in_f)
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks) or sum(ranks) != b_cat.shape[0]:
        raise ValueError(f"ranks must be positive ints summing to b_cat's {b_cat.shape[0]} rows, got {list(ranks)}")
    checks.check_factor(b_cat, (sum(ranks), in_f), x, "b_cat")
    for i, (w, bias, ai, r) in enumerate(zip(weights, biases, a, ranks)):
        checks.check_weight(w, x, f"weights[{i}]")
        if w.shape[1] != in_f:
            raise ValueError(f"weights[{i}] must be (out, in={in_f}) like x and b_cat, got {tuple(w.shape)}")
        checks.check_bias(bias, w.shape[0], x, f"biases[{i}]")
        checks.check_factor(ai, (w.shape[0], r), x, f"a[{i}]", f" (out, ranks[{i}])")
        if w.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("grouped_lowrank_linear expects a frozen weight and bias; use lowrank_linear otherwise")


@follows_autocast("x", "weights", "biases")
def grouped_lowrank_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    a: list[torch.Tensor],
    b_cat: torch.Tensor,
    ranks: list[int],
    *,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Projections sharing ``x``; shapes in the module docstring. Differentiable in x, each a[i] and b_cat.

    Frozen weights and biases only (PiCa and LoRA freeze them); ``a`` and ``b_cat`` may be
    any floating dtype (cast on the fly, as in :func:`lowrank_linear`). Inside ``torch.autocast``: x, the
    weights and biases in the region's dtype, ``a`` and ``b_cat`` in their own (as :func:`lowrank_linear`).
    """
    check_grouped_args(x, weights, biases, a, b_cat, ranks)
    lead = x.shape[:-1]
    outs = torch.ops.pica.grouped_lowrank_linear(
        x.reshape(-1, x.shape[-1]), list(weights), list(biases), list(a), b_cat, list(ranks), backend,
        padding.RANK_ALIGN,  # explicit (not the default): a compiled graph records the layout of t
    )
    return [y.reshape(*lead, w.shape[0]) for y, w in zip(outs[:-1], weights)]
