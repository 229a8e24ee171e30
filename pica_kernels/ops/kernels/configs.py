"""The per-regime heuristic: block sizes, stages and warps of :func:`~.lowrank_gemm.lowrank_gemm_kernel`.

Importable without triton. Pure functions of the launch shape, the operand dtypes and a
:class:`DeviceProps` -- at run time from :func:`device_props` (``torch.cuda.get_device_properties``),
ahead of time from :data:`GPU_TABLE` (one entry per architecture) -- so the ahead-of-time compile gate
(``tools/aot.py``) gets exactly the configs a user's GPU would launch. Every GPU config fits the device's
shared memory by construction (:func:`estimate_shared_memory` <= ``DeviceProps.smem_per_block``).

:func:`heuristic_config` is the heuristic alone; the table of tuned configs (:mod:`.tuned`) may replace
its choice, and :func:`~.launchers.select_config` combines the two with :func:`config_override`, which
tests and tuning sweeps use to force block sizes. The measurements behind the constants below are in
docs/kernels.md ("Why the configs are what they are").
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools

import torch


class Mode(enum.IntEnum):
    """What one launch of the kernel computes (``out`` is (rows, cols))."""

    PLAIN = 0  # out = x @ weight [+ bias]
    CONCAT_K = 1  # out = [x | t] @ [weight ; factor_up] [+ bias]
    DECODE = 2  # t = x @ factor_down in the same depth loop; out = x @ weight + t @ factor_up [+ bias]


@dataclasses.dataclass(frozen=True)
class DeviceProps:
    """What the configs depend on. ``smem_per_block``: the opt-in maximum of shared memory per block, bytes."""

    name: str
    capability: tuple[int, int]
    smem_per_block: int
    sm_count: int

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


#: One representative GPU per architecture, for ahead-of-time checks (no GPU needed). Shared memory is
#: the opt-in per-block maximum of the CUDA programming guide; the SM count is that of the GPU named
#: (it only decides split-K).
GPU_TABLE: dict[str, DeviceProps] = {
    "sm_75": DeviceProps("Tesla T4", (7, 5), 64 * 1024, 40),
    "sm_80": DeviceProps("A100", (8, 0), 163 * 1024, 108),
    "sm_86": DeviceProps("A10 / A40 / RTX 3090", (8, 6), 99 * 1024, 72),
    "sm_89": DeviceProps("L4 / L40S / RTX 4090", (8, 9), 99 * 1024, 58),
    "sm_90": DeviceProps("H100 / H200", (9, 0), 227 * 1024, 132),
    "sm_100": DeviceProps("B200", (10, 0), 227 * 1024, 148),
    "sm_120": DeviceProps("RTX 5090", (12, 0), 99 * 1024, 170),
}


@functools.lru_cache(maxsize=16)
def device_props(device: torch.device) -> DeviceProps:
    """:class:`DeviceProps` of a CUDA device, read at run time (cached per device)."""
    p = torch.cuda.get_device_properties(device)
    cap = (p.major, p.minor)
    smem = getattr(p, "shared_memory_per_block_optin", 0)
    if not smem:  # older torch: the table's value for the architecture, else the 48 KB every GPU has
        smem = GPU_TABLE.get(f"sm_{cap[0]}{cap[1]}", DeviceProps("", cap, 48 * 1024, 1)).smem_per_block
    return DeviceProps(p.name, cap, int(smem), int(p.multi_processor_count))


def bf16_tensor_cores(props: DeviceProps) -> bool:
    """bf16 ``tl.dot`` needs sm_80 or newer (sm_75 has no bf16 tensor cores; Triton refuses to compile it)."""
    return props.capability >= (8, 0)


#: The names a config (and :func:`config_override`) may set.
BLOCK_NAMES = ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_DEPTH", "BLOCK_RANK", "GROUP_ROWS")

# Block sizes for the CPU interpreter: one numpy step per program per depth
# step (~5-15 ms), so large tiles and few programs keep the tests fast; tests
# shrink them with config_override to exercise multi-tile masking.
INTERPRETER_BLOCKS = {"BLOCK_ROWS": 32, "BLOCK_COLS": 32, "BLOCK_DEPTH": 32, "GROUP_ROWS": 4}

_override: contextvars.ContextVar[tuple] = contextvars.ContextVar("pica_kernels_config_override", default=())


@contextlib.contextmanager
def config_override(**settings):
    """Force block sizes (and ``num_warps`` / ``num_stages``) of every launch inside the ``with`` block.

    Keys: ``BLOCK_ROWS``, ``BLOCK_COLS``, ``BLOCK_DEPTH``, ``BLOCK_RANK``, ``GROUP_ROWS``,
    ``num_warps``, ``num_stages``; block sizes are powers of two >= 16 (``tl.dot``'s minimum;
    DECODE launches need ``BLOCK_RANK`` >= r), ``GROUP_ROWS`` >= 1. Nested overrides combine,
    the inner one winning. An override is applied as given (no shared-memory fit). Meant for
    tests (several tiles in every dimension on small shapes) and tuning sweeps; also usable as
    a decorator.
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


