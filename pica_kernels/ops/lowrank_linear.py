"""``lowrank_linear``: ``y = x @ W.T + (x @ B.T) @ A.T + bias`` -- the backend entry point.

This is the op every adapter of this family runs on (DESIGN.md section 1):

============  ==========================  ==========================
method        A (out, r)                  B (r, in)
============  ==========================  ==========================
PiCa input    M, trainable                P = Vh[:r], frozen basis
PiCa output   U_r = U[:, :r], frozen      M, trainable
LoRA          lora_B.weight, trainable    lora_A.weight, trainable
============  ==========================  ==========================

Which factors are trainable is chosen by ``requires_grad``: the backward
computes only the gradients autograd asks for, and saves ``x`` only when a
gradient needs it (``dB`` or ``dW``). With ``B`` frozen (PiCa input side) the
only activation saved besides what the frozen layer needs is ``t = x @ B.T``,
``(T, r)``.

Kernels (one Triton kernel, ``_fused_lowrank_gemm``, three uses):

* forward, two launches: the shrink ``t = x @ B.T`` (T, r), then ONE GEMM
  over the concatenated K dimension, ``y = [x | t] @ [W | A].T + bias``: the
  low-rank term is accumulated in the same fp32 accumulator as the base GEMM,
  there is no second pass over ``y``.
* forward, decode (T <= 16, r <= 64): one launch; each program accumulates
  its rows of ``t`` in the same K loop over ``x`` as the base GEMM (the ``x``
  tile is loaded once for both), then adds ``t @ A.T``.
* backward: ``s = dy @ A`` (T, r); ``dx = [dy | s] @ [W ; B]`` as one GEMM
  over the concatenated K; ``dA = dy.T @ t`` and ``dB = s.T @ x`` accumulated
  in fp32 by plain tiled GEMMs whose K loop runs over tokens; when that
  leaves the GPU idle (few output tiles, long K) the K loop is split and the
  fp32 partials summed in a fixed order: deterministic, never atomics. ``A``/``B`` of another dtype than ``x`` (an fp32
  ``M`` with bf16 activations) are cast tile by tile in registers, never
  copied in memory; their gradients come back in their own dtype.

Every kernel takes strides, so transposed views (a Conv1D weight), column-major
bases (``torch.linalg.qr``) and stride-0 gradients are read in place.

Registered as ``torch.library.custom_op`` (``pica_kernels::lowrank_linear``
and ``pica_kernels::lowrank_linear_backward``) with fake kernels and autograd,
so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work; which
implementation runs is decided at run time by :mod:`.backend`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .backend import interpreter_enabled, resolve_backend

# --------------------------------------------------------------------------- Triton kernel


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """Build the jitted kernel on first use. Built lazily because ``triton.jit``
    reads ``TRITON_INTERPRET`` when it decorates, and importing pica_kernels
    must not require triton. ``interpret`` is the cache key only."""
    import triton
    import triton.language as tl

    @triton.jit
    def _fused_lowrank_gemm(
        a1_ptr, b1_ptr, a2_ptr, b2_ptr, b3_ptr, bias_ptr, c_ptr, t_ptr, task_ptr,
        M, N, K1, K2,
        s_a1m, s_a1k, s_b1k, s_b1n,
        s_a2m, s_a2k, s_b2k, s_b2n, s_b2task,
        s_b3k, s_b3r,
        s_cm, s_cn, s_tm, s_tr,
        seg_len, tiles_per_seg, num_m_tiles,
        k_per_split, s_csplit, s_tsplit,
        HAS_BIAS: tl.constexpr,
        SECOND: tl.constexpr,
        HAS_TASKS: tl.constexpr,
        CAST_F32: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K2: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """``C = A1 @ B1 [+ A2 @ B2] [+ bias]`` with an fp32 accumulator.

        A1 (M, K1), B1 (K1, N), C (M, N); bias (N,).
        SECOND == 0: no second term (a plain GEMM: shrink, dA, dB).
        SECOND == 1: A2 (M, K2), B2 (K2, N) [or (tasks, K2, N) with HAS_TASKS:
            rows come in segments of ``seg_len``, segment i uses
            ``B2[task_ptr[i]]``] -- the concatenated-K forward / dx GEMM.
        SECOND == 2 (decode): A2 = A1 @ B3 is accumulated in the K1 loop
            (B3 (K1, K2), K2 <= BLOCK_R), rounded to A1's dtype, written to
            t (M, K2) by the programs of the first column of tiles, then
            ``C += A2 @ B2``.
        B1/B2/B3 tiles are cast to A1's dtype (the reference casts A and B to
        x.dtype); CAST_F32 casts both dot operands to fp32 (the interpreter's
        bf16 tl.dot is wrong, DESIGN.md section 3).
        Split-K: program axis 1 takes the K1 range
        ``[split * k_per_split, (split + 1) * k_per_split)`` and writes its
        partial sum to ``C + split * s_csplit`` (decode: its partial t to
        ``t + split * s_tsplit`` too -- the low-rank term is linear in t);
        split 0 alone adds the A2 @ B2 term and the bias. The launcher sums
        the partials in a fixed order (deterministic, no atomics).
        """
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: GROUP_M row tiles sweep the columns together so the
        # B1 (weight) tiles they share stay in L2.
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        gsize = tl.minimum(num_m_tiles - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        pid_n = (pid % width) // gsize

        seg = pid_m // tiles_per_seg
        seg_start = seg * seg_len
        row_end = tl.minimum(seg_start + seg_len, M)
        offs_m = seg_start + (pid_m % tiles_per_seg) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < row_end
        mask_n = offs_n < N
        dt = a1_ptr.dtype.element_ty

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SECOND == 2:
            offs_r = tl.arange(0, BLOCK_R)
            mask_r = offs_r < K2
            tacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        split = tl.program_id(1)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K1)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
            a = tl.load(a1_ptr + offs_m[:, None] * s_a1m + offs_k[None, :] * s_a1k,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b1_ptr + offs_k[:, None] * s_b1k + offs_n[None, :] * s_b1n,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(dt)
            if CAST_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if SECOND == 2:
                b3 = tl.load(b3_ptr + offs_k[:, None] * s_b3k + offs_r[None, :] * s_b3r,
                             mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(dt)
                if CAST_F32:
                    b3 = b3.to(tl.float32)
                tacc = tl.dot(a, b3, tacc, input_precision=PRECISION)

        if SECOND == 1:
            b2_base = b2_ptr
            if HAS_TASKS:
                task = tl.load(task_ptr + seg)
                b2_base = b2_ptr + task.to(tl.int64) * s_b2task
            k2_end = K2 * (split == 0).to(tl.int32)  # the low-rank term once, in split 0
            for k0 in range(0, k2_end, BLOCK_K2):
                offs_k = k0 + tl.arange(0, BLOCK_K2)
                mask_k = offs_k < K2
                a2 = tl.load(a2_ptr + offs_m[:, None] * s_a2m + offs_k[None, :] * s_a2k,
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(dt)
                b2 = tl.load(b2_base + offs_k[:, None] * s_b2k + offs_n[None, :] * s_b2n,
                             mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(dt)
                if CAST_F32:
                    a2 = a2.to(tl.float32)
                    b2 = b2.to(tl.float32)
                acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
        if SECOND == 2:
            t = tacc.to(dt)  # round like the reference, which materialises t in x.dtype
            if pid_n == 0:  # t (or this split's fp32 partial of it)
                tl.store(t_ptr + split * s_tsplit + offs_m[:, None] * s_tm + offs_r[None, :] * s_tr,
                         tacc.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
            b2 = tl.load(b2_ptr + offs_r[:, None] * s_b2k + offs_n[None, :] * s_b2n,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(dt)
            if CAST_F32:
                t = t.to(tl.float32)
                b2 = b2.to(tl.float32)
            acc = tl.dot(t, b2, acc, input_precision=PRECISION)

        if HAS_BIAS:
            if split == 0:  # once, not once per split
                bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
                acc += bias.to(tl.float32)[None, :]
        tl.store(c_ptr + split * s_csplit + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    return _fused_lowrank_gemm


# Decode variant: one launch when T and r are this small. Each program then
# recomputes its rows of t, reading r x in of B once per column tile; at
# r <= 64 that is <= 1/2 of the W tile traffic for BLOCK_N = 128 (unmeasured
# here: no GPU in the session that wrote this; benchmarks/gpu.sh times both).
DECODE_MAX_T = 16
DECODE_MAX_R = 64

# Block sizes for the CPU interpreter: one numpy step per program per K step
# (~5-15 ms), so large tiles and few programs keep the tests fast; the tests
# shrink them to exercise multi-tile masking.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _config(m: int, dtype: torch.dtype, decode: bool) -> dict:
    if interpreter_enabled():
        cfg = dict(INTERPRETER_BLOCKS)
        if decode:
            cfg["BLOCK_M"] = 16
        return {**cfg, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    # GPU: one config per regime, no autotune (a sweep belongs in benchmarks/gpu.sh).
    wide = dtype == torch.float32
    if decode or m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64 if wide else 128, "GROUP_M": 1,
                "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32 if wide else 64, "GROUP_M": 8,
                "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32 if wide else 64, "GROUP_M": 8,
            "num_warps": 8, "num_stages": 3}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def fused_gemm(
    c: torch.Tensor,
    a1: torch.Tensor,
    b1: torch.Tensor,
    *,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    b3: torch.Tensor | None = None,
    t_out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tasks: torch.Tensor | None = None,
    seg_len: int | None = None,
    blocks: dict | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Launch ``_fused_lowrank_gemm`` writing ``c`` (M, N) in place; returns ``c``.

    a1 (M, K1), b1 (K1, N): any strides (pass ``W.T`` as a view).
    Second term, either ``a2`` (M, K2) with ``b2`` (K2, N) -- or (tasks, K2, N)
    with ``tasks`` (M // seg_len,) int32 and ``seg_len`` -- or the decode form
    ``b3`` (K1, K2) with ``b2`` (K2, N) and ``t_out`` (M, K2) receiving
    ``a1 @ b3`` rounded to a1's dtype. bias: (N,). ``blocks`` overrides the
    block sizes (tests use it to force several tiles). ``split_k`` splits
    the K1 loop over that many programs per tile (not with ``tasks``);
    default: chosen so that launches with few output tiles and a long K (the
    decode form, the shrink ``x @ P.T`` at moderate T, ``dA = dy.T @ t``,
    ``dB = s.T @ x``) fill the GPU.
    """
    m, k1 = a1.shape
    n = b1.shape[1]
    if m == 0 or n == 0:
        return c
    for name, v in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2), ("b3", b3), ("c", c), ("t_out", t_out)):
        # The kernel computes element offsets in int32.
        if v is not None and sum((d - 1) * abs(st) for d, st in zip(v.shape, v.stride())) >= 2**31:
            raise NotImplementedError(f"{name} {tuple(v.shape)} spans >= 2**31 elements; split the batch")
    # bias and tasks are read with unit stride (a few hundred bytes: copy if needed).
    bias = bias.contiguous() if bias is not None else None
    tasks = tasks.contiguous() if tasks is not None else None
    decode = b3 is not None
    second = 2 if decode else (1 if a2 is not None else 0)
    cfg = _config(m, a1.dtype, decode)
    if not interpreter_enabled():
        # Narrow outputs (N = r) get narrow tiles instead of masked-off columns.
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, _next_pow2(n)))
    if blocks:
        cfg.update(blocks)
    cast_f32 = interpreter_enabled() and torch.bfloat16 in (a1.dtype, b1.dtype) + tuple(
        x.dtype for x in (a2, b2, b3) if x is not None
    )
    if second == 1:
        k2 = a2.shape[1]
    elif second == 2:
        k2 = b3.shape[1]
        if k2 > 256:
            raise ValueError(f"the decode form keeps t in registers: r <= 256, got {k2}")
    else:
        k2 = 0
    block_r = max(16, _next_pow2(k2)) if decode else 16
    if seg_len is None:
        seg_len = m
    tiles_per_seg = triton_cdiv(seg_len, cfg["BLOCK_M"])
    num_m_tiles = (m // seg_len) * tiles_per_seg if tasks is not None else tiles_per_seg
    tiles = num_m_tiles * triton_cdiv(n, cfg["BLOCK_N"])
    k_blocks = triton_cdiv(k1, cfg["BLOCK_K"])
    if tasks is not None:
        split_k = 1
    elif split_k is None:
        split_k = _auto_split_k(tiles, k_blocks, c.device)
    k_per_split = triton_cdiv(k_blocks, max(1, split_k)) * cfg["BLOCK_K"]
    split_k = triton_cdiv(k1, k_per_split)
    out, t_final = c, t_out
    if split_k > 1:
        # Every split writes its full tile (zeros where its K range is empty), so no init.
        c = torch.empty((split_k, m, n), dtype=torch.float32, device=c.device)
        if decode:
            t_out = torch.empty((split_k, m, k2), dtype=torch.float32, device=c.device)
    grid = (tiles, split_k)
    dummy = c
    b2s = (b2.stride(-2), b2.stride(-1), b2.stride(0) if b2.dim() == 3 else 0) if b2 is not None else (0, 0, 0)
    _kernel(interpreter_enabled())[grid](
        a1, b1,
        a2 if a2 is not None else dummy,
        b2 if b2 is not None else dummy,
        b3 if b3 is not None else dummy,
        bias if bias is not None else dummy,
        c,
        t_out if t_out is not None else dummy,
        tasks if tasks is not None else dummy,
        m, n, k1, k2,
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        *(a2.stride() if a2 is not None else (0, 0)),
        *b2s,
        *(b3.stride() if b3 is not None else (0, 0)),
        c.stride(-2), c.stride(-1),
        *((t_out.stride(-2), t_out.stride(-1)) if t_out is not None else (0, 0)),
        seg_len, tiles_per_seg, num_m_tiles,
        k_per_split, c.stride(0) if split_k > 1 else 0, t_out.stride(0) if split_k > 1 and decode else 0,
        HAS_BIAS=bias is not None,
        SECOND=second,
        HAS_TASKS=tasks is not None,
        CAST_F32=cast_f32,
        PRECISION=_precision(a1.dtype),
        BLOCK_R=block_r,
        # The low-rank K steps: r = 16 should not pay for a 64-wide masked tile.
        BLOCK_K2=min(cfg["BLOCK_K"], max(16, _next_pow2(k2))),
        **cfg,
    )
    if split_k > 1:
        out.copy_(c.sum(0))  # fixed-order reduction of the partials: deterministic
        if decode:
            t_final.copy_(t_out.sum(0))
    return out


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Split K when the output has too few tiles to fill the GPU (two programs per SM) and K is long.

    Each split keeps >= 4 K blocks so the partial-sum traffic (split x M x N
    fp32) stays small next to the operands it replaces reading serially.
    """
    if interpreter_enabled():
        return 1
    target = 2 * _sm_count(device)
    if tiles >= target or k_blocks < 8:
        return 1
    return max(1, min(triton_cdiv(target, tiles), k_blocks // 4, 64))


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests patch it to NaN-fill, so an unwritten element fails)."""
    return torch.empty(shape, dtype=dtype, device=device)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def use_decode(t_rows: int, rank: int) -> bool:
    return 0 < t_rows <= DECODE_MAX_T and rank <= DECODE_MAX_R


def triton_forward(x, weight, bias, a, b, *, decode: bool | None = None, blocks: dict | None = None):
    """x (T, in), weight (out, in), bias (out,)|None, a (out, r), b (r, in) -> (y (T, out), t (T, r)), x.dtype."""
    rows, rank = x.shape[0], a.shape[1]
    y = alloc((rows, weight.shape[0]), x.dtype, x.device)
    t = alloc((rows, rank), x.dtype, x.device)
    if decode is None:
        decode = use_decode(rows, rank)
    if decode:
        fused_gemm(y, x, weight.T, b3=b.T, b2=a.T, t_out=t, bias=bias, blocks=blocks)
    else:
        fused_gemm(t, x, b.T, blocks=blocks)
        fused_gemm(y, x, weight.T, a2=t, b2=a.T, bias=bias, blocks=blocks)
    return y, t


def triton_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db, *, blocks: dict | None = None):
    """dy (T, out), x (T, in)|None, t (T, r) -> (dx (T, in), dA (out, r), dB (r, in)); unneeded ones are None."""
    dx = da = db = None
    s = None
    if need_dx or need_db:
        s = fused_gemm(alloc((dy.shape[0], a.shape[1]), dy.dtype, dy.device), dy, a, blocks=blocks)
    if need_dx:
        dx = alloc((dy.shape[0], weight.shape[1]), dy.dtype, dy.device)
        fused_gemm(dx, dy, weight, a2=s, b2=b, blocks=blocks)
    if need_da:
        da = alloc(a.shape, torch.float32, dy.device)
        fused_gemm(da, dy.T, t, blocks=blocks)
        da = da.to(a.dtype)
    if need_db:
        db = alloc(b.shape, torch.float32, dy.device)
        fused_gemm(db, s.T, x, blocks=blocks)
        db = db.to(b.dtype)
    return dx, da, db


