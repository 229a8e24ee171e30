"""Sweep candidate configs of the fused kernel on a GPU and write the tuned-config table.

For every (architecture, regime, shape bucket, dtypes, mode) that the launches of the requested
layers fall into (pica_kernels.ops.kernels.tuned explains the key), the sweep

1. lists candidate configs (``autotune.candidate_configs``: the heuristic's first, then its neighbours),
   pruned by the shared-memory model (``configs.estimate_shared_memory``) and the accumulator's register
   budget before anything is compiled, capped at ``--max-candidates``;
2. runs each once and checks the result against the float64 reference (a candidate over the dtype's
   tolerance is recorded as WRONG and never chosen: that is a kernel bug, report it);
3. times the correct ones with CUDA events (median of ``--reps``, L2 flushed before each);
4. writes an entry when the fastest beats the heuristic's config by more than ``--margin`` (else the
   heuristic stays: no entry, and a stale one for that key is removed).

The table is merged into ``--table`` (default: the shipped pica_kernels/ops/kernels/tuned_configs.json)
after every bucket, atomically, so a sweep stopped by ``--time-limit`` or a kill keeps what it measured;
``--results`` gets every candidate's time (and the compiled kernel's shared memory, registers, spills),
``--results`` with ``.md`` a summary table.

    python benchmarks/gpu_tune.py                                   # the default sweep (Llama-3-8B, bf16)
    python benchmarks/gpu_tune.py --time-limit 120 --max-candidates 6 --results r.json
    python benchmarks/gpu_tune.py --dry-run                         # CPU, seconds: candidates + fake timings
    python benchmarks/gpu_tune.py --list --arch sm_86               # the sweep's plan for an architecture

``--dry-run`` runs on the CPU (Triton's interpreter, tiny shapes): it lists the candidates per bucket for
``--arch`` (the ahead-of-time device table), runs the correctness check of each for real, replaces the
timings by a deterministic fake (a hash of the config) and writes the table to a temporary path unless
``--table`` is given: it checks the script, never the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (  # noqa: E402
    DTYPES,
    LLAMA3_8B,
    KernelRecorder,
    Timer,
    device_slug,
    interpreter_on,
    kinds_for,
    launch_args,
    make_launch,
    props_for,
)
from pica_kernels.ops.kernels import autotune, tuned  # noqa: E402
from pica_kernels.ops.kernels.configs import config_override, regime  # noqa: E402
from pica_kernels.ops.kernels.launchers import DECODE_MAX_T  # noqa: E402

#: Order of the sweep: the launches that dominate a training step first, so a time limit cuts the least.
KIND_ORDER = ("fused", "dx", "decode", "shrink", "s", "dM")


def table_key(select_args: tuple, props) -> tuple[dict, tuple]:
    """(entry fields without config, identity) of a launch (select_config's arguments) on ``props``."""
    rows, cols, depth, rank, mode, dtypes = select_args
    fields = {"arch": props.arch, "mode": mode.name, "regime": regime(rows, cols, mode),
              "dtypes": tuned.dtypes_name(dtypes), "bucket": tuned.shape_bucket(rows, cols, depth, rank)}
    return fields, (fields["arch"], fields["mode"], fields["regime"], fields["dtypes"],
                    tuple(sorted(fields["bucket"].items())))


def entry_identity(e: dict) -> tuple:
    return (e["arch"], e["mode"], e["regime"], e["dtypes"], tuple(sorted(e.get("bucket", {}).items())))


def plan(args, props) -> list[tuple[dict, tuple, tuple]]:
    """The buckets to sweep, in :data:`KIND_ORDER`, each with one representative launch spec."""
    seen, out = set(), []
    specs = []
    for rows in args.tokens:
        for rank in args.ranks:
            for out_f, in_f in args.shapes:
                for kind in kinds_for(rows, rank):
                    if rows <= DECODE_MAX_T and kind in ("s", "dx", "dM"):
                        continue  # T <= 16 is generation: no backward to tune
                    specs.append((KIND_ORDER.index(kind), kind, rows, out_f, in_f, rank))
    specs.sort(key=lambda s: s[0])  # stable: keeps the T / r / shape order inside a kind
    for _, kind, rows, out_f, in_f, rank in specs:
        for dtype in args.dtypes:
            spec = (kind, rows, out_f, in_f, rank, DTYPES[dtype], DTYPES[args.m_dtype or dtype])
            fields, ident = table_key(launch_args(*spec), props)
            if ident not in seen:
                seen.add(ident)
                out.append((fields, ident, spec))
    return out


def fake_ms(config: dict) -> float:
    """Dry run: a deterministic stand-in for a timing."""
    return 1.0 + zlib.crc32(json.dumps(config, sort_keys=True).encode()) % 1000 / 1000


def load_table(path: Path) -> dict:
    if path.exists():
        obj = json.loads(path.read_text())
        tuned.Table.from_json(obj, str(path))  # refuse to merge into something that is not a table
        return obj
    return tuned.empty_table()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def merge(table: dict, fields: dict, entry: dict | None) -> dict:
    """Replace the table's entry for ``fields``' key and bucket by ``entry`` (None: remove it)."""
    ident = entry_identity(fields)
    entries = [e for e in table["entries"] if entry_identity(e) != ident]
    if entry is not None:
        entries.append(entry)
    entries.sort(key=entry_identity)
    return {**table, "entries": entries}


def sweep_bucket(fields, spec, props, args, timer, deadline) -> dict:
    """Candidates of one bucket: check, time, choose. Returns the bucket's record (and ``entry``)."""
    kind, rows, out_f, in_f, rank, dtype, m_dtype = spec
    launch = make_launch(kind, rows, out_f, in_f, rank, dtype, m_dtype, args.device)
    sel = launch.select_args()
    candidates = autotune.candidate_configs(*sel, props, limit=args.max_candidates)
    record = {**fields, "launch": launch.name, "sizes": dict(zip(("rows", "cols", "depth", "rank"), sel[:4])),
              "candidates": [], "partial": False}
    for i, cand in enumerate(candidates):
        if time.monotonic() > deadline and i > 0:
            record["partial"] = True
            break
        row = {"config": cand, "heuristic": i == 0}
        try:
            with config_override(**cand), KernelRecorder(props.capability) as rec:
                launch.out.fill_(float("nan"))
                launch.run()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
            err = launch.error()
            row["error"] = err
            if rec.records:
                r = rec.records[-1]
                row.update(predicted_shared=r["predicted_shared"], measured_shared=r["measured_shared"],
                           n_regs=r["n_regs"], n_spills=r["n_spills"])
            if not err <= launch.tolerance():  # NaN too
                row["status"] = "WRONG"
            else:
                with config_override(**cand):
                    row["ms"] = fake_ms(cand) if args.dry_run else timer(launch.run)
                row["status"] = "ok"
        except Exception as exc:  # does not build or launch on this GPU: recorded, never chosen
            row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        record["candidates"].append(row)
        print(f"  {row['status']:>6} {row.get('ms', float('nan')):8.4f} ms  err {row.get('error', float('nan')):.2e}"
              f"  {cand}", flush=True)
    timed = [r for r in record["candidates"] if r["status"] == "ok"]
    heur = next((r for r in timed if r["heuristic"]), None)
    record["heuristic_ms"] = heur["ms"] if heur else None
    best = min(timed, key=lambda r: r["ms"], default=None)
    record["best"] = best
    entry = None
    if best is not None and not best["heuristic"] and (heur is None or best["ms"] < heur["ms"] * (1 - args.margin)):
        entry = {**fields, "config": dict(best["config"]), "measured": {
            "device": args.device_name, "ms": round(best["ms"], 5),
            "heuristic_ms": round(heur["ms"], 5) if heur else None, "launch": launch.name,
            "triton": args.triton, "date": args.date, **({"fake_timings": True} if args.dry_run else {})}}
    record["entry"] = entry
    return record


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [f"# Tuning sweep: {meta['device']} ({meta['arch']})", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}; {meta.get('buckets_done', 0)}/"
             f"{meta['buckets_planned']} buckets in {meta.get('seconds', 0)} s, up to {meta['max_candidates']} "
             f"candidates each (the heuristic's first), median of {meta['reps']} with the L2 flushed; an entry when "
             f"> {meta['margin']:.0%} faster than the heuristic."
             + (" DRY RUN: fake timings." if meta["dry_run"] else "")
             + (" PARTIAL (time limit)." if meta.get("partial") else ""), "",
             "| mode | regime | dtypes | launch | candidates (ok / wrong / failed) | heuristic ms | best ms | "
             "speed-up | entry |", "|" + "---|" * 9]
    for r in records:
        st = [c["status"] for c in r["candidates"]]
        counts = f"{st.count('ok')} / {st.count('WRONG')} / {sum(x.startswith('failed') for x in st)}"
        heur, best = r.get("heuristic_ms"), (r.get("best") or {}).get("ms")
        speed = f"{heur / best:.3f}" if heur and best else "-"
        e = r.get("entry")
        cfg = "-" if e is None else ", ".join(f"{k}={v}" for k, v in e["config"].items())
        lines.append(f"| {r['mode']} | {r['regime']} | {r['dtypes']} | {r['launch']} | {counts} | "
                     f"{heur if heur is None else round(heur, 4)} | {best if best is None else round(best, 4)} | "
                     f"{speed} | {cfg} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, real checks, fake timings")
    ap.add_argument("--arch", default="sm_90", help="dry run / --list: the architecture (ahead-of-time table)")
    ap.add_argument("--list", action="store_true", help="print the buckets and capped candidate lists of the "
                                                        "sweep for --arch (no launches, no GPU) and exit")
    ap.add_argument("--device", default=None)
    ap.add_argument("--table", default=None, help="table to merge into (default: the shipped one; dry run: a "
                                                  "temporary file)")
    ap.add_argument("--results", default=None, help="raw results JSON (default benchmarks/results/"
                                                    "tune-<device>.json; dry run: next to the table)")
    ap.add_argument("--shapes", nargs="+", default=None, help="OUTxIN (default: Llama-3-8B's four)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default 4096 1)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="default 16 64 256")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES), help="x dtypes (default bf16)")
    ap.add_argument("--m-dtype", default="fp32", choices=sorted(DTYPES), help="M's dtype (PiCaLinear: fp32)")
    ap.add_argument("--max-candidates", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--margin", type=float, default=0.02, help="an entry only when >= this much faster")
    ap.add_argument("--time-limit", type=float, default=0, help="seconds; stop (and keep the results) after it")
    args = ap.parse_args(argv)
    if args.list and not args.dry_run:
        args.device = args.device or "cpu"  # planning only: the real sweep's sizes, the table's device
    if args.dry_run:
        args.device = args.device or "cpu"
        args.shapes = args.shapes or ["48x40", "40x72"]
        args.tokens = args.tokens or [40, 3]
        args.ranks = args.ranks or [8]
        args.dtypes = args.dtypes or ["fp16"]
        args.max_candidates = min(args.max_candidates, 3)
        args.reps = 1
    else:
        args.device = args.device or "cuda"
        args.shapes = args.shapes or [f"{o}x{i}" for o, i in LLAMA3_8B]
        args.tokens = args.tokens or [4096, 1]
        args.ranks = args.ranks or [16, 64, 256]
        args.dtypes = args.dtypes or ["bf16"]
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        props = props_for(args.device, args.arch)
        buckets = plan(args, props)
        compiles = set()
        for fields, _, spec in buckets:
            cands = autotune.candidate_configs(*launch_args(*spec), props, limit=args.max_candidates)
            compiles.update((fields["mode"], fields["dtypes"], tuple(sorted(c.items()))) for c in cands)
            print(f"{fields['mode']} {fields['regime']} {fields['dtypes']} {fields['bucket']}: {len(cands)} candidates")
            for c in cands:
                print(f"    {c}")
        print(f"{len(buckets)} buckets on {props.arch}, about {len(compiles)} distinct kernels to compile")
        return 0
    interpreter_on(args.device)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_tune.py: no CUDA device (use --dry-run on a CPU)")
    props = props_for(args.device, args.arch)
    slug = device_slug(args.device)
    try:
        import triton

        args.triton = triton.__version__
    except ImportError:
        raise SystemExit("gpu_tune.py needs triton") from None
    args.device_name = props.name if args.device.startswith("cuda") else f"dry run on {platform.machine()} CPU"
    args.date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if args.dry_run:
        out_dir = Path(tempfile.mkdtemp(prefix="pica-tune-dry-")) if not (args.table or args.results) else None
        table_path = Path(args.table) if args.table else out_dir / "tuned_configs.json"
        results_path = Path(args.results) if args.results else table_path.with_name(f"tune-dry-run-{props.arch}.json")
    else:
        table_path = Path(args.table) if args.table else tuned.TABLE_PATH
        results_path = Path(args.results) if args.results else (
            Path(__file__).resolve().parent / "results" / f"tune-{slug}.json")
    table = load_table(table_path)
    timer = Timer(args.device, reps=args.reps, warmup=0 if args.dry_run else 3)
    start = time.monotonic()
    deadline = start + args.time_limit if args.time_limit > 0 else float("inf")
    buckets = plan(args, props)
    meta = {"device": args.device_name, "arch": props.arch, "smem_per_block": props.smem_per_block,
            "sm_count": props.sm_count, "torch": torch.__version__, "triton": args.triton, "date": args.date,
            "dry_run": args.dry_run, "max_candidates": args.max_candidates, "reps": args.reps,
            "margin": args.margin, "buckets_planned": len(buckets), "table": str(table_path)}
    records = []
    print(f"gpu_tune: {len(buckets)} buckets on {props.name} ({props.arch}); table {table_path}", flush=True)
    for fields, _, spec in buckets:
        if time.monotonic() > deadline:
            break
        print(f"{fields['mode']} {fields['regime']} {fields['dtypes']} {fields['bucket']}", flush=True)
        record = sweep_bucket(fields, spec, props, args, timer, deadline)
        records.append(record)
        if not record["partial"]:  # a bucket cut short keeps the table as it was
            table = merge(table, fields, record["entry"])
            write_json(table_path, table)
        meta.update(buckets_done=sum(not r["partial"] for r in records), seconds=round(time.monotonic() - start, 1),
                    partial=len(records) < len(buckets) or any(r["partial"] for r in records))
        write_json(results_path, {"meta": meta, "buckets": records})
    meta.update(buckets_done=sum(not r["partial"] for r in records), seconds=round(time.monotonic() - start, 1),
                partial=len(records) < len(buckets) or any(r["partial"] for r in records))
    write_json(results_path, {"meta": meta, "buckets": records})
    results_path.with_suffix(".md").write_text(markdown(meta, records))
    if not table_path.exists():
        write_json(table_path, table)
    wrong = [(r["launch"], c["config"]) for r in records for c in r["candidates"] if c["status"] == "WRONG"]
    entries = sum(r["entry"] is not None for r in records)
    print(f"gpu_tune: {meta['buckets_done']}/{len(buckets)} buckets in {meta['seconds']} s, {entries} new entries; "
          f"table {table_path}; results {results_path}")
    if wrong:
        print(f"gpu_tune: {len(wrong)} candidates gave WRONG results (kernel bug): {wrong}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