#: Added to every estimate: mbarriers and scratch beyond the tile buffers (docs/kernels.md, "Shared memory").
SMEM_RESERVE = 1024


def estimate_shared_memory(blocks: dict, num_stages: int, mode: Mode, x_bytes: int, weight_bytes: int,
                           factor_bytes: int, capability: tuple[int, int] = (8, 0)) -> int:
    """Shared memory (bytes) of one program: the tiles one iteration of a pipelined loop loads, times the
    buffers Triton keeps of them (:func:`pipeline_buffers`), for the larger of the two loops (depth; CONCAT_K's
    rank loop), plus :data:`SMEM_RESERVE`.

    Equal to the compiled kernels' ``metadata.shared`` up to the reserve for 16-bit operands, above it (a
    safe side) where the factor counted is not the one the loop stages or the two loops' buffers partly
    coexist: the checked cases are in docs/kernels.md ("Shared memory").
    """
    bm, bn, bk, br = blocks["BLOCK_ROWS"], blocks["BLOCK_COLS"], blocks["BLOCK_DEPTH"], blocks["BLOCK_RANK"]
    depth_stage = bm * bk * x_bytes + bk * bn * weight_bytes
    if mode == Mode.DECODE:
        depth_stage += bk * br * factor_bytes
    rank_stage = bm * br * x_bytes + br * bn * factor_bytes if mode == Mode.CONCAT_K else 0
    return pipeline_buffers(num_stages, bm, capability) * max(depth_stage, rank_stage) + SMEM_RESERVE


def pipeline_buffers(num_stages: int, block_rows: int, capability: tuple[int, int]) -> int:
    """Shared-memory buffers Triton keeps per pipelined operand: ``num_stages`` for the wgmma (sm_90) /
    tcgen05 (sm_100) pipeline, which those architectures use for tiles of >= 64 rows; ``num_stages - 1`` for
    the cp.async pipeline of ``mma.sync`` -- sm_80..sm_89, sm_120 (no wgmma), sm_90 / sm_100 tiles of < 64
    rows, and sm_75 (FMA dots), counted like sm_80 (above what it uses)."""
    wgmma = (9, 0) <= tuple(capability) < (11, 0) and block_rows >= 64  # sm_90 wgmma, sm_100 tcgen05
    return num_stages if wgmma else max(1, num_stages - 1)


def block_rank(mode: Mode, rank: int, block_depth: int, block_rows: int = 64) -> int:
    """BLOCK_RANK: DECODE holds all of t in one tile (>= rank); CONCAT_K steps over the rank with it, a step
    no wider than the rank's tile (r = 16 does not pay for a 64-wide masked tile), than 64 (wider steps
    spilled registers at T <= 16), and than 32 for 16-row tiles (64-wide steps spilled there; docs/kernels.md,
    "Rank step")."""
    if mode == Mode.DECODE:
        return max(16, next_pow2(rank))
    return min(block_depth, 64 if block_rows > 16 else 32, max(16, next_pow2(rank)))


