"""Block sizes, stages and warps of :func:`~.lowrank_gemm.lowrank_gemm_kernel`, per regime, as ``triton.Config``.

Importable without triton (``triton.Config`` is built inside the functions).
Tests override the block sizes with :func:`config_override` instead of
patching launcher internals.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum

import torch


class Mode(enum.IntEnum):
    """What one launch of the kernel computes (``out`` is (rows, cols))."""

    PLAIN = 0  # out = x @ weight [+ bias]
    CONCAT_K = 1  # out = [x | t] @ [weight ; factor_up] [+ bias]
    DECODE = 2  # t = x @ factor_down in the same depth loop; out = x @ weight + t @ factor_up [+ bias]


#: The names a config (and :func:`config_override`) may set.
BLOCK_NAMES = ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_DEPTH", "GROUP_ROWS")

# Block sizes for the CPU interpreter: one numpy step per program per depth
# step (~5-15 ms), so large tiles and few programs keep the tests fast; tests
# shrink them with config_override to exercise multi-tile masking.
INTERPRETER_BLOCKS = {"BLOCK_ROWS": 32, "BLOCK_COLS": 32, "BLOCK_DEPTH": 32, "GROUP_ROWS": 4}

_override: contextvars.ContextVar[tuple] = contextvars.ContextVar("pica_kernels_config_override", default=())


@contextlib.contextmanager
def config_override(**settings):
    """Force block sizes (and ``num_warps`` / ``num_stages``) of every launch inside the ``with`` block.

    Keys: ``BLOCK_ROWS``, ``BLOCK_COLS``, ``BLOCK_DEPTH``, ``GROUP_ROWS``,
    ``num_warps``, ``num_stages``; block sizes are powers of two >= 16 (``tl.dot``'s
    minimum), ``GROUP_ROWS`` >= 1. Nested overrides combine, the inner one winning.
    Meant for tests (several tiles in every dimension on small shapes) and tuning sweeps.
    """
    allowed = (*BLOCK_NAMES, "num_warps", "num_stages")
    for key, value in settings.items():
        if key not in allowed:
            raise ValueError(f"config_override: unknown key {key!r}; expected one of {allowed}")
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config_override: {key} must be a positive int, got {value!r}")
        if key.startswith("BLOCK_") and (value < 16 or value & (value - 1)):
            raise ValueError(f"config_override: {key} must be a power of two >= 16, got {value}")
    token = _override.set(tuple({**dict(_override.get()), **settings}.items()))
    try:
        yield
    finally:
        _override.reset(token)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def select_config(rows: int, cols: int, mode: Mode, dtype: torch.dtype, *, interpreted: bool):
    """The ``triton.Config`` for a launch writing ``out`` (rows, cols) of ``dtype`` operands.

    Keys: BLOCK_ROWS, BLOCK_COLS, BLOCK_DEPTH, GROUP_ROWS (+ num_warps, num_stages).
    An active :func:`config_override` is applied last.
    """
    import triton

    if interpreted:
        blocks = dict(INTERPRETER_BLOCKS)
        if mode == Mode.DECODE:
            blocks["BLOCK_ROWS"] = 16
        warps, stages = 4, 1
    else:
        # GPU: one config per regime, no autotune (a sweep belongs in benchmarks/).
        wide = dtype == torch.float32
        if mode == Mode.DECODE or rows <= 16:
            blocks = {"BLOCK_ROWS": 16, "BLOCK_COLS": 64, "BLOCK_DEPTH": 64 if wide else 128, "GROUP_ROWS": 1}
            warps, stages = 4, 4
        elif rows <= 64:
            blocks = {"BLOCK_ROWS": 64, "BLOCK_COLS": 128, "BLOCK_DEPTH": 32 if wide else 64, "GROUP_ROWS": 8}
            warps, stages = 4, 4
        else:
            blocks = {"BLOCK_ROWS": 128, "BLOCK_COLS": 128, "BLOCK_DEPTH": 32 if wide else 64, "GROUP_ROWS": 8}
            warps, stages = 8, 3
        # Narrow outputs (cols = r) get narrow tiles instead of masked-off columns.
        blocks["BLOCK_COLS"] = min(blocks["BLOCK_COLS"], max(16, next_pow2(cols)))
    override = dict(_override.get())
    warps = override.pop("num_warps", warps)
    stages = override.pop("num_stages", stages)
    blocks.update(override)
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def block_rank(mode: Mode, rank: int, block_depth: int) -> int:
    """BLOCK_RANK: DECODE holds all of t in one tile (>= rank); CONCAT_K steps over rank with it --
    r = 16 should not pay for a 64-wide masked tile."""
    if mode == Mode.DECODE:
        return max(16, next_pow2(rank))
    return min(block_depth, max(16, next_pow2(rank)))
