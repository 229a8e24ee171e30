"""Ahead-of-time compile gate: every kernel the launchers produce, compiled for every NVIDIA architecture, no GPU.

Triton compiles for any ``GPUTarget("cuda", cc, 32)`` on a CPU-only machine (ptxas ships in its wheel).
The gate runs the real launch sequences of the ops (``triton_forward``, ``triton_backward``,
``triton_grouped_forward`` and ``triton_multitask_forward`` of :mod:`pica_kernels.ops.kernels.launchers`)
on ``meta`` tensors under ``launchers.recording_launches``, so config choice, split-K, strides and flags
are exactly what a user's GPU of that architecture would launch (its ``configs.GPU_TABLE`` entry stands in
for the device). Each recorded launch goes through Triton's own binder (the JIT's specialisation code path:
``tt.divisibility`` 16 hints on pointers and integers, integers equal to 1 made constants, constexprs);
the specialisations are deduplicated on the JIT's cache key and compiled with ``triton.compile`` exactly
as ``JITFunction.run`` would. A compile without those hints is a different, worse kernel (the sm_86
decode kernel compiled to ~20 KB of shared memory unhinted, 110,592 B hinted), so its resources would
not be the ones a user's GPU sees.

Checks per compile (:func:`check`): it compiles; ``metadata.shared`` <= the architecture's opt-in
limit and <= the configs' estimate (what ``select_config`` fits to the limit); no register spills in
16-bit prefill and backward GEMMs (the ptxas log); ``wgmma`` in the sm_90 PTX for tiles of >= 64 rows;
tensor-core MMA for 16-bit and tf32 dots from sm_80 on. Kernels are deduplicated into classes whose key
holds every pointer argument's dtype (an fp32 dM output is another kernel than a 16-bit one).

The kernel module is decorated once, at import, in interpreter or compiler mode; the gate needs compiler
mode, so it runs in its own process (:func:`run_subprocess` clears ``TRITON_INTERPRET``), and compiles in
parallel worker processes. A developer tool: nothing in the package imports it, and it writes into the
repository (docs/kernels.md, docs/results/kernels_aot.json), which a wheel install does not have. Command
line, from the repository root (``make aot`` runs the full sweep and writes docs/kernels.md)::

    python -m tools.aot [--largest] [--archs sm_86,sm_90] [--jobs 2]
                        [--json out.json] [--markdown docs/kernels.md]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import pica_kernels.ops.kernels
from pica_kernels import reference
from pica_kernels.ops.env import env_flag
from pica_kernels.ops.kernels import launchers
from pica_kernels.ops.kernels.configs import GPU_TABLE, Mode, bf16_tensor_cores, estimate_shared_memory, regime
from pica_kernels.ops.kernels.padding import RANK_ALIGN, padded_rank, slot_offsets, slot_slices

ARCHS = tuple(GPU_TABLE)
#: The sweep: in/out features of real models (1001: no power-of-two factor, so no divisibility hints),
#: ranks, tokens T from decode (1) to prefill (4096).
SIZES = (576, 1024, 4096, 14336, 1001)
RANKS = (1, 8, 16, 24, 32, 64, 128, 256)
TOKENS = (0, 1, 8, 16, 64, 4096)
#: name -> (x / weight dtype, trainable-factor dtype, TF32 allowed). The trainable factor (PiCa's M,
#: LoRA's factors) may be fp32 with 16-bit activations; the frozen factor (the basis) is in x's dtype.
VARIANTS = {
    "fp16": (torch.float16, torch.float16, False),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
    "fp32": (torch.float32, torch.float32, False),
    "fp32-tf32": (torch.float32, torch.float32, True),
    "fp16-fp32M": (torch.float16, torch.float32, False),
    "bf16-fp32M": (torch.bfloat16, torch.float32, False),
}
#: The launch sequences :func:`record` knows; :data:`OPS` are swept by default: PiCa's input side (forward
#: incl. decode, backward dx + dM = dy.T @ t) and output side (forward incl. decode with the fp32 M as the
#: depth loop's factor, backward dx + dM = s.T @ x), grouped q/k/v forward and backward, multi-task forward.
#: With the variants that is every dtype combination the ops launch: x / weight / basis in x's dtype, M
#: in x's or fp32, outputs in x's dtype, and the fp32 accumulators (dM, split-K partials, DECODE's t).
ALL_OPS = ("forward/input", "forward/output", "backward/input", "backward/output", "backward/lora",
           "grouped/forward", "grouped/backward", "multitask/forward")
OPS = ("forward/input", "forward/output", "backward/input", "backward/output", "grouped/forward",
       "grouped/backward", "multitask/forward")
#: Every source that decides which kernels launch (the kernel, the launch sequences and their grids,
#: configs, rank padding, the tuned-config lookup and its table): docs/kernels.md records their hash
#: and is stale when any of them changes.
HASHED_SOURCES = ("lowrank_gemm.py", "launchers.py", "configs.py", "padding.py", "tuned.py", "tuned_configs.json")
#: The sweep of the make-test gate (``--largest``): enough points to reach the largest tile of every
#: (architecture, regime) -- r >= 64 maxes BLOCK_RANK, T picks the regime, sizes only split-K.
TEST_SWEEP_ARGS = ("--sizes", "4096", "--ranks", "64,256", "--tokens", "1,16,64,4096",
                   "--ops", "forward/input,forward/output,backward/input,backward/output,multitask/forward")
#: The kernel sources (the package's ops/kernels folder) and the repository root this tool lives in.
KERNELS_DIR = Path(pica_kernels.ops.kernels.__file__).parent
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MARKDOWN = REPO_ROOT / "docs" / "kernels.md"
DEFAULT_JSON = DEFAULT_MARKDOWN.parent / "results" / "kernels_aot.json"
HASH_MARKER = "aot-source-hash"
#: docs/kernels.md below this line is written by hand (why the configs are what they are) and kept as it is
#: when the gate rewrites the generated part above it.
NOTES_MARKER = "<!-- Notes below are written by hand; make aot keeps them. -->"


def source_hash(directory: Path | None = None) -> str:
    """sha256 over :data:`HASHED_SOURCES` (in ``directory``, default this package's): what the table
    depends on."""
    directory = KERNELS_DIR if directory is None else Path(directory)
    h = hashlib.sha256()
    for name in HASHED_SOURCES:
        h.update(name.encode())
        h.update((directory / name).read_bytes())
    return h.hexdigest()


def recorded_hash(markdown: Path = DEFAULT_MARKDOWN) -> str | None:
    """The source hash recorded in docs/kernels.md (None if absent)."""
    if not markdown.exists():
        return None
    m = re.search(HASH_MARKER + r": ([0-9a-f]{64})", markdown.read_text())
    return m.group(1) if m else None


def capability(arch: str) -> int:
    major, minor = GPU_TABLE[arch].capability
    return 10 * major + minor


# ----------------------------------------------------------------------------------------- recording
@dataclasses.dataclass(frozen=True)
class Point:
    """One point of the sweep: a launch sequence of one op at one shape."""

    op: str
    variant: str
    n_in: int
    n_out: int
    rank: int
    tokens: int
    bias: bool

    def __str__(self) -> str:
        return (f"{self.op} {self.variant} T={self.tokens} in={self.n_in} out={self.n_out} r={self.rank}"
                f"{' bias' if self.bias else ''}")


def sweep(archs=ARCHS, sizes=SIZES, ranks=RANKS, tokens=TOKENS, ops=OPS, variants=tuple(VARIANTS)):
    """(arch, Point) for the whole sweep; bf16 skipped on GPUs without bf16 tensor cores (sm_75 runs the
    reference there). Bias on/off only where a launch reads it (forwards)."""
    for arch in archs:
        for variant in variants:
            if VARIANTS[variant][0] == torch.bfloat16 and not bf16_tensor_cores(GPU_TABLE[arch]):
                continue
            for op, n_in, n_out, r, t in itertools.product(ops, sizes, sizes, ranks, tokens):
                for bias in ((False, True) if "forward" in op else (False,)):
                    yield arch, Point(op, variant, n_in, n_out, r, t, bias)


def _grouped_outs(n_out: int) -> list[int]:
    """q/k/v-like outputs: q = out, k and v narrower (GQA) when out is large."""
    kv = n_out if n_out <= 1024 else max(1024, n_out // 4)
    return [n_out, kv, kv]


def record(arch: str, p: Point) -> list[tuple]:
    """The launches ``p`` makes on an ``arch`` GPU: [(grid, args, constexprs)], args holding meta tensors."""
    xdt, mdt, tf32 = VARIANTS[p.variant]

    def e(*shape, dtype=xdt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    T, n_in, n_out, r = p.tokens, p.n_in, p.n_out, p.rank
    bias = e(n_out) if p.bias else None
    sink: list = []
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with launchers.recording_launches(GPU_TABLE[arch], sink):
            kind, which = p.op.split("/")
            if kind == "forward":  # PiCa input side (a = M, b = P) or output side (a = U_r, b = M)
                a, b = (e(n_out, r, dtype=mdt), e(r, n_in)) if which == "input" else (e(n_out, r), e(r, n_in, dtype=mdt))
                launchers.triton_forward(e(T, n_in), e(n_out, n_in), bias, a, b)
            elif kind == "backward":
                a_dt, b_dt = {"input": (mdt, xdt), "output": (xdt, mdt), "lora": (mdt, mdt)}[which]
                need_da, need_db = which in ("input", "lora"), which in ("output", "lora")
                t = e(T, padded_rank(r, RANK_ALIGN))[:, :r]  # the forward's t: a view of its padded buffer
                launchers.triton_backward(e(T, n_out), e(T, n_in) if need_db else None, t, e(n_out, n_in),
                                          e(n_out, r, dtype=a_dt), e(r, n_in, dtype=b_dt), True, need_da, need_db)
            elif kind == "grouped":
                outs = _grouped_outs(n_out)
                ranks = [r] * len(outs)
                b_cat = e(sum(ranks), n_in)
                if which == "forward":
                    biases = [e(o) if p.bias else None for o in outs]
                    launchers.triton_grouped_forward(e(T, n_in), [e(o, n_in) for o in outs], biases,
                                    [e(o, r, dtype=mdt) for o in outs], b_cat, ranks, RANK_ALIGN)
                else:  # what grouped's autograd backward launches: one backward per projection, t and B sliced
                    # t in the kernels' slot layout (each projection's r columns at the start of a slot
                    # padded to RANK_ALIGN), B_cat sliced packed: as grouped's autograd does.
                    t = e(T, slot_offsets(ranks, RANK_ALIGN)[-1])
                    t_cols = slot_slices(ranks, RANK_ALIGN)
                    for (lo, hi), (b_lo, b_hi), o in zip(t_cols, reference.rank_slices(ranks), outs):
                        launchers.triton_backward(e(T, o), None, t[:, lo:hi], e(o, n_in), e(o, r, dtype=mdt),
                                                  b_cat[b_lo:b_hi], True, True, False)
            elif kind == "multitask":
                nseq = min(4, T) if T > 0 else 1
                ids = torch.arange(nseq, device="meta") % 3
                launchers.triton_multitask_forward(e(nseq, T // nseq, n_in), e(n_out, n_in), bias, e(3, n_out, r, dtype=mdt),
                                  e(r, n_in), ids, RANK_ALIGN)
            else:
                raise ValueError(f"unknown op {p.op!r}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return sink


# ----------------------------------------------------------------------------------------- binding
class _PointerArg:
    """What Triton's binder reads of a tensor argument: its dtype and its address. A fresh CUDA allocation
    is 512-byte aligned, so a view's address modulo 16 is its storage offset in bytes modulo 16."""

    def __init__(self, dtype: torch.dtype, offset_bytes: int):
        self.dtype = dtype
        self._ptr = (1 << 20) + offset_bytes

    def data_ptr(self) -> int:
        return self._ptr


def describe_args(args) -> tuple:
    """Launch arguments, tensors replaced by picklable (dtype name, storage offset in bytes) pairs."""
    return tuple(("tensor", str(v.dtype).removeprefix("torch."), v.storage_offset() * v.element_size())
                 if isinstance(v, torch.Tensor) else v for v in args)


def _arg(v):
    if isinstance(v, tuple) and v and v[0] == "tensor":
        return _PointerArg(getattr(torch, v[1]), v[2])
    return v


def jit_function(kernel=None):
    """The kernel as a ``JITFunction`` (its binder and ``_pack_args``), also when the module was decorated
    for the interpreter (an ``InterpretedFunction`` wraps the same Python function)."""
    import triton

    if kernel is None:
        kernel = launchers.kernel_module().lowrank_gemm_kernel
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        return kernel
    if id(kernel) not in _JIT:  # keep the wrapper: the binder is cached per function object
        _JIT[id(kernel)] = (kernel, triton.runtime.jit.JITFunction(kernel.fn))
    return _JIT[id(kernel)][1]


_JIT: dict = {}


@functools.cache
def _backend(cc: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", cc, 32)
    return target, make_backend(target)


def _binder(cc: int, fn):
    """The JIT's binder of ``fn`` for ``cc``, built once (keyed by identity: hashing a JITFunction hashes
    its source and dependencies, which fails for a kernel decorated for the interpreter)."""
    from triton.runtime.jit import create_function_from_signature

    key = (cc, id(fn))
    if key not in _BINDERS:
        _BINDERS[key] = (fn, create_function_from_signature(fn.signature, fn.params, _backend(cc)[1]))
    return _BINDERS[key][1]


_BINDERS: dict = {}


def bind(cc: int, args, constexprs: dict, kernel=None):
    """Triton's binder on one launch for ``GPUTarget("cuda", cc, 32)``, as ``JITFunction.run`` calls it.

    args: the launch's positional arguments, tensors as real tensors, or as :func:`describe_args` pairs.
    Returns (key, kwargs, bound, specialization, options); ``key`` is the JIT's cache key material (the
    binder's specialisation list and options): equal for launches that share one compiled kernel.
    """
    from triton import knobs

    fn = jit_function(kernel)
    kwargs = dict(constexprs)
    # As JITFunction.run does before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # triton >= 3.9 passes it too
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = _binder(cc, fn)(*(_arg(v) for v in args), **kwargs)
    key = (cc, repr(specialization), repr(sorted(options.items())))
    return key, kwargs, bound, specialization, options


def specialise(cc: int, args, constexprs: dict, kernel=None):
    """What ``JITFunction.run`` hands the compiler for one launch: (signature, constexprs, attrs, options)
    from the binder and ``_pack_args`` (attrs: the ``tt.divisibility`` hints per argument)."""
    _, kwargs, bound, specialization, options = bind(cc, args, constexprs, kernel)
    return jit_function(kernel)._pack_args(_backend(cc)[1], kwargs, bound, specialization, options)


# ----------------------------------------------------------------------------------------- compiling
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def mma_kind(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def compile_one(cc: int, args, constexprs: dict) -> dict:
    """Compile one specialisation; {shared, registers, spill_bytes, mma, seconds} or {error}."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        options, signature, cexprs, attrs = specialise(cc, args, constexprs)
        target, _ = _backend(cc)
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the ptxas -v log: registers, spills
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(jit_function(), signature, cexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as err:  # the gate reports any failure to compile (OutOfResources, PTXASError, ...)
        return {"error": f"{type(err).__name__}: {str(err)[:500]}", "seconds": time.perf_counter() - t0}
    text = log.getvalue()
    regs, spills = _REGS.search(text), _SPILLS.search(text)
    return {
        "shared": int(compiled.metadata.shared),
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
        "mma": mma_kind(compiled.asm["ptx"]),
        "seconds": time.perf_counter() - t0,
    }


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the 3.9 default, without its warning
    if launchers.kernel_module().INTERPRETED:
        raise RuntimeError("the AOT gate needs the kernels decorated in compiler mode (TRITON_INTERPRET unset)")


def _compile_job(job):
    return compile_one(*job)


# ----------------------------------------------------------------------------------------- the gate
@dataclasses.dataclass
class Spec:
    """One compiled kernel (a unique specialisation) and the sweep points that launch it."""

    arch: str
    mode: str
    regime: str
    dtypes: tuple[str, str, str]  # x, weight, factor (what the config and the estimate see)
    config: dict
    estimate: int
    args: tuple
    constexprs: dict
    hints: int = 0  # divisibility-16 hints + ==1 constants in the binder's specialisation
    ops: set = dataclasses.field(default_factory=set)
    example: str = ""
    launches: int = 0
    jit_keys: int = 1  # JIT specialisations this spec stands for (see representatives)
    result: dict = dataclasses.field(default_factory=dict)
    #: The element type of every pointer argument, in the kernel's order (x, weight, t, factor_up,
    #: factor_down, bias, out, t_out, tasks; an unused one is the output's): each is part of the compiled
    #: kernel (the fp32 output of dM is another kernel than the same GEMM's 16-bit output).
    pointers: tuple = ()

    @property
    def out_dtype(self) -> str:
        return self.pointers[6] if self.pointers else "?"

    @property
    def dtype_text(self) -> str:
        """x, weight, factor -> output (the report's dtypes column)."""
        return f"{', '.join(self.dtypes)} -> {self.out_dtype}"

    @property
    def kernel_class(self) -> tuple:
        """The kernel but its hints and its bias epilogue: mode, every pointer's dtype, config and the other
        flags."""
        return (self.arch, self.mode, self.dtypes, self.pointers,
                tuple(sorted((k, v) for k, v in self.constexprs.items() if k != "HAS_BIAS")))

    @property
    def group(self) -> str:
        """The (regime, mode) row of the resource table."""
        return f"{self.regime} {self.mode}"

    @property
    def backward(self) -> bool:
        """The compiled launch is a backward one (dx, dM / dA, dB). Its class may hold launches of other ops
        (``ops``): the spill rule judges the launch compiled, not the ones it stands for."""
        op = self.example.split()[0]
        return op.startswith("backward") or op.endswith("/backward")

    @property
    def tile(self) -> str:
        c = self.config
        return (f"{c['BLOCK_ROWS']}x{c['BLOCK_COLS']}x{c['BLOCK_DEPTH']} r{c['BLOCK_RANK']} "
                f"w{c['num_warps']} s{c['num_stages']}")


def planted(plant: dict | list | None, arch: str, p: Point, args, cexprs: dict) -> dict:
    """``cexprs`` with ``plant["config"]`` applied when the launch matches ``plant["when"]`` (keys: ``arch``,
    ``op``, ``mode`` (PLAIN, CONCAT_K, DECODE), ``out`` (the output's dtype, e.g. float32)); a list of such
    plants: the first that matches. The gate's own tests plant bad configs this way and check that the
    gate fails on them."""
    have = {"arch": arch, "op": p.op, "mode": Mode(cexprs["MODE"]).name,
            "out": str(args[6].dtype).removeprefix("torch.")}
    for one in ([plant] if isinstance(plant, dict) else plant or []):
        if all(have[k] == v for k, v in one.get("when", {}).items()):
            return {**cexprs, **one["config"]}
    return cexprs


def collect(points, plant: dict | list | None = None) -> dict:
    """Record every point's launches and deduplicate them on the JIT's key: {key: Spec}. ``plant``: see
    :func:`planted`."""
    specs: dict = {}
    for arch, p in points:
        cc = capability(arch)
        for _grid, args, cexprs in record(arch, p):
            cexprs = planted(plant, arch, p, args, cexprs)
            desc = describe_args(args)
            key, _, _, specialization, _ = bind(cc, desc, cexprs)
            spec = specs.get(key)
            if spec is None:
                mode = Mode(cexprs["MODE"])
                rows, cols = args[9], args[10]
                dts = [args[0].dtype, args[1].dtype]
                factors = [args[i].dtype for i in ((3,) if mode == Mode.CONCAT_K else (3, 4) if mode == Mode.DECODE
                                                    else ())]
                dts.append(max(factors or [args[1].dtype], key=lambda d: d.itemsize))
                config = {k: cexprs[k] for k in ("BLOCK_ROWS", "BLOCK_COLS", "BLOCK_DEPTH", "BLOCK_RANK",
                                                 "GROUP_ROWS", "num_warps", "num_stages")}
                est = estimate_shared_memory(config, config["num_stages"], mode, *(d.itemsize for d in dts),
                                             GPU_TABLE[arch].capability)
                spec = specs[key] = Spec(arch, mode.name.lower(), regime(rows, cols, mode),
                                         tuple(str(d).removeprefix("torch.") for d in dts), config, est, desc,
                                         dict(cexprs), example=str(p),
                                         hints=sum(v[1] == "D" or (v[0] == "constexpr" and v[1] == 1)
                                                   for v in specialization[:len(desc)]),
                                         pointers=tuple(v[1] for v in desc if isinstance(v, tuple)))
            spec.ops.add(p.op)
            spec.launches += 1
    return specs


def _collect_arch(job):
    arch, kw, plant = job
    return collect(sweep((arch,), **kw), plant)


def collect_parallel(archs, jobs: int = 2, plant: dict | list | None = None, **sweep_kw) -> dict:
    """:func:`collect` of :func:`sweep`, one architecture per worker process."""
    ctx = multiprocessing.get_context("spawn")
    me = importlib.import_module("tools.aot")
    specs: dict = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=me._worker_init) as ex:
        for part in ex.map(me._collect_arch, [(arch, sweep_kw, plant) for arch in archs]):
            specs.update(part)
    return specs


def representatives(specs: dict) -> dict:
    """One spec per :attr:`Spec.kernel_class`: the JIT specialisation with the most hints (the aligned,
    vectorised, cp.async-pipelined kernel: the most shared memory), with a bias if any has one (more
    registers), standing for the class's others (``jit_keys``, ``launches`` and ``ops`` summed over them)."""
    best: dict = {}
    for key, s in specs.items():
        c = s.kernel_class
        if c not in best:
            best[c] = (key, s, 0, 0, set())
        k0, s0, n, launches, ops = best[c]
        if (s.hints, s.constexprs["HAS_BIAS"]) > (s0.hints, s0.constexprs["HAS_BIAS"]):
            k0, s0 = key, s
        best[c] = (k0, s0, n + 1, launches + s.launches, ops | s.ops)
    out = {}
    for key, s, n, launches, ops in best.values():
        out[key] = dataclasses.replace(s, jit_keys=n, launches=launches, ops=set(ops))
    return out


def largest_per_group(specs: dict, by_mode: bool = False) -> dict:
    """The largest tile of every (architecture, regime) (and mode, ``by_mode``): most estimated shared
    memory, then the biggest tile, then 16-bit x (where the spill check applies)."""
    best: dict = {}
    for key, s in specs.items():
        c = s.config
        rank = (s.estimate, c["BLOCK_ROWS"] * c["BLOCK_COLS"] * c["BLOCK_DEPTH"], s.dtypes[0] != "float32")
        g = (s.arch, s.group if by_mode else s.regime)
        if g not in best or rank > best[g][0]:
            best[g] = (rank, key)
    return {key: specs[key] for _, key in best.values()}


#: Failures the gate reports but does not fail on, by "arch check": each is recorded in docs/kernels.md
#: and the test asserts it is still seen (remove the entry once it is fixed).
KNOWN_FAILURES = {
    "sm_75 spills": "triton 3.9 emits no MMA instruction for sm_75 (Turing): every tl.dot becomes FMA, ptxas "
                    "keeps 64 registers and spills KBs per thread; the kernels cannot be fast on a T4 whatever "
                    "the config, so sm_75 runs the reference (cuBLAS) path by default and the kernels only when "
                    "asked for (backend='triton' or PICA_KERNELS_BACKEND=triton; ops/backend.py)",
    "sm_86 spills narrow-prefill": "a 16-bit left operand times an fp32 M into fp32 (s = dy @ M on the input "
                                   "side, t = x @ M.T's split-K partials on the output side) at r = 24..32 "
                                   "(128x32x64, 3 stages) spills 8-16 B at 80 registers (triton 3.9); the likely fix, halving the "
                                   "narrow depth step for an fp32 right operand on every architecture (what "
                                   "configs does on sm_100 / sm_120, where it removed the same spills), is "
                                   "untested: it changes sm_80..sm_90 configs, each change needing a `make aot` "
                                   "rerun",
    "sm_89 spills narrow-prefill": "as sm_86 (same config: 99 KB parts)",
    "sm_100 spills narrow-prefill": "t = x @ M.T on the output side (16-bit x, fp32 M, fp32 split-K partials) at "
                                    "r = 64 (128x64x32, 4 stages, 8 warps) spills 8 B at 64 registers (triton "
                                    "3.9). The depth step is already "
                                    "halved for an fp32 M on sm_100; 4 warps or a 32-column tile are the "
                                    "untested candidates (each needs a `make aot` rerun)",
}


def _checks(spec: Spec) -> list[tuple[str, str]]:
    """(check name, message) for every assertion ``spec`` fails."""
    r = spec.result
    if "error" in r:
        return [("compiles", f"does not compile: {r['error']}")]
    props = GPU_TABLE[spec.arch]
    failures = []
    if r["shared"] > props.smem_per_block:
        failures.append(("shared", f"shared memory {r['shared']} B > {props.smem_per_block} B"))
    if r["shared"] > spec.estimate:  # select_config fits the estimate to the limit: it must not be low
        failures.append(("estimate", f"shared memory {r['shared']} B > configs' estimate {spec.estimate} B"))
    sixteen_bit = spec.dtypes[0] in ("float16", "bfloat16")
    if sixteen_bit and (spec.regime.endswith("prefill") or spec.backward) and (r["spill_bytes"] or 0) > 0:
        failures.append(("spills", f"register spills: {r['spill_bytes']} B ({r['registers']} registers)"))
    # fp32 with TF32 off ("ieee") has no tensor-core instruction: FMA is right there.
    tensor_cores = sixteen_bit or spec.constexprs.get("PRECISION") == "tf32"
    if spec.arch == "sm_90" and tensor_cores and spec.config["BLOCK_ROWS"] >= 64 and r["mma"] != "wgmma":
        failures.append(("wgmma", f"no wgmma in the sm_90 PTX for a {spec.config['BLOCK_ROWS']}-row tile "
                                  f"(got {r['mma']})"))
    if props.capability >= (8, 0) and tensor_cores and r["mma"] == "fma":
        failures.append(("mma", "a 16-bit / tf32 dot compiled to FMA, not tensor-core MMA"))
    return failures


def _known_key(spec: Spec, name: str) -> str | None:
    for key in (f"{spec.arch} {name} {spec.regime}", f"{spec.arch} {name}"):
        if key in KNOWN_FAILURES:
            return key
    return None


def check(spec: Spec) -> list[str]:
    """The gate's failures for one compiled spec, known ones (:data:`KNOWN_FAILURES`) left out; [] = pass."""
    return [m for name, m in _checks(spec) if _known_key(spec, name) is None]


def known(spec: Spec) -> list[str]:
    """The :data:`KNOWN_FAILURES` entries ``spec`` hits."""
    return [k for k in (_known_key(spec, name) for name, _ in _checks(spec)) if k is not None]


def compile_specs(specs: dict, jobs: int = 2, progress=None) -> None:
    """Compile every spec (``jobs`` worker processes), filling ``spec.result``."""
    order = sorted(specs, key=lambda k: (specs[k].arch != "sm_75", -specs[k].estimate))  # slowest first
    jobs_args = [(capability(specs[k].arch), specs[k].args, specs[k].constexprs) for k in order]
    ctx = multiprocessing.get_context("spawn")
    me = importlib.import_module("tools.aot")  # by name, also when run as __main__ (-m)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=me._worker_init) as ex:
        for i, (key, result) in enumerate(zip(order, ex.map(me._compile_job, jobs_args))):
            specs[key].result = result
            if progress:
                progress(i + 1, len(order), specs[key])


# ----------------------------------------------------------------------------------------- report
def summary(specs: dict) -> list[dict]:
    """One row per (architecture, regime, mode): counts and worst resources."""
    rows = {}
    for s in specs.values():
        row = rows.setdefault((s.arch, s.group), {
            "arch": s.arch, "group": s.group, "compiles": 0, "launches": 0, "max_shared": 0, "max_estimate": 0,
            "max_registers": 0, "spilling": 0, "max_spill_bytes": 0, "mma": set(), "largest": None, "failures": 0,
            "seconds": 0.0})
        r = s.result
        row["compiles"] += 1
        row["launches"] += s.launches
        row["seconds"] += r.get("seconds", 0.0)
        row["failures"] += bool(check(s))
        row["known"] = row.get("known", 0) + bool(known(s))
        if "error" in r:
            continue
        if r["shared"] >= row["max_shared"]:
            row["max_shared"], row["largest"] = r["shared"], s.tile
        row["max_estimate"] = max(row["max_estimate"], s.estimate)
        row["max_registers"] = max(row["max_registers"], r["registers"] or 0)
        if r["spill_bytes"]:
            row["spilling"] += 1
            row["max_spill_bytes"] = max(row["max_spill_bytes"], r["spill_bytes"])
        row["mma"].add(r["mma"])
    out = []
    for key in sorted(rows, key=lambda k: (ARCHS.index(k[0]), k[1])):
        row = rows[key]
        row["mma"] = sorted(row["mma"])
        out.append(row)
    return out


def _spec_json(s: Spec) -> dict:
    return {"arch": s.arch, "mode": s.mode, "regime": s.regime, "dtypes": s.dtypes, "config": s.config,
            "estimate": s.estimate, "ops": sorted(s.ops), "example": s.example, "launches": s.launches,
            "jit_keys": s.jit_keys, "hints": s.hints, "constexprs": s.constexprs, "args": s.args,
            "pointers": s.pointers,
            "result": s.result, "failures": check(s), "known": known(s)}


def load_json(path: Path) -> tuple[dict, dict]:
    """(specs, report) from a ``--json`` file (re-render the markdown without compiling: ``--render``)."""
    report = json.loads(Path(path).read_text())
    specs = {}
    for i, d in enumerate(report["specs"]):
        specs[i] = Spec(d["arch"], d["mode"], d["regime"], tuple(d["dtypes"]), d["config"], d["estimate"],
                        tuple(tuple(a) if isinstance(a, list) else a for a in d["args"]), d["constexprs"],
                        hints=d["hints"], ops=set(d["ops"]), example=d["example"], launches=d["launches"],
                        jit_keys=d["jit_keys"], result=d["result"], pointers=tuple(d.get("pointers", ())))
    return specs, report


def write_markdown(specs: dict, path: Path, *, seconds: float, command: str, stats: dict, sweep_kw: dict,
                   digest: str | None = None) -> None:
    """docs/kernels.md from compiled specs; ``digest``: the :func:`source_hash` of the sources compiled (taken
    when the run started), default the current one."""
    import triton

    rows = summary(specs)
    failures = [(s, f) for s in specs.values() for f in check(s)]
    known_hits = [(s, k) for s in specs.values() for k in known(s)]
    spills = [s for s in specs.values() if s.result.get("spill_bytes")]
    under = [s for s in specs.values() if "shared" in s.result and s.result["shared"] > s.estimate]
    lines = [
        "# Kernel resources per architecture (ahead-of-time compile gate)",
        "",
        "Generated by `make aot` (`python -m tools.aot`); do not edit by hand above the notes. Every launch",
        "the ops make over the sweep below was recorded on `meta` tensors for each architecture's",
        "`GPU_TABLE` entry (pica_kernels/ops/kernels/configs.py), specialised by Triton's own binder",
        "(divisibility-16 hints, ==1 constants, constexprs, as `JITFunction.run` does) and compiled with",
        "`triton.compile` for `GPUTarget(\"cuda\", cc, 32)` -- no GPU involved. Shared memory is the compiled",
        "kernel's `metadata.shared`, registers and spills come from the ptxas log, the MMA kind from the PTX.",
        "",
        f"- {HASH_MARKER}: {digest or source_hash()} (sha256 of {' + '.join(HASHED_SOURCES)}; tests/tools/test_aot_gate.py "
        "fails when it no longer matches: rerun `make aot`)",
        f"- triton {triton.__version__}, torch {torch.__version__}; command `{command}`; {seconds / 60:.1f} min wall "
        "on the 2-core development machine (shared with other jobs while it ran)",
        f"- sweep: in/out in {sweep_kw['sizes']}, r in {sweep_kw['ranks']}, T in {sweep_kw['tokens']}; ops "
        f"{', '.join(sweep_kw['ops'])}; bias on/off (forwards); variants (x / trainable factor) "
        f"{', '.join(VARIANTS)}; sm_75 (the reference by default there; the kernels only when asked for) in fp16 / fp32, not bf16",
        f"- {stats['launches']} launches recorded -> {stats['jit_keys']} JIT specialisations (the JIT's cache key) "
        f"-> {stats['classes']} kernel classes (mode, every pointer's dtype, config and flags but the bias) -> "
        f"**{stats['compiles']} compiled**: "
        + ("every JIT specialisation (`--every`)." if stats["classes"] == stats["jit_keys"] and stats.get("every") else
           "per class, the specialisation with the most hints (divisibility-16, ==1), i.e. the aligned, "
           "pipelined kernel with the most shared memory; `--every` compiles them all (hours on 2 cores)."),
        f"- gate: **{'PASS' if not failures else f'FAIL ({len(failures)} failures)'}** -- compiles; shared <= limit; "
        "shared <= the configs' estimate; no spills in 16-bit prefill and backward GEMMs; wgmma on sm_90 for tiles of >= 64 rows; tensor-core "
        f"MMA (not FMA) for 16-bit and tf32 dots from sm_80 on. Known failures (not failing the gate): "
        f"{len(known_hits)} kernels, listed below.",
    ]
    missing = [arch for arch in ARCHS if not any(s.arch == arch for s in specs.values())]
    if missing:
        lines.append(f"- **PARTIAL**: no compiles of {', '.join(missing)} in this report (their tables are absent; "
                     "tests/tools/test_aot_gate.py fails until a full `make aot` run)")
    lines.append("")
    if known_hits:
        lines += ["## Known failures", ""]
        for name, why in KNOWN_FAILURES.items():
            hits = [s for s, k in known_hits if k == name]
            if hits:
                worst = max(hits, key=lambda s: s.result.get("spill_bytes") or 0)
                lines.append(f"- **{name}** ({len(hits)} kernels; worst: {worst.tile}, {worst.dtype_text}, "
                             f"{worst.result.get('registers')} registers, {worst.result.get('spill_bytes')} B spilled, "
                             f"{worst.result.get('mma')}): {why}.")
        lines.append("")
    if failures:
        lines += ["## Failures", "", "| arch | regime | tile | dtypes (x, W, factor -> out) | example | failure |",
                  "|---|---|---|---|---|---|"]
        for s, f in sorted(failures, key=lambda sf: (ARCHS.index(sf[0].arch), sf[0].group)):
            lines.append(f"| {s.arch} | {s.group} | {s.tile} | {s.dtype_text} | {s.example} | {f} |")
        lines.append("")
    lines += ["## Resources per architecture and regime", "",
              "Regime (configs.regime): decode (one-launch DECODE), small (rows <= 16), mid (<= 64), prefill; "
              "narrow- when the output has <= 64 columns (shrinks, dA/dM over T tokens). Tile: "
              "rows x cols x depth, rank step, warps, stages (of the kernel with the most shared memory).", ""]
    for arch in ARCHS:
        arch_rows = [r for r in rows if r["arch"] == arch]
        if not arch_rows:
            continue
        props = GPU_TABLE[arch]
        lines += [f"### {arch} ({props.name}; {props.smem_per_block} B shared per block, {props.sm_count} SMs)", "",
                  "| regime | compiles | launches | max shared (B) | estimate (B) | largest tile | max regs | "
                  "kernels spilling (max B) | MMA | failures (known) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in arch_rows:
            lines.append(f"| {r['group']} | {r['compiles']} | {r['launches']} | {r['max_shared']} | "
                         f"{r['max_estimate']} | {r['largest']} | {r['max_registers']} | "
                         f"{r['spilling']} ({r['max_spill_bytes']}) | {', '.join(r['mma'])} | {r['failures']} "
                         f"({r['known']}) |")
        lines.append("")
    lines += ["## Spilling kernels", "",
              "Spills outside 16-bit prefill and backward GEMMs are recorded, not failed (fp32 operands, "
              "decode-time launches). A kernel class is compiled once, for its example launch (with a bias "
              "where one of its launches has one), and stands for the launches of every op listed: the spill "
              "rule judges the example, so a small / mid class whose example is a forward passes even when "
              "backward ops (no bias epilogue) launch it too.", ""]
    if spills:
        lines += ["| arch | regime | tile | dtypes | registers | spill B (stores + loads) | ops | example |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in sorted(spills, key=lambda s: (ARCHS.index(s.arch), s.group, -s.result["spill_bytes"])):
            lines.append(f"| {s.arch} | {s.group} | {s.tile} | {s.dtype_text} | {s.result['registers']} | "
                         f"{s.result['spill_bytes']} | {', '.join(sorted(s.ops))} | {s.example} |")
    else:
        lines.append("None.")
    lines += ["", "## Shared memory above the configs' estimate", "",
              "`configs.estimate_shared_memory` is what `select_config` fits to the limit; a kernel using more "
              "than estimated could exceed the limit on a GPU (a gate failure).", ""]
    if under:
        lines += ["| arch | regime | tile | dtypes | estimate | compiled |", "|---|---|---|---|---|---|"]
        for s in under:
            lines.append(f"| {s.arch} | {s.group} | {s.tile} | {s.dtype_text} | {s.estimate} | "
                         f"{s.result['shared']} |")
    else:
        lines.append("None: every compiled kernel fits in its estimate.")
    lines.append("")
    old = path.read_text() if path.exists() else ""
    if NOTES_MARKER in old:
        lines += [NOTES_MARKER + old.split(NOTES_MARKER, 1)[1].rstrip("\n"), ""]
    path.write_text("\n".join(lines))


def merge(base_path: Path, specs: dict, stats: dict, seconds: float, command: str, sweep_kw: dict, ran: set):
    """This run's specs (architectures ``ran``) joined with a full report's specs of the other architectures."""
    base_specs, base = load_json(base_path)
    if {k: list(v) for k, v in base["sweep"].items()} != {k: list(v) for k, v in sweep_kw.items()}:
        raise SystemExit(f"--merge: {base_path} swept {base['sweep']}, this run {sweep_kw}")
    drop = [s for s in base_specs.values() if s.arch in ran]
    stats = dict(stats)
    for k in ("launches", "jit_keys"):
        stats[k] += base["stats"][k] - sum(getattr(s, k) for s in drop)
    stats["classes"] += base["stats"]["classes"] - len(drop)
    specs = {**{("base", i): s for i, s in base_specs.items() if s.arch not in ran}, **specs}
    stats["compiles"] = len(specs)
    return specs, stats, seconds + base["seconds"], f"{base['command']}; then {command}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--largest", action="store_true",
                    help="compile only the largest tile of every (architecture, regime) (the make test gate)")
    ap.add_argument("--largest-archs", default="",
                    help="architectures compiled only at their largest tile per (regime, mode) (slow compiles: "
                         "make aot passes sm_75, ~15 s a kernel, whose dots are FMA in triton 3.9)")
    ap.add_argument("--every", action="store_true",
                    help="compile every JIT specialisation, not one per kernel class (hours on 2 cores)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(ALL_OPS)}")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--sizes", default=None, help="comma-separated in/out sizes (default: the full sweep)")
    ap.add_argument("--ranks", default=None)
    ap.add_argument("--tokens", default=None)
    ap.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--merge", type=Path, default=None,
                    help="a --json report of the same sweep: its specs of the architectures not in --archs join "
                         "this run's (rerun some architectures after a config change that touches only them)")
    ap.add_argument("--plant", default=None,
                    help='a JSON {"when": {"arch"|"op"|"mode"|"out": ...}, "config": {...}} (or a list of them): the '
                         "config replaces the launches' it matches (the gate's tests check that the gate fails "
                         "on a bad one)")
    ap.add_argument("--render", type=Path, default=None,
                    help="write --markdown from this --json report instead of compiling")
    a = ap.parse_args(argv)
    if a.render:  # re-render (and merge) reports: the markdown records the hash of the sources they compiled
        specs, report = load_json(a.render)
        stats, seconds, command = report["stats"], report["seconds"], report["command"]
        if a.merge:
            ran = {s.arch for s in specs.values()}
            specs, stats, seconds, command = merge(a.merge, specs, stats, seconds, command, report["sweep"], ran)
        if a.json:
            a.json.write_text(json.dumps({
                **report, "command": command, "seconds": seconds, "stats": stats,
                "failures": [f"{s.arch} {s.group} {s.tile} {s.dtypes} ({s.example}): {f}"
                             for s in specs.values() for f in check(s)],
                "summary": summary(specs), "specs": [_spec_json(s) for s in specs.values()]},
                separators=(",", ":")))
        write_markdown(specs, a.markdown or DEFAULT_MARKDOWN, seconds=seconds, stats=stats,
                       sweep_kw=report["sweep"], command=command, digest=report["source_hash"])
        return 1 if any(check(s) for s in specs.values()) else 0
    if env_flag("TRITON_INTERPRET"):
        raise SystemExit("run the AOT gate without TRITON_INTERPRET (use run_subprocess)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    digest = source_hash()  # of the sources this run records and compiles (edits during the run: stale)
    # A fresh cache: a cached kernel skips ptxas, whose log gives registers and spills.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pica-aot-")
    _worker_init()

    def ints(s, default):
        return tuple(int(v) for v in s.split(",")) if s else default

    t0 = time.perf_counter()
    sweep_kw = dict(sizes=ints(a.sizes, SIZES), ranks=ints(a.ranks, RANKS), tokens=ints(a.tokens, TOKENS),
                    ops=tuple(a.ops.split(",")))
    if a.variants:  # not in the default sweep_kw: --merge compares sweeps, and old reports have no variants key
        sweep_kw["variants"] = tuple(a.variants.split(","))
    specs = collect_parallel(a.archs.split(","), a.jobs, json.loads(a.plant) if a.plant else None, **sweep_kw)
    stats = {"launches": sum(s.launches for s in specs.values()), "jit_keys": len(specs)}
    if not a.every:
        specs = representatives(specs)
    stats["classes"], stats["every"] = len(specs), a.every
    if a.largest:
        specs = largest_per_group(specs)
    elif a.largest_archs:
        few = set(a.largest_archs.split(","))
        kept = {k: s for k, s in specs.items() if s.arch not in few}
        specs = {**kept, **largest_per_group({k: s for k, s in specs.items() if s.arch in few}, by_mode=True)}
    stats["compiles"] = len(specs)
    stats["record_seconds"] = time.perf_counter() - t0
    if not a.quiet:
        print(f"recorded {stats['launches']} launches -> {stats['jit_keys']} JIT specialisations, "
              f"{stats['classes']} kernel classes, {len(specs)} to compile ({stats['record_seconds']:.0f} s)",
              flush=True)

    def progress(i, n, s):
        if not a.quiet and (i % 25 == 0 or i == n or check(s)):
            bad = check(s)
            print(f"[{i}/{n} {time.perf_counter() - t0:.0f} s] {s.arch} {s.group} {s.tile} {s.dtypes[0]}: "
                  f"{s.result.get('shared')} B {s.result.get('registers')} regs {s.result.get('mma')}"
                  f"{' FAIL ' + '; '.join(bad) if bad else ''}", flush=True)

    compile_specs(specs, a.jobs, progress)
    seconds = time.perf_counter() - t0
    command = "python -m tools.aot " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.merge:
        specs, stats, seconds, command = merge(a.merge, specs, stats, seconds, command, sweep_kw,
                                               set(a.archs.split(",")))
    failures = [f"{s.arch} {s.group} {s.tile} {s.dtypes} ({s.example}): {f}" for s in specs.values() for f in check(s)]
    if a.json:
        import triton

        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "source_hash": digest, "triton": triton.__version__, "command": command, "seconds": seconds,
            "stats": stats, "sweep": sweep_kw, "failures": failures, "summary": summary(specs),
            "specs": [_spec_json(s) for s in specs.values()]}, separators=(",", ":")))
    if a.markdown:
        write_markdown(specs, a.markdown, seconds=seconds, stats=stats, sweep_kw=sweep_kw, command=command,
                       digest=digest)
    print(f"{len(specs)} compiles, {len(failures)} failures, {seconds:.0f} s")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


def run_subprocess(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run the gate in its own process, ``TRITON_INTERPRET`` cleared (the kernels are decorated once, at
    import, in one mode per process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    return subprocess.run([sys.executable, "-m", "tools.aot", *args], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