def regime(rows: int, cols: int, mode: Mode) -> str:
    """The regime of a launch: ``decode`` (DECODE launches), ``small`` (rows <= 16: decode-time launches
    of the two-launch form and their backward), ``mid`` (rows <= 64), ``prefill``; a ``narrow-`` prefix
    when the output has <= 64 columns (the shrink ``x @ P.T`` and ``s = dy @ A`` have cols = r; dA has
    cols = r and a depth of T tokens)."""
    if mode == Mode.DECODE:
        base = "decode"
    elif rows <= 16:
        base = "small"
    elif rows <= 64:
        base = "mid"
    else:
        base = "prefill"
    return f"narrow-{base}" if cols <= 64 and mode != Mode.DECODE else base


def _gpu_blocks(reg: str, cols: int, x_bytes: int, props: DeviceProps, weight_bytes: int = 2) -> tuple[dict, int, int]:
    """Starting point per regime (before the shared-memory fit): blocks, num_warps, num_stages."""
    wide = x_bytes == 4  # fp32 operands: half the depth per step for the same bytes
    base = reg.removeprefix("narrow-")
    if base in ("decode", "small"):
        blocks = {"BLOCK_ROWS": 16, "BLOCK_COLS": 64, "BLOCK_DEPTH": 64 if wide else 128, "GROUP_ROWS": 1}
        warps, stages = 4, 4
    elif base == "mid":
        blocks = {"BLOCK_ROWS": 64, "BLOCK_COLS": 128, "BLOCK_DEPTH": 32 if wide else 64, "GROUP_ROWS": 8}
        # Three stages on 99 KB parts, as for prefill: a fourth spilled registers there (docs/kernels.md).
        warps, stages = 4, 4 if props.smem_per_block >= 160 * 1024 else 3
    else:
        blocks = {"BLOCK_ROWS": 128, "BLOCK_COLS": 128, "BLOCK_DEPTH": 32 if wide else 64, "GROUP_ROWS": 8}
        warps = 8
        # A100/H100-class shared memory holds a fourth stage; 99 KB parts take three.
        stages = 4 if props.smem_per_block >= 160 * 1024 else 3
    if reg.startswith("narrow-"):
        # Narrow outputs (cols = r) get narrow tiles instead of masked-off columns; the depth (in, or
        # T for dA) is long, so take deeper steps with the bytes the narrow tile frees.
        blocks["BLOCK_COLS"] = max(16, next_pow2(cols))
        # Not with an fp32 right operand (M) cast in registers, whose deeper steps spilled; on sm_100 /
        # sm_120 that operand takes half the depth step (docs/kernels.md, "Narrow tiles").
        if weight_bytes <= x_bytes:
            blocks["BLOCK_DEPTH"] = min(2 * blocks["BLOCK_DEPTH"], 128)
        elif props.capability >= (10, 0):
            blocks["BLOCK_DEPTH"] //= 2
    return blocks, warps, stages


