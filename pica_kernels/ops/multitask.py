"""``multitask_pica_linear``: one batch, several PiCa adapters (one per sequence), the basis shared.

Input-side adapters of one layer with equal rank share the basis ``P`` and
differ only in ``M``. A batch whose sequences name different adapters
(multi-tenant serving, multi-task evaluation) then needs ``t = x @ P.T`` only
once for all tokens, and one concatenated-K GEMM in which every row tile
takes the ``M`` of its sequence: the segment scheme of punica / vLLM's LoRA
kernels, with sequences as segments. Two launches whatever the number of
adapters.

Shapes: x (B, S, in) -- segment = one sequence of S tokens; weight (out, in);
bias (out,) or None; basis P (r, in); m_stack (n_adapters, out, r);
adapter_ids (B,) integer, the index into m_stack of each sequence.
Returns y (B, S, out) in x.dtype.

Backward (training several tasks in one batch) is plain PyTorch, batched per
sequence; ``dM`` of each adapter sums its sequences through a one-hot matmul
(deterministic, no atomics).

Eager CPU inference (no gradient asked for; serving) takes :func:`.eager.grouped_inference` instead of the
custom op: ``t`` once, then GEMMs of ``t``'s rows against each adapter's ``M`` added into ``y`` in
place. The reference's gather of ``m_stack[ids]`` (a (B, out, r) copy) and its batched GEMM of S-row
matrices cost 3x the low-rank term's FLOPs on CPU (SmolLM2 up_proj, 64 x 16 tokens, r = 32, one
thread: gather 2.0 ms + bmm 3.3-4.6 ms + add, against 1.7-2.6 ms for one (T, r) @ (r, out) GEMM).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import reference
from . import checks, eager
from .dispatch import autocast_off, follows_autocast, run_op, use_eager
from .kernels import launchers, padding


@torch.library.custom_op("pica::multitask_lowrank_linear", mutates_args=())
def _multitask_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    m_stack: torch.Tensor,
    basis: torch.Tensor,
    adapter_ids: torch.Tensor,
    backend: str,
    rank_align: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, S, in) -> (y (B, S, out), t (B, S, r)); t is saved for backward (the view of a buffer padded to a
    rank multiple of ``rank_align``, whichever branch ran; as in ``pica::lowrank_linear``)."""
    return run_op(backend, x,
                  lambda: launchers.triton_multitask_forward(x, weight, bias, m_stack, basis, adapter_ids, rank_align),
                  lambda: reference.multitask_forward(x, weight, bias, m_stack, basis, adapter_ids),
                  lambda out: (out[0], padding.pad_cols_like_kernel(out[1], rank_align)))


@_multitask_op.register_fake
def _(x, weight, bias, m_stack, basis, adapter_ids, backend, rank_align=1):
    rank = basis.shape[0]
    t = x.new_empty(*x.shape[:2], padding.padded_rank(rank, rank_align))[..., :rank]
    return x.new_empty(*x.shape[:2], weight.shape[0]), t


def _setup_context(ctx, inputs, output):
    x, weight, bias, m_stack, basis, adapter_ids, backend = inputs[:7]
    # Gradients go to the arguments the dispatcher kept: it drops rank_align when it equals its default.
    ctx.num_inputs = 7 + (inputs[7] != 1)
    ctx.save_for_backward(output[1], weight, m_stack, basis, adapter_ids)
    ctx.need = ctx.needs_input_grad[:4]
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dt):
    t, weight, m_stack, basis, ids = ctx.saved_tensors
    need_x, _need_w, need_bias, need_m = ctx.need
    with autocast_off(dy):  # a backward inside an autocast region: dM stays an fp32 reduction
        dx, dbias, dm = reference.multitask_backward(dy, t, weight, m_stack, basis, ids, need_x, need_bias, need_m)
    return (dx, None, dbias, dm, None, None, None) + (None,) * (ctx.num_inputs - 7)  # (rank_align, when given)


_multitask_op.register_autograd(_backward, setup_context=_setup_context)


