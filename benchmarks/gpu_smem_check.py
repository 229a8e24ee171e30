"""The shared-memory model against the compiler: for every kernel the ops launch, the bytes
``configs.estimate_shared_memory`` predicts next to the ``metadata.shared`` of the kernel Triton's JIT
compiled (plus its registers and spills).

The model must never be below the compiler (a config the model calls fitting would then fail with
OutOfResources on a smaller GPU); it may be above by its fixed reserve (SMEM_RESERVE) or where two
pipelined loops' buffers partly coexist. Exit status 1 when any launch has predicted < measured.

    python benchmarks/gpu_smem_check.py                        # PiCa layers fwd+bwd at Llama-3-8B sizes
    python benchmarks/gpu_smem_check.py --tune-results benchmarks/results/tune-nvidia-h200.json
    python benchmarks/gpu_smem_check.py --dry-run              # CPU interpreter, tiny: predictions only

``--tune-results`` adds the candidates the tuning sweep compiled (gpu_tune.py records them). The dry run
records the launches and predictions (no compiler runs in the interpreter: measured is null).
Writes ``smem-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import DTYPES, LLAMA3_8B, KernelRecorder, device_slug, interpreter_on, props_for  # noqa: E402
from pica_kernels.ops import pica_linear  # noqa: E402


def layer_step(rows, out_f, in_f, rank, dtype, device, seed=0):
    """One forward + backward of an input-side PiCa layer through the public op (M fp32, trainable)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(out_f, in_f, generator=g, device=device) * in_f**-0.5).to(dtype)
    basis = (torch.randn(rank, in_f, generator=g, device=device) * in_f**-0.5).to(dtype)
    m = (torch.randn(out_f, rank, generator=g, device=device) * 0.1).requires_grad_()
    y = pica_linear(x, w, None, basis, m, backend="triton")
    y.backward(torch.randn_like(y))


def key(r):
    return (r["mode"], r["dtypes"], tuple(sorted(r["config"].items())))


def markdown(meta, rows) -> str:
    lines = [f"# Shared memory: model vs compiler, {meta['device']} ({meta['arch']})", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}. One row per compiled kernel "
             "(mode, dtypes x/weight/factor, config); predicted = configs.estimate_shared_memory, measured = the "
             "JIT's metadata.shared. The model must never be below the compiler.", "",
             f"Kernels: {len(rows)}; measured: {meta['measured']}; model below the compiler: {meta['under']}; "
             f"largest over-estimate: {meta['max_over']} B. {'PARTIAL (time limit)' if meta['partial'] else ''}",
             "", "| mode | dtypes | rows x cols x depth (r) | config (R x C x D, rank tile, warps, stages) | "
             "predicted B | measured B | pred - meas | regs | spills | from |", "|" + "---|" * 10]
    for r in rows:
        c = r["config"]
        meas = r["measured_shared"]
        diff = "-" if meas is None else str(r["predicted_shared"] - meas)
        lines.append(f"| {r['mode']} | {r['dtypes']} | {r['rows']}x{r['cols']}x{r['depth']} ({r['rank']}) | "
                     f"{c['BLOCK_ROWS']}x{c['BLOCK_COLS']}x{c['BLOCK_DEPTH']}, {c['BLOCK_RANK']}, {c['num_warps']}, "
                     f"{c['num_stages']} | {r['predicted_shared']} | {'-' if meas is None else meas} | {diff} | "
                     f"{r.get('n_regs') if r.get('n_regs') is not None else '-'} | "
                     f"{r.get('n_spills') if r.get('n_spills') is not None else '-'} | {r['source']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--arch", default="sm_90", help="dry run: the architecture the predictions are for")
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES))
    ap.add_argument("--tune-results", default=None, help="gpu_tune.py's results JSON: add its candidates")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results (dry run: a temp dir)")
    ap.add_argument("--time-limit", type=float, default=0)
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    interpreter_on(device)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_smem_check.py: no CUDA device (use --dry-run on a CPU)")
    if args.dry_run:
        shapes, tokens, ranks = args.shapes or ["48x40"], args.tokens or [3, 40], args.ranks or [8]
        dtypes = args.dtypes or ["fp16"]
    else:
        shapes = args.shapes or [f"{o}x{i}" for o, i in LLAMA3_8B]
        tokens, ranks = args.tokens or [1, 16, 2048], args.ranks or [16, 64, 256]
        dtypes = args.dtypes or ["bf16", "fp16"]
    props = props_for(device, args.arch)
    import triton

    meta = {"device": props.name if device == "cuda" else f"dry run on CPU (predictions for {props.arch})",
            "arch": props.arch, "smem_per_block": props.smem_per_block, "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dry_run": args.dry_run, "partial": False}
    start = time.monotonic()
    records: dict[tuple, dict] = {}
    with KernelRecorder(props.capability) as rec:
        for dtype in dtypes:
            for rank in ranks:
                for rows in tokens:
                    for shape in shapes:
                        if args.time_limit and time.monotonic() - start > args.time_limit:
                            meta["partial"] = True
                            break
                        out_f, in_f = (int(v) for v in shape.lower().split("x"))
                        layer_step(rows, out_f, in_f, rank, DTYPES[dtype], device)
                        for r in rec.records:
                            records.setdefault(key(r), {**r, "source": "ops"})
                        rec.records.clear()
    if args.tune_results:
        tune = json.loads(Path(args.tune_results).read_text())
        for b in tune.get("buckets", []):
            for c in b["candidates"]:
                if c.get("measured_shared") is None and not args.dry_run:
                    continue
                if "predicted_shared" not in c:
                    continue
                bk = b.get("sizes", b["bucket"])
                r = {"mode": b["mode"], "dtypes": b["dtypes"], "rows": bk["rows"], "cols": bk["cols"],
                     "depth": bk["depth"], "rank": bk["rank"], "config": c["config"],
                     "predicted_shared": c["predicted_shared"], "measured_shared": c.get("measured_shared"),
                     "n_regs": c.get("n_regs"), "n_spills": c.get("n_spills"), "source": "tune"}
                records.setdefault(key(r), r)
    rows = sorted(records.values(), key=lambda r: (r["mode"], r["dtypes"], -r["predicted_shared"]))
    measured = [r for r in rows if r["measured_shared"] is not None]
    under = [r for r in measured if r["predicted_shared"] < r["measured_shared"]]
    meta.update(measured=len(measured), under=len(under), seconds=round(time.monotonic() - start, 1),
                max_over=max((r["predicted_shared"] - r["measured_shared"] for r in measured), default=None))
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="pica-smem-dry-")) if args.dry_run else Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"smem-{'dry-run-' if args.dry_run else ''}{device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "kernels": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")
    if under:
        print(f"gpu_smem_check: the model is BELOW the compiler for {len(under)} kernels", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
