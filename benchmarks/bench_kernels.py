"""Time PiCa's fused kernels against the frozen layer, the reference path and LoRA baselines.

Methods (one linear layer, out x in, rank r, x requiring grad as inside a network):

    frozen          F.linear(x, W): the floor
    pica_kernel     pica_linear(..., backend="triton"): the fused Triton kernels
    pica_reference  pica_linear(..., backend="reference"): PyTorch ops (3 GEMMs + add)
    lora_addmm      Unsloth-style LoRA: base GEMM, then addmm_ of the low-rank term
                    into it; custom backward with addmm_ as well
    peft_lora       PEFT's lora.Linear with its defaults (fp32 adapter weights), if peft imports

Per (T, out, in, r): forward (no_grad, inference) and forward+backward (dx and
the trainable factors) median time with the L2 cache flushed before every
repetition (CUDA), peak memory of forward+backward above the inputs (CUDA), and
the bytes of activations autograd saves (every device: ``saved_tensors_hooks``,
parameters and buffers excluded). Derived columns: PiCa forward over the frozen
forward against the roofline ``1 + r(out+in)/(out*in)``, and PiCa forward+backward
speed-up over PEFT LoRA (issue 4's goals: within 3% of the roofline at T >= 2048;
>= 1.35x).

    python benchmarks/bench_kernels.py                 # full grid, CUDA, bf16
    python benchmarks/bench_kernels.py --time-limit 150 --out-dir DIR   # what benchmarks/gpu.sh runs
    python benchmarks/bench_kernels.py --smoke         # tiny, CPU, seconds (CI/syntax check)

Default grid: Llama-3-8B's projections (4096x4096 q/o, 1024x4096 k/v, 14336x4096 gate/up, 4096x14336
down), T in {1, 16, 256, 2048, 8192}, r in {16, 64, 256}; the cells run in priority order (T = 2048
first, then decode, then the rest) and the files are rewritten after every cell, so ``--time-limit``
(seconds) stops between cells and leaves a partial, labelled result.

Writes ``<out-dir>/kernels-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import Timer  # noqa: E402  (CUDA events, L2 flushed before each repetition)
from pica_kernels.ops import pica_linear  # noqa: E402
from pica_kernels.ops.backend import triton_can_run  # noqa: E402

METHODS = ["frozen", "pica_kernel", "pica_reference", "lora_addmm", "peft_lora"]


# ----------------------------------------------------------------------------- methods


class AddmmLoRA(torch.autograd.Function):
    """Unsloth-style LoRA: ``y = x@W.T``, then ``y.addmm_(x@A.T, B.T, alpha=s)``; W frozen.

    x (T, in), W (out, in), A (r, in), B (out, r). Saves x (dA needs it) and t = x@A.T.
    """

    @staticmethod
    def forward(ctx, x, w, a, b, scale):
        t = x @ a.to(x.dtype).T
        y = x @ w.T
        y.addmm_(t, b.to(x.dtype).T, alpha=scale)
        ctx.save_for_backward(x, w, a, b, t)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, a, b, t = ctx.saved_tensors
        s = ctx.scale
        dt = (dy @ b.to(dy.dtype)) * s  # (T, r)
        db = (dy.T @ t).mul_(s).to(b.dtype)
        da = (dt.T @ x).to(a.dtype)
        dx = dy @ w
        dx.addmm_(dt, a.to(dy.dtype))
        return dx, None, da, db, None


def build(method: str, out_f: int, in_f: int, rank: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Returns (f(x) -> y for x (T, in), list of trainable tensors, list of frozen tensors) or None if unavailable."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(device=device, dtype=dtype)
    if method == "frozen":
        return (lambda x: F.linear(x, w)), [], [w]
    if method.startswith("pica"):
        backend = "triton" if method == "pica_kernel" else "reference"
        if backend == "triton" and not triton_can_run(torch.device(device)):
            return None
        basis = torch.linalg.qr(torch.randn(in_f, rank, generator=g)).Q.T.contiguous()  # (r, in) orthonormal rows
        basis = basis.to(device=device, dtype=dtype)
        m = (torch.randn(out_f, rank, generator=g) * 0.01).to(device).requires_grad_()  # fp32, as PiCaLinear keeps it
        return (lambda x: pica_linear(x, w, None, basis, m, backend=backend)), [m], [w, basis]
    if method == "lora_addmm":
        a = (torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)).to(device).requires_grad_()
        b = (torch.randn(out_f, rank, generator=g) * 0.01).to(device).requires_grad_()
        return (lambda x: AddmmLoRA.apply(x, w, a, b, 1.0)), [a, b], [w]
    if method == "peft_lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            return None
        base = torch.nn.Sequential()
        base.add_module("proj", torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype))
        with torch.no_grad():
            base.proj.weight.copy_(w)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], lora_dropout=0.0))
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.01)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return layer, trainable, [layer.base_layer.weight]
    raise ValueError(method)


# ----------------------------------------------------------------------------- timing




def saved_activation_bytes(f, x, frozen_and_trainable) -> int:
    """Bytes autograd saves for backward in one forward, parameters/buffers excluded."""
    known = {t.untyped_storage().data_ptr() for t in frozen_and_trainable}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(x)
    return total


def measure(method, rows, out_f, in_f, rank, dtype, device, timer) -> dict | None:
    built = build(method, out_f, in_f, rank, dtype, device)
    if built is None:
        return None
    f, trainable, frozen = built
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, in_f, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(rows, out_f, generator=g).to(device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            f(x)

    def fwd_bwd():
        for p in [x, *trainable]:
            p.grad = None
        f(x).backward(dy)

    row = {"method": method, "T": rows, "out": out_f, "in": in_f, "r": rank}
    row["fwd_ms"] = timer.median_ms(fwd)
    row["fwd_bwd_ms"] = timer.median_ms(fwd_bwd)
    row["saved_act_mb"] = saved_activation_bytes(f, x, [x, *trainable, *frozen] if method == "frozen"
                                                 else [*trainable, *frozen]) / 2**20
    if timer.cuda:
        fwd_bwd()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return row


# ----------------------------------------------------------------------------- report


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# PiCa kernel benchmarks: {meta['device']}",
        "",
        f"{meta['timestamp']}, torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}, "
        f"median of {meta['reps']} (L2 flushed: {meta['l2_flush']}). Times in ms."
        + (" PARTIAL: stopped by the time limit before every cell ran." if meta.get("partial") else ""),
        "",
        "roofline = 1 + r(out+in)/(out*in); pica/frozen = pica_kernel fwd / frozen fwd (goal: <= roofline + 3% "
        "at T >= 2048); vs PEFT = peft_lora fwd+bwd / pica_kernel fwd+bwd (goal: >= 1.35).",
        "",
    ]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    head = ["T", "out x in", "r"] + [f"{m} fwd" for m in methods] + [f"{m} f+b" for m in methods]
    head += ["pica/frozen", "roofline", "vs PEFT", "saved act MB (pica / lora_addmm)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["out"], r["in"], r["r"], r["T"]) for r in results})
    for out_f, in_f, rank, rows in keys:
        by = {r["method"]: r for r in results if (r["out"], r["in"], r["r"], r["T"]) == (out_f, in_f, rank, rows)}
        cells = [str(rows), f"{out_f}x{in_f}", str(rank)]
        cells += [f"{by[m]['fwd_ms']:.3f}" if m in by else "-" for m in methods]
        cells += [f"{by[m]['fwd_bwd_ms']:.3f}" if m in by else "-" for m in methods]
        roof = 1 + rank * (out_f + in_f) / (out_f * in_f)
        ratio = by["pica_kernel"]["fwd_ms"] / by["frozen"]["fwd_ms"] if "pica_kernel" in by and "frozen" in by else None
        speed = (by["peft_lora"]["fwd_bwd_ms"] / by["pica_kernel"]["fwd_bwd_ms"]
                 if "peft_lora" in by and "pica_kernel" in by else None)
        cells += [f"{ratio:.3f}" if ratio else "-", f"{roof:.3f}", f"{speed:.2f}" if speed else "-"]
        pica = by.get("pica_kernel", by.get("pica_reference"))
        lora = by.get("lora_addmm")
        cells.append(f"{pica['saved_act_mb']:.3g} / {lora['saved_act_mb']:.3g}" if pica and lora else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, 3 reps: checks the script runs")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default 2048 1 8192 256 16)")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="OUTxIN (default Llama-3-8B: 4096x4096 1024x4096 14336x4096 4096x14336)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="default 64 16 256")
    ap.add_argument("--time-limit", type=float, default=0, help="seconds; stop between cells after it")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results (smoke: a temp dir)")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        tokens, shapes, ranks = args.tokens or [3, 17], args.shapes or ["48x40", "40x72"], args.ranks or [4, 8]
        dtype = getattr(torch, args.dtype or "float32")
        reps, warmup = args.reps or 3, 1
    else:
        tokens = args.tokens or [2048, 1, 8192, 256, 16]
        shapes = args.shapes or ["4096x4096", "1024x4096", "14336x4096", "4096x14336"]
        ranks = args.ranks or [64, 16, 256]
        dtype = getattr(torch, args.dtype or "bfloat16")
        reps, warmup = args.reps or 25, 5
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in shapes]
    timer = Timer(device, reps, warmup)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    dev_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else (platform.processor() or "cpu")
    meta = {
        "device": dev_name, "torch": torch.__version__, "triton": triton_version, "dtype": str(dtype),
        "reps": reps, "l2_flush": timer.cuda, "smoke": args.smoke,
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
    }
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(os.environ.get("TMPDIR", "/tmp")) / "pica-bench-smoke" if args.smoke
        else Path(__file__).resolve().parent / "results"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-") or "device"
    stem = out_dir / f"kernels-{'smoke-' if args.smoke else ''}{slug}"

    def write(results, partial):
        meta["partial"] = partial
        meta["skipped_methods"] = sorted(skipped)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(results, meta))

    results, skipped = [], set()
    start = time.monotonic()
    cells = [(rows, rank, shape) for rows in tokens for rank in ranks for shape in shapes]  # priority order
    partial = False
    for i, (rows, rank, (out_f, in_f)) in enumerate(cells):
        if args.time_limit and time.monotonic() - start > args.time_limit:
            partial = True
            print(f"time limit ({args.time_limit:.0f} s): {len(cells) - i} of {len(cells)} cells not run", flush=True)
            break
        for method in args.methods:
            row = measure(method, rows, out_f, in_f, rank, dtype, device, timer)
            if row is None:
                skipped.add(method)
                continue
            results.append(row)
            print(json.dumps(row), flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        write(results, True)
    write(results, partial)
    print(markdown(results, meta))
    if skipped:
        print(f"skipped (unavailable here): {', '.join(sorted(skipped))}")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
