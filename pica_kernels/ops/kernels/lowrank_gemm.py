"""The one Triton GEMM kernel behind every op: ``out = x @ weight [+ t @ factor_up] [+ bias]``.

Imported lazily by :mod:`.launchers` on the first launch (never by
``import pica_kernels``): ``triton.jit`` reads ``TRITON_INTERPRET`` when it
decorates, so the mode (CPU interpreter or GPU compiler) is fixed here, once
per process. ``INTERPRETED`` records which one it was.

Operands, for a launch that writes ``out`` (rows, cols)::

    x           (rows, depth)    the left operand: x (forward), dy (dx), dy.T (dA), s.T (dB)
    weight      (depth, cols)    the right operand: W.T (forward), W (dx), t (dA), x (dB)
    t           (rows, rank)     CONCAT_K: the low-rank activation, a second left operand
    factor_up   (rank, cols)     CONCAT_K / DECODE: the expanding factor: A.T (forward), B (dx);
                or (tasks, rank, cols) with HAS_TASKS (one factor per segment of rows)
    factor_down (depth, rank)    DECODE: the shrinking factor B.T; t = x @ factor_down
    t_out       (rows, rank)     DECODE: receives t (rounded to x's dtype)
    bias        (cols,)

Names avoid M/N/K: PiCa's trainable matrix is called M.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .configs import Mode

# The modes as constexpr globals (a jitted function may read a global only if it is a constexpr).
PLAIN = tl.constexpr(int(Mode.PLAIN))
CONCAT_K = tl.constexpr(int(Mode.CONCAT_K))
DECODE = tl.constexpr(int(Mode.DECODE))


@triton.jit
def _tile_coordinates(rows, cols, seg_len, tiles_per_seg, num_row_tiles,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP_ROWS: tl.constexpr):
    """Row and column offsets (and masks) of this program's output tile, and its row segment.

    Grouped ordering: GROUP_ROWS row tiles sweep the columns together so the
    weight tiles they share stay in L2. Rows come in segments of ``seg_len``
    (one segment, ``seg_len = rows``, unless several tasks share the launch);
    a tile never straddles two segments.
    """
    pid = tl.program_id(0)
    num_col_tiles = tl.cdiv(cols, BLOCK_COLS)
    width = GROUP_ROWS * num_col_tiles
    first_row_tile = (pid // width) * GROUP_ROWS
    group_size = tl.minimum(num_row_tiles - first_row_tile, GROUP_ROWS)
    row_tile = first_row_tile + (pid % width) % group_size
    col_tile = (pid % width) // group_size

    seg = row_tile // tiles_per_seg
    seg_start = seg * seg_len
    row_end = tl.minimum(seg_start + seg_len, rows)
    offs_rows = seg_start + (row_tile % tiles_per_seg) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_cols = col_tile * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return offs_rows, offs_cols, offs_rows < row_end, offs_cols < cols, seg, col_tile


@triton.jit
def _load_tile(ptr, offs_0, offs_1, stride_0, stride_1, mask_0, mask_1):
    """A 2-D tile ``ptr[offs_0, offs_1]``, zero outside the masks (zeros are exact in a dot)."""
    return tl.load(ptr + offs_0[:, None] * stride_0 + offs_1[None, :] * stride_1,
                   mask=mask_0[:, None] & mask_1[None, :], other=0.0)


@triton.jit
def _dot(a, b, acc, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += a @ b`` in fp32. CAST_F32: the CPU interpreter's bf16 tl.dot is wrong (measured, triton
    3.9): compute it from fp32 copies of the tiles there."""
    if CAST_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def lowrank_gemm_kernel(
    x_ptr, weight_ptr, t_ptr, factor_up_ptr, factor_down_ptr, bias_ptr, out_ptr, t_out_ptr, task_ptr,
    rows, cols, depth, rank,
    stride_x_row, stride_x_depth, stride_w_depth, stride_w_col,
    stride_t_row, stride_t_rank, stride_up_rank, stride_up_col, stride_up_task,
    stride_down_depth, stride_down_rank,
    stride_out_row, stride_out_col, stride_tout_row, stride_tout_rank,
    seg_len, tiles_per_seg, num_row_tiles,
    depth_per_split, stride_out_split, stride_tout_split,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TASKS: tl.constexpr,
    CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_DEPTH: tl.constexpr,
    BLOCK_RANK: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
):
    """``out = x @ weight [+ t @ factor_up] [+ bias]`` with an fp32 accumulator (operands in the module docstring).

    MODE (a :class:`~.configs.Mode`):
      PLAIN     ``out = x @ weight`` -- the shrink ``x @ B.T``, ``s = dy @ A``, ``dA``, ``dB``.
      CONCAT_K  ``out = [x | t] @ [weight ; factor_up]``: the low-rank term is more K steps of the
                same accumulator (forward ``y``, backward ``dx``). BLOCK_RANK is the step over rank.
                HAS_TASKS: segment ``i`` of ``seg_len`` rows uses ``factor_up[task_ptr[i]]``.
      DECODE    ``t = x @ factor_down`` is accumulated in the same depth loop as ``x @ weight``
                (the x tile is loaded once for both; BLOCK_RANK >= rank holds t whole), rounded
                to x's dtype like the reference, written to ``t_out`` by the first column of
                tiles, then ``out += t @ factor_up``. One launch for the whole forward.
    weight/factor tiles are cast to x's dtype in registers (the reference casts A and B to
    x.dtype; an fp32 M with bf16 activations is never copied in memory).
    Split-K: program axis 1 takes the depth range ``[split * depth_per_split, (split + 1) *
    depth_per_split)`` and writes its partial to ``out + split * stride_out_split`` (DECODE: its
    partial t to ``t_out + split * stride_tout_split`` too: the low-rank term is linear in t);
    split 0 alone adds the low-rank term and the bias. The launcher sums the partials in a fixed
    order (deterministic, no atomics).
    """
    offs_rows, offs_cols, mask_rows, mask_cols, seg, col_tile = _tile_coordinates(
        rows, cols, seg_len, tiles_per_seg, num_row_tiles, BLOCK_ROWS, BLOCK_COLS, GROUP_ROWS)
    dt = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    if MODE == DECODE:
        offs_rank = tl.arange(0, BLOCK_RANK)
        mask_rank = offs_rank < rank
        t_acc = tl.zeros((BLOCK_ROWS, BLOCK_RANK), dtype=tl.float32)
    split = tl.program_id(1)
    depth_lo = split * depth_per_split
    depth_hi = tl.minimum(depth_lo + depth_per_split, depth)
    for d0 in range(depth_lo, depth_hi, BLOCK_DEPTH):
        offs_depth = d0 + tl.arange(0, BLOCK_DEPTH)
        mask_depth = offs_depth < depth_hi
        x = _load_tile(x_ptr, offs_rows, offs_depth, stride_x_row, stride_x_depth, mask_rows, mask_depth)
        w = _load_tile(weight_ptr, offs_depth, offs_cols, stride_w_depth, stride_w_col,
                       mask_depth, mask_cols).to(dt)
        acc = _dot(x, w, acc, CAST_F32, PRECISION)
        if MODE == DECODE:
            down = _load_tile(factor_down_ptr, offs_depth, offs_rank, stride_down_depth, stride_down_rank,
                              mask_depth, mask_rank).to(dt)
            t_acc = _dot(x, down, t_acc, CAST_F32, PRECISION)

    if MODE == CONCAT_K:
        up_base = factor_up_ptr
        if HAS_TASKS:
            task = tl.load(task_ptr + seg)
            up_base = factor_up_ptr + task.to(tl.int64) * stride_up_task
        rank_end = rank * (split == 0).to(tl.int32)  # the low-rank term once, in split 0
        for r0 in range(0, rank_end, BLOCK_RANK):
            offs_rank = r0 + tl.arange(0, BLOCK_RANK)
            mask_rank = offs_rank < rank
            t = _load_tile(t_ptr, offs_rows, offs_rank, stride_t_row, stride_t_rank, mask_rows, mask_rank).to(dt)
            up = _load_tile(up_base, offs_rank, offs_cols, stride_up_rank, stride_up_col,
                            mask_rank, mask_cols).to(dt)
            acc = _dot(t, up, acc, CAST_F32, PRECISION)
    if MODE == DECODE:
        t = t_acc.to(dt)  # round like the reference, which materialises t in x.dtype
        if col_tile == 0:  # t (or this split's fp32 partial of it)
            tl.store(t_out_ptr + split * stride_tout_split + offs_rows[:, None] * stride_tout_row
                     + offs_rank[None, :] * stride_tout_rank,
                     t_acc.to(t_out_ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_rank[None, :])
        up = _load_tile(factor_up_ptr, offs_rank, offs_cols, stride_up_rank, stride_up_col,
                        mask_rank, mask_cols).to(dt)
        acc = _dot(t, up, acc, CAST_F32, PRECISION)

    if HAS_BIAS:
        if split == 0:  # once, not once per split
            bias = tl.load(bias_ptr + offs_cols, mask=mask_cols, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    tl.store(out_ptr + split * stride_out_split + offs_rows[:, None] * stride_out_row
             + offs_cols[None, :] * stride_out_col,
             acc.to(out_ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_cols[None, :])


#: True when the kernels above were decorated for the CPU interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRETED = not isinstance(lowrank_gemm_kernel, triton.runtime.jit.JITFunction)
