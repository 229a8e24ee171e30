"""Time AND accuracy of truncated_svd vs the float32 full SVD (the baseline) and torch.svd_lowrank; JSON + markdown.

    python benchmarks/run_svd_bench.py                                  # CPU: 4096² at r = 64, 256 + SmolLM2 r = 32
    python benchmarks/run_svd_bench.py --sizes --shapes 4096x14336 --rounds 3 --no-smollm2 --append
    python benchmarks/run_svd_bench.py --device cuda --llama            # GPU: + Llama-3-8B-shaped targets at r=256

The speed-up baseline is ``torch.linalg.svd(W.float())`` per layer: what the official PiCa code runs.
Methods are interleaved in rounds (each round in a shuffled order, so a burst of load on a shared
machine hits them alike) and the median time is reported; the float64 SVD that accuracy is measured
against (energy ratio, mean cos² of principal angles, orthonormality; worst over matrices) is timed
once, for context. ``--append`` adds the cases to the existing JSON/markdown (one table per case and
rank, so several shorter runs build one result).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pica_kernels, not an installed one
from svd_common import llm_like_matrix, smollm2_projections  # noqa: E402

from pica_kernels import svd as svd_mod  # noqa: E402
from pica_kernels.svd import resolve_knobs, truncated_svd  # noqa: E402
from tools.svd_accuracy import accuracy_report  # noqa: E402

ENERGY_BAR = 0.9999
BASELINE = "torch.linalg.svd float32 (baseline)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def lowrank_basis(w: torch.Tensor, rank: int, q: int, niter: int) -> torch.Tensor:
    """torch.svd_lowrank's top-rank input-side basis, (..., rank, in)."""
    _, _, v = torch.svd_lowrank(w, q=q, niter=niter)
    return v[..., :rank].transpose(-1, -2)


