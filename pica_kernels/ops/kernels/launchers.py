"""From torch tensors to launches of :func:`~.lowrank_gemm.lowrank_gemm_kernel`: strides, grid, split-K.

Kernel sequences (DESIGN: one kernel, three modes, see :class:`~.configs.Mode`):

* forward, two launches: the shrink ``t = x @ B.T`` (T, r) (PLAIN), then ONE
  GEMM over the concatenated depth, ``y = [x | t] @ [W | A].T + bias``
  (CONCAT_K): the low-rank term lands in the base GEMM's fp32 accumulator,
  no second pass over ``y``.
* forward, decode (T <= 16, r <= 64): one DECODE launch; each program
  accumulates its rows of ``t`` in the same depth loop as the base GEMM.
* backward: ``s = dy @ A`` (T, r) (PLAIN); ``dx = [dy | s] @ [W ; B]``
  (CONCAT_K); ``dA = dy.T @ t`` and ``dB = s.T @ x`` accumulated in fp32 by
  PLAIN launches whose depth loop runs over tokens; when that leaves the GPU
  idle (few output tiles, long depth) the depth loop is split and the fp32
  partials summed in a fixed order: deterministic, never atomics.
* grouped forward (projections sharing x): one shrink launch against the
  concatenated bases, then one CONCAT_K launch per projection
  (:func:`triton_grouped_forward`).
* multi-task forward (one adapter per sequence): one shrink against the shared
  basis, then one CONCAT_K launch whose row segments each take their own
  ``M`` (:func:`triton_multitask_forward`).

Every rank runs padded to a multiple of 16 (:mod:`.padding`: cached zero-padded
factors, ``t`` a view of its padded buffer, gradients sliced back to the true shape),
so the JIT's divisibility hints hold for every r.

Configs come from :func:`select_config`: a tuned-table entry (:mod:`.tuned`) where
one fits, else the per-regime heuristic (:mod:`.configs`, fitted to the GPU's shared
memory), then a test's :func:`~.configs.config_override`. Safety net: a launch that
fails to compile or runs out of resources (Triton's OutOfResources / PTXASError / CompilationError, or the CUDA driver's "too many
resources requested for launch") warns once for its shape class (device, shape, config) and raises
:class:`KernelFallback`, which the ops catch to run their reference branch --
for that shape class from then on, without retrying the kernel.
``PICA_KERNELS_STRICT=1`` raises instead (the test suite runs that way).

Importing this module does not import triton; the kernel module is imported on the first launch.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import warnings
from typing import NamedTuple

import torch

from ..env import env_flag
from . import autotune, tuned
from .configs import (
    DeviceProps,
    Mode,
    apply_override,
    choose_split_k,
    config_override,
    device_props,
    heuristic_config,
    override_active,
)
from .padding import pad_rank_dim, pad_rank_slots, padded_view, slot_offsets, widen_cols

# Decode variant: one launch when T and r are this small. Each program then
# recomputes its rows of t, reading r x in of B once per column tile; at
# r <= 64 that is <= 1/2 of the W tile traffic for BLOCK_COLS = 128, a bound
# from the traffic model, not a timing: benchmarks/gpu.sh times both forms.
DECODE_MAX_T = 16
DECODE_MAX_R = 64


def select_config(
    rows: int,
    cols: int,
    depth: int,
    rank: int,
    mode: Mode,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
    device: DeviceProps | None,
    *,
    interpreted: bool = False,
    use_table: bool = True,
):
    """The ``triton.Config`` of one launch writing ``out`` (rows, cols), reducing over ``depth`` (+ ``rank``).

    dtypes: (x, weight, factor) element types (:func:`~.configs.heuristic_config`). mode: a :class:`Mode`;
    rank = 0 for PLAIN. device: :class:`DeviceProps` -- at run time ``device_props(tensor.device)``, ahead of
    time ``GPU_TABLE["sm_86"]`` and friends; ignored when ``interpreted`` (the CPU interpreter).

    Returns ``triton.Config(kwargs={BLOCK_ROWS, BLOCK_COLS, BLOCK_DEPTH, BLOCK_RANK, GROUP_ROWS},
    num_warps, num_stages)``: the entry of the tuned-config table (:func:`.tuned.lookup`; not with
    ``use_table=False`` or ``PICA_KERNELS_TUNED=0``) for this (architecture, regime, shape bucket, dtypes,
    mode) when it has one that fits the device; else the heuristic's. ``depth`` does not change the
    heuristic's tile (it decides split-K, :func:`~.configs.choose_split_k`); the table keys on it. An active
    :func:`~.configs.config_override` is applied last, unfitted.
    """
    import triton

    blocks, warps, stages = heuristic_config(rows, cols, rank, mode, dtypes, device, interpreted=interpreted)
    if use_table and not interpreted:
        found = tuned.lookup(rows, cols, depth, rank, mode, dtypes, device)
        if found is not None:
            blocks, warps, stages = found
    blocks, warps, stages = apply_override(blocks, warps, stages, mode, rank)
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


#: Set by :func:`recording_launches` (the ahead-of-time gate, ``tools/aot.py``): (DeviceProps, list sink).
_RECORDING: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("pica_kernels_recording", default=None)


@contextlib.contextmanager
def recording_launches(props, sink: list):
    """Inside the block, a launch on ``meta`` tensors is configured exactly as on the GPU ``props`` describes
    (a :class:`~.configs.DeviceProps`, e.g. ``GPU_TABLE["sm_86"]``: config, split-K, grid, arguments) and
    appended to ``sink`` as ``(grid, args, kwargs)`` instead of run. This is how the compile gate
    (``tools/aot.py``) compiles every launch the ops make for a GPU it does not have; the kernel module
    must be in compiler mode."""
    token = _RECORDING.set((props, sink))
    try:
        yield sink
    finally:
        _RECORDING.reset(token)


def kernel_module():
    """:mod:`.lowrank_gemm`, imported (and its kernels decorated) on first use."""
    return importlib.import_module(f"{__package__}.lowrank_gemm")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests patch it to NaN-fill, so an unwritten element fails)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


STRICT_ENV_VAR = "PICA_KERNELS_STRICT"


def strict_mode() -> bool:
    """``PICA_KERNELS_STRICT=1``: a kernel that fails to compile or launch raises instead of falling back."""
    return env_flag(STRICT_ENV_VAR)


class KernelFallback(Exception):
    """Raised by a launch whose shape class runs on the reference path (after a failure, warned once).

    The ops catch it and run their reference branch; it never reaches a user.
    """


#: Shape classes (the launches that select one compiled kernel: device, mode, dtypes, flags, config)
#: whose kernel failed to compile or launch in this process, with the warning given.
FALLBACK_SHAPE_CLASSES: dict[tuple, str] = {}


def reset_fallbacks() -> None:
    """Forget the failed shape classes (their next launch tries the kernel again)."""
    FALLBACK_SHAPE_CLASSES.clear()


def _triton_failures() -> tuple[type[BaseException], ...]:
    """What Triton raises when the kernel cannot be built or loaded for this GPU (not a wrong argument)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    return tuple(getattr(errors, n) for n in ("OutOfResources", "PTXASError") if hasattr(errors, n)) + (
        CompilationError,
    )