def _fit(blocks: dict, warps: int, stages: int, mode: Mode, rank: int, sizes: tuple[int, int, int],
         device: DeviceProps) -> tuple[dict, int, int]:
    """Shrink until :func:`estimate_shared_memory` <= the device's limit: stages down to 3, the depth step
    down to 64, stages down to 2, the depth step down to 32, then the column tile, then the row tile."""
    while True:
        blocks["BLOCK_RANK"] = block_rank(mode, rank, blocks["BLOCK_DEPTH"], blocks["BLOCK_ROWS"])
        if estimate_shared_memory(blocks, stages, mode, *sizes, device.capability) <= device.smem_per_block:
            return blocks, warps, stages
        if stages > 3:
            stages -= 1
        elif blocks["BLOCK_DEPTH"] > 64:
            blocks["BLOCK_DEPTH"] //= 2
        elif stages > 2:
            stages -= 1
        elif blocks["BLOCK_DEPTH"] > 32:
            blocks["BLOCK_DEPTH"] //= 2
        elif blocks["BLOCK_COLS"] > 32:
            blocks["BLOCK_COLS"] //= 2
        elif blocks["BLOCK_ROWS"] > 16:
            blocks["BLOCK_ROWS"] //= 2
            warps = max(4, warps // 2)
        else:
            raise ValueError(f"no config of {mode.name} with r={rank} fits {device.smem_per_block} B of shared "
                             f"memory on {device.arch}")


def heuristic_config(rows: int, cols: int, rank: int, mode: Mode, dtypes: tuple[torch.dtype, ...],
                     device: DeviceProps | None, *, interpreted: bool = False) -> tuple[dict, int, int]:
    """(blocks, num_warps, num_stages) of the per-regime heuristic for a launch writing (rows, cols) with
    ``rank`` (0 for PLAIN); blocks holds the five :data:`BLOCK_NAMES`.

    dtypes: (x, weight, factor) element types; factor = the wider of factor_up / factor_down (an fp32 ``M``
    with 16-bit x), the weight's for PLAIN launches. ``interpreted``: the CPU interpreter's large tiles
    (``device`` is ignored); otherwise the launch's tile shape per :func:`regime`, shrunk to fit
    ``device.smem_per_block`` (:func:`estimate_shared_memory`).
    """
    if interpreted:
        blocks = dict(INTERPRETER_BLOCKS)
        if mode == Mode.DECODE:
            blocks["BLOCK_ROWS"] = 16
        blocks["BLOCK_RANK"] = block_rank(mode, rank, blocks["BLOCK_DEPTH"], blocks["BLOCK_ROWS"])
        return blocks, 4, 1
    if device is None:
        raise ValueError("the GPU heuristic needs the DeviceProps of the GPU (or interpreted=True)")
    x_bytes, weight_bytes, factor_bytes = (dt.itemsize for dt in dtypes)
    blocks, warps, stages = _gpu_blocks(regime(rows, cols, mode), cols, x_bytes, device, weight_bytes)
    return _fit(blocks, warps, stages, mode, rank, (x_bytes, weight_bytes, factor_bytes), device)


def override_active() -> bool:
    """True inside a :func:`config_override` block."""
    return bool(_override.get())


def apply_override(blocks: dict, warps: int, stages: int, mode: Mode, rank: int) -> tuple[dict, int, int]:
    """(blocks, num_warps, num_stages) with the active :func:`config_override` applied, unfitted; BLOCK_RANK
    follows :func:`block_rank` for the overridden tiles unless the override sets it."""
    override = dict(_override.get())
    if not override:
        return blocks, warps, stages
    warps = override.pop("num_warps", warps)
    stages = override.pop("num_stages", stages)
    blocks = {**blocks, **override}
    if "BLOCK_RANK" not in override:
        blocks["BLOCK_RANK"] = block_rank(mode, rank, blocks["BLOCK_DEPTH"], blocks["BLOCK_ROWS"])
    return blocks, warps, stages


def choose_split_k(tiles: int, depth_blocks: int, device: DeviceProps | None) -> int:
    """How many programs share the depth loop of each output tile.

    Only when the launch has less than one wave of tiles (tiles < SMs; a launch that fills the GPU gains
    nothing from fp32 partials -- e.g. k/v at N = 1024, T = 4096 have 256 tiles on 132 SMs) and the depth
    is long (>= 8 steps). Each split keeps >= 4 depth steps so the partial-sum traffic (split x rows x
    cols fp32) stays small next to the operands it replaces reading serially.
    """
    if device is None or tiles >= device.sm_count or depth_blocks < 8:
        return 1
    return max(1, min(-(-device.sm_count // tiles), depth_blocks // 4, 64))
