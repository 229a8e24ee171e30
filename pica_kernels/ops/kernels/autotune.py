"""Run-time autotuning (``PICA_KERNELS_AUTOTUNE=1``) and the candidate configs a tuning sweep times.

Off by default: it times candidates on the first launch of every shape bucket, so results then depend on
timing noise. :func:`candidate_configs` lists the configs worth timing for a launch (the heuristic's
first), :func:`median_ms` times one, :func:`pick_fastest` keeps the fastest; ``benchmarks/gpu_tune.py``
uses the same three to write the tuned-config table (:mod:`.tuned`) on a GPU.

Importable without triton.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..env import env_flag
from . import tuned
from .configs import DeviceProps, Mode, config_override, heuristic_config, next_pow2, regime

ENV_AUTOTUNE = "PICA_KERNELS_AUTOTUNE"


def autotune_enabled() -> bool:
    """True when ``PICA_KERNELS_AUTOTUNE=1``."""
    return env_flag(ENV_AUTOTUNE)


#: Options per regime for the sweep (benchmarks/gpu_tune.py) and run-time autotuning. Narrow regimes fix
#: BLOCK_COLS to the output width; DECODE fixes BLOCK_RANK to the rank's tile.
_SPACE = {
    "decode": dict(rows=(16, 32), cols=(32, 64, 128), depth=(64, 128, 256), warps=(4, 8), stages=(2, 3, 4, 5)),
    "small": dict(rows=(16, 32), cols=(32, 64, 128), depth=(64, 128, 256), warps=(4, 8), stages=(2, 3, 4, 5)),
    "mid": dict(rows=(32, 64), cols=(64, 128, 256), depth=(32, 64, 128), warps=(4, 8), stages=(3, 4, 5)),
    "prefill": dict(rows=(64, 128, 256), cols=(64, 128, 256), depth=(32, 64, 128), warps=(4, 8), stages=(3, 4, 5)),
}
#: fp32 accumulator elements per thread a candidate may hold (rows x cols / (32 x warps)): a rule of thumb --
#: 128 of the 255 registers leave room for the operand fragments (the heuristic's prefill tile compiled to
#: 254 registers); the compile gate's register counts (docs/kernels.md) can refine it.
MAX_ACC_PER_THREAD = 128


def _distance(a: dict, b: dict) -> int:
    def lg(v):
        return max(0, int(v)).bit_length()

    return sum(abs(lg(a[k]) - lg(b[k])) for k in ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_DEPTH", "num_warps")) + abs(
        a["num_stages"] - b["num_stages"])


def candidate_configs(rows: int, cols: int, depth: int, rank: int, mode: Mode, dtypes: Sequence[torch.dtype],
                      device: DeviceProps, limit: int | None = None) -> list[dict]:
    """Configs worth timing for this launch on ``device``, the heuristic's first, then the others nearest
    to it; pruned by the shared-memory model (:func:`.tuned.fits`) and :data:`MAX_ACC_PER_THREAD` before anything
    is compiled. Each is a flat dict of :data:`CONFIG_KEYS` (``config_override(**c)`` applies it)."""
    reg = regime(rows, cols, mode)
    base = reg.removeprefix("narrow-")
    space = _SPACE[base]
    blocks, warps, stages = heuristic_config(rows, cols, rank, mode, dtypes, device)
    first = {**blocks, "num_warps": warps, "num_stages": stages}
    col_opts = (max(16, next_pow2(cols)),) if reg.startswith("narrow-") else space["cols"]
    group = 1 if base in ("decode", "small") else 8
    out = []
    for bm in space["rows"]:
        for bn in col_opts:
            for bk in space["depth"]:
                for w in space["warps"]:
                    for s in space["stages"]:
                        if bm * bn > MAX_ACC_PER_THREAD * 32 * w:
                            continue
                        c = {"BLOCK_ROWS": bm, "BLOCK_COLS": bn, "BLOCK_DEPTH": bk, "GROUP_ROWS": group,
                             "num_warps": w, "num_stages": s}
                        fitted, _ = tuned.fits(c, mode, rank, dtypes, device)
                        if not fitted:
                            continue
                        c.update(fitted)
                        if c != first:
                            out.append(c)
    out.sort(key=lambda c: (_distance(c, first), sorted(c.items())))
    out.insert(0, first)
    return out[:limit] if limit else out


#: Run-time choices of PICA_KERNELS_AUTOTUNE=1, per (launch key, bucket), for this process.
AUTOTUNED: dict[tuple, dict] = {}
AUTOTUNE_CANDIDATES = 12


def median_ms(fn: Callable[[], object], reps: int = 10, warmup: int = 2, cuda: bool = False,
              flush: torch.Tensor | None = None) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, ``perf_counter`` on the CPU. ``flush``: a
    buffer larger than the L2 (e.g. 256 MiB), zeroed before each CUDA repetition so the weights come
    from HBM as in a real step (the benchmarks pass one; run-time autotuning does not)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pick_fastest(candidates: Sequence[dict], run: Callable[[dict], object],
                 bench: Callable[[Callable[[], object]], float]) -> tuple[dict, list[tuple[dict, float | str]]]:
    """The candidate with the smallest ``bench(lambda: run(c))``; candidates whose run raises are skipped
    (recorded with the error). Ties go to the earlier candidate (the heuristic's comes first)."""
    timings: list[tuple[dict, float | str]] = []
    best, best_ms = None, float("inf")
    for c in candidates:
        try:
            run(c)  # compile (and fail) outside the timing
            ms = bench(lambda c=c: run(c))
        except Exception as err:  # a candidate that does not build or launch here
            timings.append((c, f"{type(err).__name__}: {err}"))
            continue
        timings.append((c, ms))
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise RuntimeError("autotune: no candidate config ran: " + "; ".join(str(t) for _, t in timings))
    return best, timings


def autotune(key: tuple, candidates: Sequence[dict] | Callable[[], Sequence[dict]], run: Callable[[dict], object],
             cuda: bool = True) -> dict:
    """PICA_KERNELS_AUTOTUNE=1: on the first launch of ``key`` time ``candidates`` (a list, or a callable
    making it, called only then) by running the launch itself (every launch overwrites its outputs) and
    remember the fastest for the process.

    Why not ``@triton.autotune``: the grid, the split-K partial buffers and the row-tile arguments of a
    launch depend on the block sizes, which the decorator's fixed arguments cannot follow; this times
    the complete launch per config instead (the decorator's method: median of CUDA-event timings)."""
    if key not in AUTOTUNED:
        if callable(candidates):
            candidates = candidates()
        best, _ = pick_fastest(candidates[:AUTOTUNE_CANDIDATES], run,
                               lambda fn: median_ms(fn, reps=10, warmup=1, cuda=cuda))
        AUTOTUNED[key] = best
    return AUTOTUNED[key]


def best_config(select_args: tuple, props: DeviceProps, extra_key: tuple, launch: Callable[[], object]) -> dict:
    """The launcher's hook (PICA_KERNELS_AUTOTUNE=1, CUDA tensors, no :func:`~.configs.config_override`
    active): the fastest candidate config for this launch's key and shape bucket (:func:`autotune`), a flat
    dict to apply with ``config_override(**best)``.

    select_args: (rows, cols, depth, rank, mode, dtypes); extra_key: what else selects a compiled kernel
    (bias, tasks, precision); launch(): the launch itself, run under each candidate's override."""
    rows, cols, depth, rank, mode, dtypes = select_args
    key = (props.arch, mode, *dtypes, *extra_key, *tuned.shape_bucket(rows, cols, depth, rank).values())

    def run(candidate):
        with config_override(**candidate):
            launch()

    return autotune(key, lambda: candidate_configs(*select_args, props), run)