def _launch_failures() -> tuple[type[BaseException], ...]:
    """The launch's ``except`` clause: Triton's failures and RuntimeError, of which only the CUDA driver's
    refusals count (:func:`is_launch_failure`; :func:`_on_launch_failure` re-raises the rest)."""
    return _triton_failures() + (RuntimeError,)


#: The CUDA driver's refusal of a launch whose registers x threads exceed what an SM holds
#: (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES); Triton raises it as a plain RuntimeError.
LAUNCH_RESOURCE_ERRORS = ("too many resources requested for launch", "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES")


def is_launch_failure(err: BaseException) -> bool:
    """True for errors that mean "this kernel cannot be built or run on this GPU" (never a wrong argument,
    never a CUDA out-of-memory)."""
    if isinstance(err, _triton_failures()):
        return True
    return type(err) is RuntimeError and any(m in str(err) for m in LAUNCH_RESOURCE_ERRORS)


def _describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return f"the Triton CPU interpreter ({device})"
    props = device_props(device)
    return f"{props.name} ({props.arch}, {props.smem_per_block} B shared memory per block)"


def _on_launch_failure(err: BaseException, key: tuple, device: torch.device, what: str, config) -> None:
    """Strict mode: raise. Otherwise warn once for this shape class, remember it, raise KernelFallback.
    An error that is no launch failure (:func:`is_launch_failure`) is raised as itself."""
    if not is_launch_failure(err):
        raise err
    detail = f"{what} with {config} on {_describe_device(device)}: {type(err).__name__}: {err}"
    if strict_mode():
        raise RuntimeError(f"pica_kernels: the Triton kernel failed for {detail} ({STRICT_ENV_VAR}=1)") from err
    message = (
        f"pica_kernels: the Triton kernel failed for {detail}. This shape class runs on the reference "
        f"(PyTorch) path from now on; set {STRICT_ENV_VAR}=1 to raise instead, and please report it."
    )
    FALLBACK_SHAPE_CLASSES[key] = message
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    raise KernelFallback(message) from err


