"""Shared machinery of the benchmark suites: method builders, interleaved timing, memory measurement.

Timing. Every comparison is measured side by side: one *round* runs every
method once, in a freshly shuffled order, and a suite runs several rounds
(pytest-benchmark drives the rounds, see the suites). A method's time is the
median over rounds; its ratio to the frozen baseline is the median over rounds
of the per-round ratio, so a load spike from another process hits both sides
of a ratio rather than one method.

Memory, three numbers per method (all in bytes):

* ``saved``: activations autograd keeps for the backward after one forward,
  counted with :func:`torch.autograd.graph.saved_tensors_hooks`: every tensor
  packed for the backward, deduplicated by storage, minus storages that are
  the module's own parameters and buffers (those are resident anyway). This is
  exactly the "what does the layer save" quantity (x, t = x@P.T, a rebuilt
  weight, ...), independent of the allocator.
* ``peak``: the high-water mark of memory allocated during one
  forward+backward, above what was allocated before it. CUDA:
  ``torch.cuda.max_memory_allocated``. CPU: the PyTorch profiler with
  ``profile_memory=True`` logs every allocation (+bytes) and free (-bytes)
  of the CPU allocator; the peak is the maximum of their running sum from the
  start of the profile (the same number as the "Total Allocated" counter of
  its Chrome trace).
* ``resident``: bytes of the method's parameters and buffers (deduplicated),
  i.e. the frozen weight or its replacement (bases, U and V) plus trainables.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .baselines.svft import SVFTLinear

# ------------------------------------------------------------------ settings
RANK = 32  # PiCa's rank in every comparison (the paper's small setting)


def configure() -> None:
    """CPU threads for the suites: ``BENCH_THREADS``, default 1. On the shared 2-core dev machine
    (other jobs running) two threads measured slower and noisier than one: a 2-thread GEMM waits for
    its slower thread (576x1536 by 1024 tokens: median 76 ms with 2 threads, 48 ms with 1, load 3)."""
    if device().type == "cpu":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))


def device() -> torch.device:
    return torch.device(os.environ.get("BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def environment() -> dict:
    """Device description and load, stored with every result."""
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "device": str(device()),
    }
    if device().type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device())
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    return env


# ------------------------------------------------------------------- methods
@dataclass
class Method:
    """A named way to adapt one layer; ``build(base, factors)`` returns the module to run."""

    name: str
    build: Callable[[nn.Linear, dict], nn.Module]
    note: str = ""


def lora_budget_rank(out_f: int, in_f: int, rank: int = RANK) -> int:
    """LoRA rank whose r*(out+in) trainable entries best match PiCa's out*rank on one layer."""
    return max(1, round(out_f * rank / (out_f + in_f)))