def full32_basis(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The official PiCa code's basis: a float32 full SVD per layer, (..., rank, in)."""
    return torch.linalg.svd(w.float(), full_matrices=False)[2][..., :rank, :]


def interleaved(tasks: dict[str, callable], rounds: int, device: str) -> tuple[dict[str, list[float]], dict]:
    """Run every task once per round, in a shuffled order per round; returns (times per task, last outputs)."""
    times: dict[str, list[float]] = {name: [] for name in tasks}
    outs = {}
    for rnd in range(rounds):
        order = list(tasks)
        random.Random(rnd).shuffle(order)
        for name in order:
            t = time.perf_counter()
            outs[name] = tasks[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
        print(f"  round {rnd + 1}/{rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)
    return times, outs


def path_of(method: str, rank: int, m: int, n: int) -> str:
    """The path a call takes, for the tables: "gram", "full" or "krylov v2, block 80, 8 steps"."""
    return resolve_knobs(method, rank, m, n).describe()


def finish_rows(rows: list[dict]) -> None:
    base = next(r["time_s"] for r in rows if r["method"].startswith(BASELINE.split(" (")[0]))
    for r in rows:
        r["speedup_vs_full32"] = base / r["time_s"]


def matrix_case(m: int, n: int, ranks: list[int], device: str, rounds: int, twin: bool) -> list[dict]:
    """One LLM-like (m, n) matrix, every rank in one interleaved run; one result per rank."""
    w_cpu = llm_like_matrix(m, n)
    w = w_cpu.to(device)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    ref = torch.linalg.svd(w_cpu.double(), full_matrices=False)
    t_full64 = time.perf_counter() - t
    tasks = {BASELINE: lambda: full32_basis(w, max(ranks))}
    labels = {}
    for r in ranks:
        methods = [("accurate", svd_mod.backend())]
        if twin and svd_mod.HAS_CPP:
            methods.append(("accurate", "torch"))
        methods += [("accurate-v1", svd_mod.backend()), ("fast", svd_mod.backend())]
        for meth, be in methods:
            name = f"r={r} truncated_svd {meth} [{be}]"
            tasks[name] = lambda r=r, meth=meth, be=be: truncated_svd(w, r, method=meth, backend=be)[0]
            labels[name] = (r, f"truncated_svd {meth} [{be}]", path_of(meth, r, m, n))
        for q, niter in ((8, 4), (16, 16)):
            name = f"r={r} svd_lowrank q=r+{q} niter={niter}"
            tasks[name] = lambda r=r, q=q, niter=niter: lowrank_basis(w, r, r + q, niter)
            labels[name] = (r, f"svd_lowrank q=r+{q} niter={niter}", "")
    times, outs = interleaved(tasks, rounds, device)
    load1 = os.getloadavg()[0]
    cases = []
    for r in ranks:
        ref_r = (ref[0], ref[1], ref[2])
        rows = [{"method": "torch.linalg.svd float64 (accuracy reference, timed once)", "time_s": t_full64,
                 "energy": 1.0, "cos2": 1.0}]
        base_basis = outs[BASELINE][..., :r, :]
        rows.append({"method": BASELINE, "time_s": statistics.median(times[BASELINE]), "times": times[BASELINE],
                     **accuracy_report(w_cpu, base_basis.cpu(), "input", reference=ref_r)})
        for name, (rank, label, path) in labels.items():
            if rank != r:
                continue
            rows.append({"method": label, "path": path, "time_s": statistics.median(times[name]),
                         "times": times[name], **accuracy_report(w_cpu, outs[name].cpu(), "input", reference=ref_r)})
        finish_rows(rows)
        cases.append({"case": f"{m}x{n}", "matrix": "LLM-like: sigma_i = i^-0.5 power-law head over a 5% "
                      "Marchenko-Pastur noise bulk, no spectral gap at r", "rank": r, "rounds": rounds,
                      "loadavg": [round(load0, 2), round(load1, 2)], "rows": rows})
    return cases


def group_by_shape(weights: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for name, w in weights.items():
        groups.setdefault((name.rsplit(".", 1)[-1], tuple(w.shape)), []).append(w)
    return [(role, torch.stack(ws)) for (role, _), ws in groups.items()]


def model_case(name: str, stacks: list[tuple[str, torch.Tensor]], rank: int, device: str, rounds: int,
               sample: bool = False) -> dict:
    """All targets of a model: per-group batched truncated_svd (as apply_pica) vs a per-layer float32 full-SVD loop.

    stacks: (role, (L, out, in)) batches. Accuracy is checked on every layer, or with ``sample`` on the first
    layer of each role only (the float64 reference SVDs are the expensive part); ``sample`` also times the
    float32 full-SVD loop on those layers once and extrapolates (same shape, same cost per matrix)."""
    stacks = [(role, s.to(device)) for role, s in stacks]
    n_layers = sum(s.shape[0] for _, s in stacks)
    seen: set[str] = set()
    checks = []
    for role, s in stacks:
        checks.append(list(range(s.shape[0])) if not sample else ([] if role in seen else [0]))
        seen.add(role)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    refs = [{i: tuple(x.cpu() for x in torch.linalg.svd(s[i].double(), full_matrices=False)) for i in idx}
            for (_, s), idx in zip(stacks, checks)]
    t_full64 = time.perf_counter() - t
    checked = sum(len(c) for c in checks)
    tasks = {}
    if not sample:
        tasks[BASELINE] = lambda: [torch.stack([full32_basis(m, rank) for m in s]) for _, s in stacks]
    for meth in ("accurate", "accurate-v1", "fast"):
        tasks[f"truncated_svd {meth} (batched per group)"] = (
            lambda meth=meth: [truncated_svd(s, rank, method=meth)[0] for _, s in stacks])
    tasks["svd_lowrank q=r+8 niter=4 (loop)"] = (
        lambda: [torch.stack([lowrank_basis(m, rank, rank + 8, 4) for m in s]) for _, s in stacks])
    times, outs = interleaved(tasks, rounds, device)
    if sample:  # float32 full SVD of one layer per role, scaled by the layers of that role
        per_role: dict[str, float] = {}
        for (role, s), idx in zip(stacks, checks):
            for i in idx:
                t = time.perf_counter()
                full32_basis(s[i], rank)
                sync(device)
                per_role[role] = time.perf_counter() - t
        times[BASELINE] = [sum(per_role[role] * s.shape[0] for role, s in stacks)]
        outs[BASELINE] = None
    rows = [{"method": "torch.linalg.svd float64 loop (accuracy reference, timed once)", "time_s": t_full64,
             "energy": 1.0, "cos2": 1.0, "extrapolated": checked < n_layers}]
    for label in (BASELINE, *[t for t in tasks if t != BASELINE]):
        worst = {"energy": 1.0, "cos2": 1.0, "ortho": 0.0}
        if outs[label] is not None:
            for (_, s), b, rr in zip(stacks, outs[label], refs):
                for i, ref in rr.items():
                    rep = accuracy_report(s[i].cpu(), b[i].cpu(), "input", reference=ref)
                    worst = {"energy": min(worst["energy"], rep["energy"]), "cos2": min(worst["cos2"], rep["cos2"]),
                             "ortho": max(worst["ortho"], rep["ortho"])}
        else:
            worst = {}
        row = {"method": label + (" loop" if label == BASELINE else ""), "time_s": statistics.median(times[label]),
               "times": times[label], **worst}
        if label.startswith("truncated_svd"):
            meth = label.split()[1]
            row["path"] = "; ".join(sorted({f"{role}: {path_of(meth, rank, *s.shape[-2:])}" for role, s in stacks}))
        if label == BASELINE and sample:
            row["extrapolated"] = True
        rows.append(row)
    finish_rows(rows)
    return {"case": name, "rank": rank, "layers": n_layers, "checked_layers": checked, "rounds": rounds,
            "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)], "rows": rows}


def llama3_8b_stacks(device: str, layers: int = 32) -> list[tuple[str, torch.Tensor]]:
    """Llama-3-8B-shaped targets (all seven projections x 32 layers) with a flat power-law + noise spectrum.

    Gaussian factors instead of QR (singular values ~ i^-0.5 up to Marchenko-Pastur distortion): building
    224 exact spectra by QR would take longer than the SVDs being measured."""
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
              "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
    stacks = []
    for role, (m, n) in shapes.items():
        d = min(m, n)
        s = torch.arange(1, d + 1, device=device, dtype=torch.float32) ** -0.5
        a = torch.randn(layers, m, d, generator=gen, device=device) / math.sqrt(m)
        b = torch.randn(layers, d, n, generator=gen, device=device) / math.sqrt(n)
        w = (a * s) @ b
        w += torch.randn(layers, m, n, generator=gen, device=device) * (0.05 / (math.sqrt(m) + math.sqrt(n)))
        del a, b
        # Batches of <= 2**27 elements, as apply_pica (model._SVD_BATCH_ELEMENTS).
        step = max(1, 2**27 // (m * n))
        stacks += [(role, chunk) for chunk in w.split(step)]
    return stacks


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu})"


def to_markdown(result: dict) -> str:
    lines = [f"# truncated_svd benchmark: {result['device']}", "",
             f"torch {result['torch']}, backend `{result['backend']}`, threads {result['threads']}. "
             "Speed-up = median time of the float32 full SVD `torch.linalg.svd(W.float())` (what the official "
             "PiCa code runs per layer) / median time of the method, both from the same interleaved run "
             "(rounds in shuffled order). Energy = ‖W V‖²_F / Σ_{i≤r} σ_i² (1 = optimal), cos² = mean cos² of the "
             "principal angles to the float64 SVD, worst over the matrices checked.", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    for case in result["cases"]:
        extra = f", {case['layers']} layers (accuracy on {case['checked_layers']})" if "layers" in case else ""
        lines += [f"## {case['case']}, r = {case['rank']}{extra}", ""]
        meta = f"{case.get('rounds', 1)} rounds, load average {case['loadavg'][0]} -> {case['loadavg'][1]}" \
            if "loadavg" in case else ""
        if case.get("matrix"):
            meta = f"{case['matrix']}; {meta}"
        if case.get("command"):
            meta += f"; `{case['command']}`"
        if meta:
            lines += [meta, ""]
        lines += ["| method | path | median time (s) | speed-up vs fp32 full SVD | energy | cos² | ‖VᵀV−I‖_max |",
                  "|---|---|---|---|---|---|---|"]
        for r in case["rows"]:
            def f(k, fmt, r=r):
                return format(r[k], fmt) if k in r and r[k] == r[k] else "–"

            t = f("time_s", ".3f") + (" (extrap.)" if r.get("extrapolated") else "")
            lines.append(f"| {r['method']} | {r.get('path', '')} | {t} | {f('speedup_vs_full32', '.1f')} | "
                         f"{f('energy', '.6f')} | {f('cos2', '.5f')} | {f('ortho', '.1e')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096], help="square LLM-like matrices")
    ap.add_argument("--shapes", nargs="*", default=[], help="more LLM-like matrices, as MxN (e.g. 4096x14336)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--twin", action="store_true", help="also time the pure-torch backend of 'accurate'")
    ap.add_argument("--smollm2-rank", type=int, default=32)
    ap.add_argument("--smollm2-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                    help="projections (default: PiCa's default targets)")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--llama", action="store_true", help="Llama-3-8B-shaped targets at r=256 (GPU)")
    ap.add_argument("--append", action="store_true", help="add to the existing results (replacing equal cases)")
    ap.add_argument("--note", default=None, help="a line for the markdown (e.g. the machine's state)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/svd_<device>)")
    args = ap.parse_args()
    dev = args.device
    stem = Path(args.out or Path(__file__).resolve().parent / "results" / f"svd_{dev}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    header = {"device": device_name(dev), "torch": torch.__version__, "backend": svd_mod.backend(),
              "threads": torch.get_num_threads()}
    result = {**header, "cases": []}
    if args.append and stem.with_suffix(".json").exists():
        result = {**json.loads(stem.with_suffix(".json").read_text()), **header}
    if args.note:
        result["note"] = args.note
    command = "python " + " ".join(sys.argv)

    def add(cases):  # save after every case, so a run cut off by a time limit keeps what it measured
        for c in cases:
            c["command"] = command
            result["cases"] = [o for o in result["cases"] if (o["case"], o["rank"]) != (c["case"], c["rank"])]
            result["cases"].append(c)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        stem.with_suffix(".md").write_text(to_markdown(result))

    shapes = [(n, n) for n in args.sizes] + [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    for m, n in shapes:
        print(f"matrix {m}x{n} r={args.ranks}", flush=True)
        add(matrix_case(m, n, args.ranks, dev, args.rounds, args.twin))
    if not args.no_smollm2:
        print(f"SmolLM2-135M, {args.smollm2_targets}", flush=True)
        weights = {k: v for k, v in smollm2_projections().items() if k.endswith(tuple(args.smollm2_targets))}
        stacks = group_by_shape(weights)
        add([model_case(f"SmolLM2-135M, {len(weights)} targets ({', '.join(args.smollm2_targets)})", stacks,
                        args.smollm2_rank, dev, args.rounds)])
    if args.llama:
        print("Llama-3-8B-shaped targets r=256", flush=True)
        add([model_case("Llama-3-8B-shaped (7 projections x 32 layers, synthetic)", llama3_8b_stacks(dev), 256, dev,
                        1, sample=True)])
    print(to_markdown(result))


if __name__ == "__main__":
    main()
