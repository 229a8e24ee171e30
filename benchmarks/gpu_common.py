"""Shared by the GPU scripts (gpu_tune.py, gpu_smem_check.py, gpu.sh): the kernel launches one PiCa
layer makes, built as real tensors; their float64 reference; timing; a recorder of compiled kernels.

A :class:`Launch` is one call of :func:`~pica_kernels.ops.kernels.launchers.launch_lowrank_gemm` with
the operand layouts the ops use (``W.T`` as a view, ``P.T``, an fp32 ``M``), so a config timed or
compiled here is the one a training step launches.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

import torch

from pica_kernels.ops.kernels import launchers
from pica_kernels.ops.kernels.autotune import median_ms
from pica_kernels.ops.kernels.configs import GPU_TABLE, DeviceProps, Mode, device_props, estimate_shared_memory
from pica_kernels.ops.kernels.tuned import dtypes_name

#: The launches of one input-side PiCa layer: the forward (two-launch form, or one DECODE launch at
#: T <= 16 with r <= 64) and the backward of a step where only M trains (s = dy @ M, dx, dM).
KINDS = ("fused", "decode", "shrink", "dx", "s", "dM")

#: Llama-3-8B projections (out x in): q/o, k/v, gate/up, down.
LLAMA3_8B = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))

#: Largest error allowed against the float64 reference, relative to max(1, max |reference|) (the kernel
#: tests' table, tests/ops/kernel_helpers.py).
TOLERANCES = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def device_slug(device: str) -> str:
    """``nvidia-h200`` for a CUDA device; ``cpu`` otherwise (file names of the results)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def props_for(device: str, arch: str | None = None) -> DeviceProps:
    """The device's properties (CUDA), or the ahead-of-time table's for ``arch`` (dry runs on the CPU)."""
    if device.startswith("cuda"):
        return device_props(torch.device(device))
    return GPU_TABLE[arch or "sm_90"]


def kinds_for(rows: int, rank: int) -> tuple[str, ...]:
    """The launch kinds a layer makes at this T and r (the decode form replaces shrink + fused)."""
    fwd = ("decode",) if launchers.use_decode(rows, rank) else ("shrink", "fused")
    return (*fwd, "s", "dx", "dM")


@dataclasses.dataclass
class Launch:
    kind: str
    rows: int  # T
    out_f: int
    in_f: int
    rank: int
    out: torch.Tensor
    x: torch.Tensor
    weight: torch.Tensor
    kw: dict

    @property
    def name(self) -> str:
        return f"{self.kind} T={self.rows} {self.out_f}x{self.in_f} r={self.rank}"

    def run(self) -> torch.Tensor:
        return launchers.launch_lowrank_gemm(self.out, self.x, self.weight, **self.kw)

    @property
    def mode(self) -> Mode:
        if self.kw.get("factor_down") is not None:
            return Mode.DECODE
        return Mode.CONCAT_K if self.kw.get("t") is not None else Mode.PLAIN

    def select_args(self) -> tuple:
        """(rows, cols, depth, rank, mode, dtypes) as select_config sees this launch."""
        up, down = self.kw.get("factor_up"), self.kw.get("factor_down")
        factors = [f.dtype for f in (up, down) if f is not None] or [self.weight.dtype]
        factor = max(factors, key=lambda dt: dt.itemsize)
        mode = self.mode
        rank = self.kw["t"].shape[1] if mode == Mode.CONCAT_K else down.shape[1] if mode == Mode.DECODE else 0
        return (self.x.shape[0], self.weight.shape[1], self.x.shape[1], rank, mode,
                (self.x.dtype, self.weight.dtype, factor))

    def reference(self) -> torch.Tensor:
        """float64 ``out`` as the kernel defines it (factors cast to x's dtype first, t rounded to it);
        computed once (the inputs never change)."""
        if getattr(self, "_ref", None) is None:
            self._ref = self._reference()
        return self._ref

    def _reference(self) -> torch.Tensor:
        dt = self.x.dtype

        def f64(v, cast=True):
            return (v.to(dt) if cast else v).detach().to(torch.float64)

        ref = f64(self.x) @ f64(self.weight)
        if self.mode == Mode.CONCAT_K:
            ref += f64(self.kw["t"]) @ f64(self.kw["factor_up"])
        elif self.mode == Mode.DECODE:
            t = (f64(self.x) @ f64(self.kw["factor_down"])).to(dt).to(torch.float64)
            ref += t @ f64(self.kw["factor_up"])
        if self.kw.get("bias") is not None:
            ref += f64(self.kw["bias"])
        return ref

    def error(self) -> float:
        """Relative error of the last ``run()``'s output (the launch writes ``out`` in place)."""
        ref = self.reference()
        got = self.out.detach().to(torch.float64)
        return float((got - ref).abs().max() / ref.abs().max().clamp_min(1.0))

    def tolerance(self) -> float:
        return TOLERANCES[self.x.dtype]


def launch_args(kind: str, rows: int, out_f: int, in_f: int, rank: int, dtype: torch.dtype,
                m_dtype: torch.dtype) -> tuple:
    """(rows, cols, depth, rank, mode, dtypes) that select_config sees for :func:`make_launch`'s launch
    (no tensors: for planning a sweep)."""
    wide = max((dtype, m_dtype), key=lambda dt: dt.itemsize)
    x = dtype
    return {
        "shrink": (rows, rank, in_f, 0, Mode.PLAIN, (x, x, x)),
        "fused": (rows, out_f, in_f, rank, Mode.CONCAT_K, (x, x, m_dtype)),
        "decode": (rows, out_f, in_f, rank, Mode.DECODE, (x, x, wide)),
        "s": (rows, rank, out_f, 0, Mode.PLAIN, (x, m_dtype, m_dtype)),
        "dx": (rows, in_f, out_f, rank, Mode.CONCAT_K, (x, x, x)),
        "dM": (out_f, rank, rows, 0, Mode.PLAIN, (x, x, x)),
    }[kind]