# --------------------------------------------------------------------------- reference math


def reference_forward(x, weight, bias, a, b):
    """Same contract as :func:`triton_forward`; the math of :func:`pica_kernels.reference.lowrank_linear`."""
    t = F.linear(x, b.to(x.dtype))
    return F.linear(x, weight, bias) + F.linear(t, a.to(x.dtype)), t


def reference_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db):
    """Same contract as :func:`triton_backward`; what autograd computes through the reference."""
    dt = dy.dtype
    s = dy @ a.to(dt) if (need_dx or need_db) else None
    dx = dy @ weight + s @ b.to(dt) if need_dx else None
    da = (dy.T @ t).to(a.dtype) if need_da else None
    db = (s.T @ x).to(b.dtype) if need_db else None
    return dx, da, db


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("pica_kernels::lowrank_linear", mutates_args=())
def _lowrank_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, in) -> (y (T, out), t = x @ B.T (T, r)), both in x.dtype. ``t`` is saved for backward."""
    if resolve_backend(backend, x.device, x.dtype) == "triton":
        return triton_forward(x, weight, bias, a, b)
    return reference_forward(x, weight, bias, a, b)


@_lowrank_linear_op.register_fake
def _(x, weight, bias, a, b, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], a.shape[1])


@torch.library.custom_op("pica_kernels::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(
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
    """Returns (dx (T, in), dA (out, r), dB (r, in)); a gradient not asked for is an empty (0,) tensor."""
    if resolve_backend(backend, dy.device, dy.dtype) == "triton":
        grads = triton_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db)
    else:
        grads = reference_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db)
    like = (dy, a, b)
    return tuple(g if g is not None else like[i].new_empty(0) for i, g in enumerate(grads))


@_lowrank_linear_backward_op.register_fake
def _(dy, x, t, weight, a, b, need_dx, need_da, need_db, backend):
    return (
        dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(0),
        a.new_empty(a.shape) if need_da else a.new_empty(0),
        b.new_empty(b.shape) if need_db else b.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, a, b, backend = inputs
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
    if need_w:  # not PiCa's case (W frozen); kept so the op is a complete linear layer
        dw = (dy.T @ x).to(weight.dtype)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dw, dbias, da, db, None


_lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry point


def check_lowrank_args(x, weight, bias, a, b) -> None:
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
    lead = x.shape[:-1]
    y, _ = torch.ops.pica_kernels.lowrank_linear(x.reshape(-1, x.shape[-1]), weight, bias, a, b, backend)
    return y.reshape(*lead, weight.shape[0])