class Grid(NamedTuple):
    """The launch grid of one launch: ``(tiles, split_k)`` programs and what the kernel needs to map them."""

    seg_len: int
    tiles_per_seg: int
    num_row_tiles: int
    tiles: int
    split_k: int
    depth_per_split: int


def plan_grid(rows: int, cols: int, depth: int, blocks: dict, props, *, seg_len: int | None = None,
              segmented: bool = False, split_k: int | None = None) -> Grid:
    """Output tiles and split-K of a launch with ``blocks`` (a config's kwargs) on ``props`` (a
    :class:`~.configs.DeviceProps`; None for the CPU interpreter). Pure: ahead-of-time checks call it with
    :data:`~.configs.GPU_TABLE` entries. Split-K follows :func:`~.configs.choose_split_k` (only below one
    wave of tiles) unless ``split_k`` is given; segmented (multi-task) launches never split."""
    if seg_len is None:
        seg_len = rows
    tiles_per_seg = cdiv(seg_len, blocks["BLOCK_ROWS"])
    num_row_tiles = (rows // seg_len) * tiles_per_seg if segmented else tiles_per_seg
    tiles = num_row_tiles * cdiv(cols, blocks["BLOCK_COLS"])
    depth_blocks = cdiv(depth, blocks["BLOCK_DEPTH"])
    if segmented:
        split_k = 1
    elif split_k is None:
        split_k = choose_split_k(tiles, depth_blocks, props)
    # depth == 0 (a backward over zero tokens: dA = dy.T @ t reduces over nothing) still launches
    # one split, which writes the bias / low-rank term (zeros for dA) over every output element.
    depth_per_split = max(1, cdiv(depth_blocks, max(1, split_k))) * blocks["BLOCK_DEPTH"]
    split_k = max(1, cdiv(depth, depth_per_split))
    return Grid(seg_len, tiles_per_seg, num_row_tiles, tiles, split_k, depth_per_split)


def launch_lowrank_gemm(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    factor_up: torch.Tensor | None = None,
    factor_down: torch.Tensor | None = None,
    t_out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tasks: torch.Tensor | None = None,
    seg_len: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Write ``out = x @ weight [+ low-rank term] [+ bias]`` (rows, cols) in place; returns ``out``.

    x (rows, depth), weight (depth, cols): any strides (pass ``W.T`` as a view).
    The mode follows from the arguments:
      PLAIN     neither ``t`` nor ``factor_down``;
      CONCAT_K  ``t`` (rows, rank) with ``factor_up`` (rank, cols) -- or (tasks, rank, cols) with
                ``tasks`` (rows // seg_len,) int32 and ``seg_len``;
      DECODE    ``factor_down`` (depth, rank) with ``factor_up`` (rank, cols) and ``t_out``
                (rows, rank) receiving ``x @ factor_down`` rounded to x's dtype.
    bias: (cols,). ``split_k`` splits the depth loop over that many programs per tile (not with
    ``tasks``); default: chosen so that launches with few output tiles and a long depth (the decode
    form, the shrink ``x @ P.T`` at moderate T, ``dA = dy.T @ t``, ``dB = s.T @ x``) fill the GPU.
    Raises :class:`KernelFallback` when this launch's shape class fails (or failed before) to compile or
    launch on this device, unless ``PICA_KERNELS_STRICT=1`` (then RuntimeError).
    """
    rows, depth = x.shape
    cols = weight.shape[1]
    if rows == 0 or cols == 0:
        return out
    for name, v in (("x", x), ("weight", weight), ("t", t), ("factor_up", factor_up),
                    ("factor_down", factor_down), ("out", out), ("t_out", t_out)):
        # The kernel computes element offsets in int32.
        if v is not None and sum((d - 1) * abs(st) for d, st in zip(v.shape, v.stride())) >= 2**31:
            raise NotImplementedError(f"{name} {tuple(v.shape)} spans >= 2**31 elements; split the batch")
    # bias and tasks are read with unit stride (a few hundred bytes: copy if needed).
    bias = bias.contiguous() if bias is not None else None
    tasks = tasks.contiguous() if tasks is not None else None
    if factor_down is not None:
        mode, rank = Mode.DECODE, factor_down.shape[1]
        if rank > 256:
            raise ValueError(f"the decode form keeps t in registers: r <= 256, got {rank}")
    elif t is not None:
        mode, rank = Mode.CONCAT_K, t.shape[1]
    else:
        mode, rank = Mode.PLAIN, 0

    kernels = kernel_module()
    if x.device.type == "cpu" and not kernels.INTERPRETED:
        raise RuntimeError(
            "the Triton kernels were decorated in compiler mode (TRITON_INTERPRET was not set when "
            "pica_kernels first launched one), so they cannot run on CPU tensors in this process; "
            "set TRITON_INTERPRET=1 before the first launch"
        )
    # The factors' dtype for the config: the wider of the two (DECODE loads factor_down in the depth loop
    # and factor_up after it; on the output side one is an fp32 M, the other the x-dtype basis).
    factors = [f.dtype for f in (factor_up, factor_down) if f is not None] or [weight.dtype]
    factor_dtype = max(factors, key=lambda dt: dt.itemsize)
    recording = _RECORDING.get() if x.device.type == "meta" else None
    if recording is not None:
        props = recording[0]
    else:
        props = device_props(x.device) if x.device.type == "cuda" else None
    config = select_config(rows, cols, depth, rank, mode, (x.dtype, weight.dtype, factor_dtype), props,
                           interpreted=kernels.INTERPRETED)
    if x.device.type == "cuda" and autotune.autotune_enabled() and not override_active():
        # PICA_KERNELS_AUTOTUNE=1 (see autotune.py); inside an override (tests, sweeps, the candidates' own
        # runs) the override stands.
        select_args = (rows, cols, depth, rank, mode, (x.dtype, weight.dtype, factor_dtype))
        best = autotune.best_config(
            select_args, props, (bias is not None, tasks is not None, _precision(x.dtype)),
            lambda: launch_lowrank_gemm(out, x, weight, t=t, factor_up=factor_up, factor_down=factor_down,
                                        t_out=t_out, bias=bias, tasks=tasks, seg_len=seg_len, split_k=split_k))
        with config_override(**best):
            config = select_config(*select_args, props)
    blocks = config.kwargs
    operand_dtypes = {v.dtype for v in (x, weight, t, factor_up, factor_down) if v is not None}
    cast_f32 = kernels.INTERPRETED and torch.bfloat16 in operand_dtypes
    precision = _precision(x.dtype)
    # One compiled kernel per key: its failure (compile, resources) is the failure of every launch with it.
    key = (str(x.device) if props is None else props.arch, mode, x.dtype, weight.dtype, *factors,
           bias is not None, tasks is not None, cast_f32, precision, tuple(sorted(config.all_kwargs().items())))
    if key in FALLBACK_SHAPE_CLASSES:
        raise KernelFallback(FALLBACK_SHAPE_CLASSES[key])

    grid = plan_grid(rows, cols, depth, blocks, props, seg_len=seg_len, segmented=tasks is not None,
                     split_k=split_k)
    seg_len, tiles_per_seg, num_row_tiles, tiles = grid.seg_len, grid.tiles_per_seg, grid.num_row_tiles, grid.tiles
    split_k, depth_per_split = grid.split_k, grid.depth_per_split
    final_out, final_t = out, t_out
    if split_k > 1:
        # Every split writes its full tile (zeros where its depth range is empty), so no init.
        out = torch.empty((split_k, rows, cols), dtype=torch.float32, device=out.device)
        if mode == Mode.DECODE:
            t_out = torch.empty((split_k, rows, rank), dtype=torch.float32, device=out.device)
    dummy = out
    up_strides = (0, 0, 0)
    if factor_up is not None:
        up_strides = (factor_up.stride(-2), factor_up.stride(-1), factor_up.stride(0) if factor_up.dim() == 3 else 0)
    args = (
        x, weight,
        t if t is not None else dummy,
        factor_up if factor_up is not None else dummy,
        factor_down if factor_down is not None else dummy,
        bias if bias is not None else dummy,
        out,
        t_out if t_out is not None else dummy,
        tasks if tasks is not None else dummy,
        rows, cols, depth, rank,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        *(t.stride() if t is not None else (0, 0)),
        *up_strides,
        *(factor_down.stride() if factor_down is not None else (0, 0)),
        out.stride(-2), out.stride(-1),
        *((t_out.stride(-2), t_out.stride(-1)) if t_out is not None else (0, 0)),
        seg_len, tiles_per_seg, num_row_tiles,
        depth_per_split, out.stride(0) if split_k > 1 else 0,
        t_out.stride(0) if split_k > 1 and mode == Mode.DECODE else 0,
    )
    constexprs = dict(MODE=int(mode), HAS_BIAS=bias is not None, HAS_TASKS=tasks is not None, CAST_F32=cast_f32,
                      PRECISION=precision, **config.all_kwargs())
    try:
        if recording is not None:
            recording[1].append(((tiles, split_k), args, constexprs))
        else:
            kernels.lowrank_gemm_kernel[(tiles, split_k)](*args, **constexprs)
    except _launch_failures() as err:
        what = f"{mode.name} rows={rows} cols={cols} depth={depth} rank={rank} {x.dtype}"
        _on_launch_failure(err, key, x.device, what, config)
    if split_k > 1:
        final_out.copy_(out.sum(0))  # fixed-order reduction of the partials: deterministic
        if mode == Mode.DECODE:
            final_t.copy_(t_out.sum(0))
    return final_out


def use_decode(t_rows: int, rank: int) -> bool:
    return 0 < t_rows <= DECODE_MAX_T and rank <= DECODE_MAX_R


def triton_forward(x, weight, bias, a, b, *, decode: bool | None = None, rank_align: int | None = None):
    """x (T, in), weight (out, in), bias (out,)|None, a (out, r), b (r, in) -> (y (T, out), t (T, r)), x.dtype.

    A rank that is not a multiple of ``rank_align`` (default 16) runs padded (:mod:`.padding`): the launches
    see the cached zero-padded factors and rank rp; ``t`` is the (T, r) view of the (T, rp) buffer written.
    """
    rows, rank = x.shape[0], a.shape[1]
    a_p, b_p = pad_rank_dim(a, 1, rank_align), pad_rank_dim(b, 0, rank_align)
    y = alloc((rows, weight.shape[0]), x.dtype, x.device)
    t_p, t = padded_view((rows,), rank, lambda shape: alloc(shape, x.dtype, x.device), rank_align)
    if decode is None:
        decode = use_decode(rows, rank)
    if decode:
        launch_lowrank_gemm(y, x, weight.T, factor_down=b_p.T, factor_up=a_p.T, t_out=t_p, bias=bias)
    else:
        launch_lowrank_gemm(t_p, x, b_p.T)
        launch_lowrank_gemm(y, x, weight.T, t=t_p, factor_up=a_p.T, bias=bias)
    return y, t


def triton_backward(dy, x, t, weight, a, b, need_dx, need_da, need_db):
    """dy (T, out), x (T, in)|None, t (T, r) -> (dx (T, in), dA (out, r), dB (r, in)); unneeded ones are None.

    dA and dB are accumulated in fp32 and returned in a's / b's own dtype, at their true shape. A rank
    that is not a multiple of 16 runs padded (:mod:`.padding`); ``t`` is read at the padded width where
    its storage has room (the forward's t does), else at width r.
    """
    dx = da = db = None
    s = None
    rank = a.shape[1]
    a_p, b_p = pad_rank_dim(a, 1), pad_rank_dim(b, 0)
    width = a_p.shape[1]
    if need_dx or need_db:
        # s = dy @ A at width rp: its padding columns are exact zeros (A's are).
        s = launch_lowrank_gemm(alloc((dy.shape[0], width), dy.dtype, dy.device), dy, a_p)
    if need_dx:
        dx = alloc((dy.shape[0], weight.shape[1]), dy.dtype, dy.device)
        launch_lowrank_gemm(dx, dy, weight, t=s, factor_up=b_p)
    if need_da:
        t_wide = widen_cols(t, width)
        da = alloc((a.shape[0], t_wide.shape[1]), torch.float32, dy.device)
        launch_lowrank_gemm(da, dy.T, t_wide)  # column j of dA reads column j of t only
        da = da[:, :rank].to(a.dtype).contiguous()
    if need_db:
        db = alloc((width, b.shape[1]), torch.float32, dy.device)
        launch_lowrank_gemm(db, s.T, x)
        db = db[:rank].to(b.dtype)
    return dx, da, db


def triton_grouped_forward(x, weights, biases, a, b_cat, ranks, rank_align: int | None = None) -> list[torch.Tensor]:
    """Projections sharing x: x (T, in), weights[i] (out_i, in), biases[i] (out_i,)|None, a[i] (out_i, r_i),
    b_cat (sum r_i, in) -> [y_i (T, out_i)] + [t], t last: (T, sum padded_rank(r_i)), each projection's
    r_i columns at the start of its slot (:func:`.padding.slot_offsets`).

    One shrink launch for every projection against ``B_cat`` padded slot by slot (cached: once per basis),
    then one CONCAT_K launch per projection reading its slot of t (a strided view, no copy).
    """
    b_pad = pad_rank_slots(b_cat, ranks, 0, rank_align)
    offs = slot_offsets(ranks, rank_align)
    t = alloc((x.shape[0], b_pad.shape[0]), x.dtype, x.device)
    launch_lowrank_gemm(t, x, b_pad.T)
    ys = []
    for lo, w, bias, ai in zip(offs, weights, biases, a):
        ai = pad_rank_dim(ai, 1, rank_align)
        y = alloc((x.shape[0], w.shape[0]), x.dtype, x.device)
        ys.append(launch_lowrank_gemm(y, x, w.T, t=t[:, lo:lo + ai.shape[1]], factor_up=ai.T, bias=bias))
    return [*ys, t]


def triton_multitask_forward(x, weight, bias, m_stack, basis, adapter_ids, rank_align: int | None = None):
    """One adapter per sequence: x (B, S, in), weight (out, in), bias (out,)|None, m_stack (n, out, r),
    basis (r, in), adapter_ids (B,) -> (y (B, S, out), t (B, S, r)), t the view of a buffer padded to
    ``padded_rank(r)``.

    One shrink against the shared basis for every adapter, then one CONCAT_K launch whose row segments
    (one sequence each) take the ``M`` of their adapter. The basis and the M's run rank-padded (cached
    zero-padded copies).
    """
    nseq, seq_len, in_f = x.shape
    rank = basis.shape[0]
    x2 = x.reshape(nseq * seq_len, in_f)
    basis_p, m_p = pad_rank_dim(basis, 0, rank_align), pad_rank_dim(m_stack, 2, rank_align)
    t_p, t = padded_view((x2.shape[0],), rank, lambda shape: alloc(shape, x.dtype, x.device), rank_align)
    launch_lowrank_gemm(t_p, x2, basis_p.T)
    y = alloc((x2.shape[0], weight.shape[0]), x.dtype, x.device)
    if seq_len > 0:
        launch_lowrank_gemm(y, x2, weight.T, t=t_p, factor_up=m_p.transpose(1, 2), bias=bias,
                            tasks=adapter_ids.to(torch.int32), seg_len=seq_len)
    return y.view(nseq, seq_len, weight.shape[0]), t.unflatten(0, (nseq, seq_len))
