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
"""

from __future__ import annotations

import torch

from .. import reference
from . import checks
from .backend import resolve_backend
from .kernels import launchers, padding


def _multitask_triton(x, weight, bias, m_stack, basis, adapter_ids, align):
    nseq, seq_len, in_f = x.shape
    rank = basis.shape[0]
    x2 = x.reshape(nseq * seq_len, in_f)
    # A rank that is not a multiple of 16 runs padded (kernels/padding.py): the shared basis and the M's are
    # zero-padded copies, cached per tensor and version; t is the (.., r) view of the padded buffer.
    basis_p, m_p = padding.pad_rank_dim(basis, 0, align), padding.pad_rank_dim(m_stack, 2, align)
    t_p, t = padding.padded_view((x2.shape[0],), rank, lambda shape: launchers.alloc(shape, x.dtype, x.device),
                                 align)
    launchers.launch_lowrank_gemm(t_p, x2, basis_p.T)  # shared basis: one shrink for every adapter
    y = launchers.alloc((x2.shape[0], weight.shape[0]), x.dtype, x.device)
    if seq_len > 0:
        launchers.launch_lowrank_gemm(
            y, x2, weight.T, t=t_p, factor_up=m_p.transpose(1, 2), bias=bias,
            tasks=adapter_ids.to(torch.int32), seg_len=seq_len,
        )
    return y.view(nseq, seq_len, weight.shape[0]), t.unflatten(0, (nseq, seq_len))


@torch.library.custom_op("pica_kernels::multitask_lowrank_linear", mutates_args=())
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
    rank multiple of ``rank_align``, whichever branch ran; as in ``pica_kernels::lowrank_linear``)."""
    if resolve_backend(backend, x.device, x.dtype) == "triton":
        try:
            return _multitask_triton(x, weight, bias, m_stack, basis, adapter_ids, rank_align)
        except launchers.KernelFallback:
            pass  # a shape class that failed to compile or launch (warned once): the reference runs it
    with reference.autocast_off(x):  # the op computes in its inputs' dtypes (the entry point cast them)
        y, t = reference.multitask_forward(x, weight, bias, m_stack, basis, adapter_ids)
    # t laid out as the kernels lay it out, whichever branch ran (one layout for the fake kernel to promise).
    return y, padding.pad_cols_like_kernel(t, rank_align)


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
    with reference.autocast_off(dy):  # a backward inside an autocast region: dM stays an fp32 reduction
        dx, dbias, dm = reference.multitask_backward(dy, t, weight, m_stack, basis, ids, need_x, need_bias, need_m)
    return (dx, None, dbias, dm, None, None, None) + (None,) * (ctx.num_inputs - 7)  # (rank_align, when given)


_multitask_op.register_autograd(_backward, setup_context=_setup_context)


def multitask_pica_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    basis: torch.Tensor,
    m_stack: torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Input-side PiCa with one adapter per sequence; shapes in the module docstring.

    Differentiable in x, m_stack and bias (W and the basis frozen). Inside ``torch.autocast``: x, weight and bias
    in the region's dtype, ``basis`` and ``m_stack`` in their own (dM accumulated in fp32, in m_stack's dtype).
    """
    amp = reference.autocast_dtype(x)
    if amp is not None:
        x, weight, bias = reference.autocast_operand((x, weight, bias), amp)
        with torch.autocast(x.device.type, enabled=False):
            return multitask_pica_linear(x, weight, bias, basis, m_stack, adapter_ids, backend=backend)
    check_multitask_args(x, weight, bias, basis, m_stack, adapter_ids)
    y, _ = torch.ops.pica_kernels.multitask_lowrank_linear(
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
    if m_stack.dim() != 3:
        raise ValueError(f"m_stack must be (n, out={out_f}, r={rank}), got {tuple(m_stack.shape)}")
    checks.check_factor(m_stack, (m_stack.shape[0], out_f, rank), x, "m_stack", " (n, out, r)")
    if weight.requires_grad or basis.requires_grad:
        raise ValueError("multitask_pica_linear expects a frozen weight and basis")
    if adapter_ids.shape != (x.shape[0],) or adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
        raise ValueError(f"adapter_ids must be integer of shape ({x.shape[0]},), got {adapter_ids.dtype} "
                         f"{tuple(adapter_ids.shape)}")
    checks.check_device(adapter_ids, x, "adapter_ids")
    if not torch.compiler.is_compiling() and adapter_ids.numel() and not (
        0 <= int(adapter_ids.min()) and int(adapter_ids.max()) < m_stack.shape[0]
    ):  # an out-of-range id would make the kernel read outside m_stack
        raise ValueError(f"adapter_ids must lie in [0, {m_stack.shape[0]}), got {adapter_ids.tolist()}")