def make_launch(kind: str, rows: int, out_f: int, in_f: int, rank: int, dtype: torch.dtype,
                m_dtype: torch.dtype, device: str, seed: int = 0) -> Launch:
    """One launch of an input-side PiCa layer: W (out, in), P (r, in) in ``dtype``, M (out, r) in ``m_dtype``.

    Operands are scaled so every output is O(1) (W, P by 1/sqrt(in); M, dy by 1/sqrt(out))."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    w = rnd(out_f, in_f, scale=in_f**-0.5)
    p = rnd(rank, in_f, scale=in_f**-0.5)
    m = rnd(out_f, rank, scale=rank**-0.5, dt=m_dtype)
    x = rnd(rows, in_f)
    t = rnd(rows, rank)
    dy = rnd(rows, out_f, scale=out_f**-0.5)
    s = rnd(rows, rank)

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, device=device, dtype=dt)

    if kind == "shrink":  # t = x @ P.T
        return Launch(kind, rows, out_f, in_f, rank, empty(rows, rank), x, p.T, {})
    if kind == "fused":  # y = [x | t] @ [W | M].T
        return Launch(kind, rows, out_f, in_f, rank, empty(rows, out_f), x, w.T, {"t": t, "factor_up": m.T})
    if kind == "decode":  # t = x @ P.T and y = x @ W.T + t @ M.T in one launch
        return Launch(kind, rows, out_f, in_f, rank, empty(rows, out_f), x, w.T,
                      {"factor_down": p.T, "factor_up": m.T, "t_out": empty(rows, rank)})
    if kind == "s":  # s = dy @ M
        return Launch(kind, rows, out_f, in_f, rank, empty(rows, rank), dy, m, {})
    if kind == "dx":  # dx = [dy | s] @ [W ; P]
        return Launch(kind, rows, out_f, in_f, rank, empty(rows, in_f), dy, w, {"t": s, "factor_up": p})
    if kind == "dM":  # dM = dy.T @ t, fp32
        return Launch(kind, rows, out_f, in_f, rank, empty(out_f, rank, dt=torch.float32), dy.T, t, {})
    raise ValueError(f"unknown launch kind {kind!r}; expected one of {KINDS}")


class Timer:
    """Median milliseconds of a callable: CUDA events with the L2 flushed before each repetition (a
    256 MiB buffer zeroed: more than any L2), or ``perf_counter`` on the CPU."""

    def __init__(self, device: str, reps: int = 20, warmup: int = 3) -> None:
        self.cuda = device.startswith("cuda")
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn: Callable[[], object]) -> float:
        return median_ms(fn, self.reps, self.warmup, self.cuda, self.flush)

    median_ms = __call__


class KernelRecorder:
    """Records every launch of the fused kernel inside a ``with`` block: its config, mode and operand
    dtypes, the shared memory :func:`estimate_shared_memory` predicts for it, and -- compiled (GPU) --
    the JIT's ``metadata.shared``, registers and spills of the kernel it ran (None in the interpreter).

    It wraps the module-level jitted kernel and calls it unchanged (the launch returns the compiled
    kernel in Triton 3.x)."""

    def __init__(self, capability: tuple[int, int]) -> None:
        self.capability = capability
        self.records: list[dict] = []

    def __enter__(self) -> KernelRecorder:
        self.module = launchers.kernel_module()
        self.kernel = self.module.lowrank_gemm_kernel
        self.module.lowrank_gemm_kernel = self
        return self

    def __exit__(self, *exc) -> None:
        self.module.lowrank_gemm_kernel = self.kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            compiled = launch(*args, **kwargs)
            self.records.append(self._record(args, kwargs, compiled))
            return compiled

        return run

    def _record(self, args, kwargs, compiled) -> dict:
        mode = Mode(kwargs["MODE"])
        x, weight, up, down = args[0], args[1], args[3], args[4]
        factor = {Mode.PLAIN: weight, Mode.CONCAT_K: up, Mode.DECODE: up if up.element_size() >= down.element_size()
                  else down}[mode]
        blocks = {k: kwargs[k] for k in ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_DEPTH", "BLOCK_RANK", "GROUP_ROWS")}
        stages, warps = kwargs.get("num_stages", 1), kwargs.get("num_warps", 4)
        predicted = estimate_shared_memory(blocks, stages, mode, x.element_size(), weight.element_size(),
                                           factor.element_size(), self.capability)
        meta = getattr(compiled, "metadata", None)
        measured = getattr(meta, "shared", None) if meta is not None else None
        n_regs = getattr(compiled, "n_regs", None)
        n_spills = getattr(compiled, "n_spills", None)
        return {"mode": mode.name, "dtypes": dtypes_name((x.dtype, weight.dtype, factor.dtype)),
                "rows": int(args[9]), "cols": int(args[10]), "depth": int(args[11]), "rank": int(args[12]),
                "config": {**blocks, "num_warps": warps, "num_stages": stages},
                "predicted_shared": predicted, "measured_shared": measured,
                "n_regs": n_regs, "n_spills": n_spills}


def interpreter_on(device: str) -> None:
    """CPU dry runs: the kernels run in Triton's interpreter (must be set before the first launch)."""
    if not device.startswith("cuda"):
        os.environ["TRITON_INTERPRET"] = "1"