@follows_autocast("x", "weight", "bias")
def multitask_pica_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    basis: torch.Tensor,
    m_stack: torch.Tensor | Sequence[torch.Tensor],
    adapter_ids: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Input-side PiCa with one adapter per sequence; shapes in the module docstring.

    ``m_stack``: (n, out, r), or a sequence of n (out, r) tensors (any floating dtypes), stacked (in their
    promoted dtype) only where the custom op runs: the eager CPU inference path reads them where they are.
    Differentiable in x, m_stack and bias (W and the basis frozen). Inside ``torch.autocast``: x, weight and bias
    in the region's dtype, ``basis`` and ``m_stack`` in their own (dM accumulated in fp32, in m_stack's dtype).
    """
    check_multitask_args(x, weight, bias, basis, m_stack, adapter_ids)
    ms = [m_stack] if isinstance(m_stack, torch.Tensor) else list(m_stack)
    if use_eager(backend, x) and not (torch.is_grad_enabled() and any(
            v is not None and v.requires_grad for v in (x, bias, *ms))):
        return eager.grouped_inference(x, weight, bias, basis, m_stack if isinstance(m_stack, torch.Tensor) else ms,
                                       adapter_ids)
    if not isinstance(m_stack, torch.Tensor):
        dtype = functools.reduce(torch.promote_types, (m.dtype for m in ms))
        m_stack = torch.stack([m.to(dtype) for m in ms])  # (n, out, r)
    y, _ = torch.ops.pica.multitask_lowrank_linear(
        x, weight, bias, m_stack, basis, adapter_ids, backend,
        padding.RANK_ALIGN,  # explicit (not the default): a compiled graph records the layout of t
    )
    return y


def check_multitask_args(x, weight, bias, basis, m_stack, adapter_ids) -> None:
    """Every argument of :func:`multitask_pica_linear`, once; errors name the argument."""
    checks.check_matrix(weight, "weight")
    out_f, in_f = weight.shape
    checks.check_x(x, in_f)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seq, in), got shape {tuple(x.shape)}")
    checks.check_weight(weight, x)
    checks.check_bias(bias, out_f, x)
    checks.check_matrix(basis, "basis")
    rank = basis.shape[0]
    checks.check_factor(basis, (rank, in_f), x, "basis", f" (r, in={in_f})")
    if isinstance(m_stack, torch.Tensor):
        if m_stack.dim() != 3:
            raise ValueError(f"m_stack must be (n, out={out_f}, r={rank}), got {tuple(m_stack.shape)}")
        checks.check_factor(m_stack, (m_stack.shape[0], out_f, rank), x, "m_stack", " (n, out, r)")
        n = m_stack.shape[0]
    else:
        if not isinstance(m_stack, (list, tuple)) or not m_stack or not all(
                isinstance(m, torch.Tensor) for m in m_stack):
            raise TypeError(f"m_stack must be an (n, out={out_f}, r={rank}) tensor or a non-empty list of "
                            f"(out, r) tensors, got {type(m_stack).__name__}")
        for i, m in enumerate(m_stack):
            checks.check_factor(m, (out_f, rank), x, f"m_stack[{i}]", f" (out={out_f}, r={rank})")
        n = len(m_stack)
    if weight.requires_grad or basis.requires_grad:
        raise ValueError("multitask_pica_linear expects a frozen weight and basis")
    if adapter_ids.shape != (x.shape[0],) or adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
        raise ValueError(f"adapter_ids must be integer of shape ({x.shape[0]},), got {adapter_ids.dtype} "
                         f"{tuple(adapter_ids.shape)}")
    checks.check_device(adapter_ids, x, "adapter_ids")
    if not torch.compiler.is_compiling() and adapter_ids.numel() and not (
        0 <= int(adapter_ids.min()) and int(adapter_ids.max()) < n
    ):  # an out-of-range id would make the kernel read outside m_stack
        raise ValueError(f"adapter_ids must lie in [0, {n}), got {adapter_ids.tolist()}")