class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def peft_layer(base: nn.Linear, rank: int, dora: bool = False) -> nn.Module:
    """The real PEFT LoRA/DoRA layer (``peft.tuners.lora.Linear``) around ``base``, built by get_peft_model."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["lin"], use_dora=dora)
    model = get_peft_model(_Holder(base), cfg)
    return model.base_model.model.lin


def pica_layer(base: nn.Linear, factors: dict, rank: int = RANK) -> nn.Module:
    """PiCaLinear with a given basis (no SVD at benchmark time). Dispatches like the package does:
    the reference math on CPU; the fused kernels on CUDA once pica_kernels.ops provides them."""
    from pica_kernels import PiCaLinear

    # clone: a row slice is a contiguous view that would keep all of Vh (n, in) alive in the layer
    return PiCaLinear(base, rank, basis=factors["vh"][:rank].clone())


class PiCaReference(nn.Module):
    """PiCa on the reference backend (``backend="reference"``: the PyTorch path -- the eager path on CPU, the
    custom op's reference branch on a GPU), whatever ops dispatches to by default."""

    def __init__(self, base: nn.Linear, basis: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("basis", basis.contiguous())
        self.m = nn.Parameter(torch.zeros(base.out_features, basis.shape[0], device=basis.device))

    def forward(self, x):
        from pica_kernels import ops

        return ops.pica_linear(x, self.base.weight, self.base.bias, self.basis, self.m, backend="reference")


def pica_kernel_available(dev: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """True when ``pica_kernels.ops`` routes tensors of this device and dtype to the fused Triton kernels.

    Then the suites run both "pica" (dispatching, i.e. the kernels) and "pica-ref" (the reference
    math called directly) side by side. Follows the ops' dispatch rule (pica_kernels/ops/backend.py).
    """
    from pica_kernels.ops.backend import resolve_backend

    try:
        return resolve_backend("auto", dev, dtype) == "triton"
    except (RuntimeError, ValueError):
        return False


def layer_methods(out_f: int, in_f: int, dev: torch.device, include_svft: bool = True) -> list[Method]:
    rb = lora_budget_rank(out_f, in_f)
    methods = [
        Method("frozen", lambda base, f: base, "the frozen nn.Linear alone (dx only)"),
        Method(f"pica-r{RANK}", lambda base, f: pica_layer(base, f), "PiCaLinear, input side"),
        Method(f"lora-r{RANK}", lambda base, f: peft_layer(base, RANK), "PEFT LoRA, equal rank"),
        Method(f"lora-r{rb}", lambda base, f: peft_layer(base, rb), "PEFT LoRA, equal trainable budget"),
        Method(f"dora-r{RANK}", lambda base, f: peft_layer(base, RANK, dora=True), "PEFT DoRA, equal rank"),
    ]
    if pica_kernel_available(dev):
        methods.insert(2, Method(f"pica-ref-r{RANK}", lambda base, f: PiCaReference(base, f["vh"][:RANK].clone()),
                                 "reference path"))
    if rb == RANK:  # equal rank is equal budget: no duplicate
        methods = [m for m in methods if m.note != "PEFT LoRA, equal trainable budget"]
    if include_svft:
        methods += [
            Method("svft-p", lambda base, f: svft_layer(base, f, "plain", 0), "SVFT plain (diagonal M)"),
            Method("svft-b2", lambda base, f: svft_layer(base, f, "banded", 2), "SVFT banded d=2"),
        ]
    return methods


def svft_layer(base: nn.Linear, factors: dict, pattern: str, d: int) -> nn.Module:
    return SVFTLinear(base, pattern, d, factors=(factors["u"], factors["s"], factors["vh"]))


def make_base(out_f: int, in_f: int, dev: torch.device, dtype=torch.float32, seed: int = 0):
    """A frozen bias-free nn.Linear (Llama style) and synthetic factors ``{u (out,n), s (n,), vh (n,in)}``.

    Timing and memory do not depend on values, so no SVD runs at benchmark time: the factors are
    orthonormal (QR of a Gaussian) up to n = 2048 and scaled Gaussians beyond (a 4096^2 QR costs
    more than the whole suite). ``W`` is ``U diag(s) Vh`` where that is cheap, else independent.
    """
    gen = torch.Generator().manual_seed(seed)
    n = min(out_f, in_f)
    if n <= 2048:
        u = torch.linalg.qr(torch.randn(out_f, n, generator=gen))[0]
        vh = torch.linalg.qr(torch.randn(in_f, n, generator=gen))[0].T
    else:
        u = torch.randn(out_f, n, generator=gen) / out_f**0.5
        vh = torch.randn(n, in_f, generator=gen) / in_f**0.5
    s = torch.linspace(2.0, 0.1, n)
    w = (u * s) @ vh if out_f * in_f * n <= 2048**3 else torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    base = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        base.weight.copy_(w)
    base = base.to(dev, dtype).requires_grad_(False)
    factors = {k: v.to(dev, dtype).contiguous() for k, v in (("u", u), ("s", s), ("vh", vh))}
    return base, factors


def fresh_copy(base: nn.Linear) -> nn.Linear:
    """A separate frozen layer sharing nothing with ``base`` (methods must not share a weight)."""
    new = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                    device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(base.weight)
        if base.bias is not None:
            new.bias.copy_(base.bias)
    return new.requires_grad_(False)


# ------------------------------------------------------------------ counting
def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        st = t.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
    return out


def param_counts(module: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen_params = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    resident = sum(_storages(list(module.parameters()) + list(module.buffers())).values())
    return {"trainable": trainable, "frozen_params": frozen_params, "frozen_buffers": buffers,
            "resident_bytes": resident}


def saved_activation_bytes(fn: Callable[[], torch.Tensor], resident: nn.Module) -> dict:
    """Bytes autograd saves for the backward while ``fn()`` runs a forward (see module docstring)."""
    skip = set(_storages(list(resident.parameters()) + list(resident.buffers())))
    seen: dict[int, int] = {}
    shapes: list = []

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr not in seen and st.nbytes() > 0:
            seen[ptr] = st.nbytes()
            shapes.append(list(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return {"saved_bytes": sum(seen.values()), "saved_shapes": shapes}


def peak_bytes(fn: Callable[[], None], dev: torch.device) -> int:
    """High-water mark of memory allocated while ``fn()`` runs, above what was allocated before."""
    gc.collect()
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return int(torch.cuda.max_memory_allocated(dev) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocation events carry +bytes, frees -bytes; their running sum is the net allocation since start.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return int(peak)


# -------------------------------------------------------------------- timing
@dataclass
class Interleaved:
    """Per-method samples of interleaved rounds (seconds). ``run_round`` is what pytest-benchmark times.

    Clock: on CPU the process CPU time (``time.process_time``), on CUDA wall time after a synchronize.
    The dev machine is shared (load average 3 to 7 on 2 cores while these suites were written): wall
    time then includes the time the OS gives to other jobs, CPU time does not. With one thread, a
    576x1536 GEMM over 1024 tokens measured wall p10/median/p90 31/35/38 ms against CPU time
    22/23/25 ms at load 3.9. Wall times are recorded too (``wall_median_s``).
    """

    fns: dict[str, Callable[[], None]]
    dev: torch.device
    seed: int = 0
    #: calls of each method per sample (the sample is their mean): a forward+backward at T = 1 takes tens
    #: of microseconds, where one call's time is mostly timer and scheduler noise.
    inner: int = 1
    samples: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.samples = {k: [] for k in self.fns}
        self.wall = {k: [] for k in self.fns}
        self.clock_name = "cpu-process-time" if self.dev.type == "cpu" else "wall"
        self._clock = time.process_time if self.dev.type == "cpu" else time.perf_counter

    def run_round(self, record: bool = True) -> None:
        order = list(self.fns)
        self._rng.shuffle(order)
        for name in order:
            sync(self.dev)
            w0, c0 = time.perf_counter(), self._clock()
            for _ in range(self.inner):
                self.fns[name]()
            sync(self.dev)
            c1, w1 = self._clock(), time.perf_counter()
            if record:
                self.samples[name].append((c1 - c0) / self.inner)
                self.wall[name].append((w1 - w0) / self.inner)

    def subset(self, names: dict[str, str]) -> Interleaved:
        """The samples of some methods under new names (``{new: old}``), for separate summaries."""
        sub = Interleaved({new: self.fns[old] for new, old in names.items()}, self.dev, inner=self.inner)
        sub.samples = {new: self.samples[old] for new, old in names.items()}
        sub.wall = {new: self.wall[old] for new, old in names.items()}
        return sub

    def summary(self, baseline: str = "frozen") -> dict[str, dict]:
        out = {}
        base = self.samples.get(baseline)
        for name, xs in self.samples.items():
            if not xs:
                continue
            row = {"median_s": statistics.median(xs), "min_s": min(xs), "rounds": len(xs), "inner": self.inner,
                   "clock": self.clock_name,
                   "wall_median_s": statistics.median(self.wall[name]), "samples_s": xs}
            if base and len(base) == len(xs):
                row["ratio_to_" + baseline] = statistics.median(a / b for a, b in zip(xs, base))
            out[name] = row
        return out


def forward_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Inference forward of the unmerged layer (no graph)."""

    def run():
        with torch.no_grad():
            module(x)

    return run


def train_fn(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    """Forward + backward as inside a network: ``x`` requires grad, so dx is computed for every method."""
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        y = module(xi)
        y.backward(gy)

    return run
