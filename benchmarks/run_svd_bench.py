"""Time AND accuracy of truncated_svd vs torch.linalg.svd and torch.svd_lowrank; writes JSON + markdown.

    python benchmarks/run_svd_bench.py                       # CPU: 1024², 2048², SmolLM2 at r=64
    python benchmarks/run_svd_bench.py --sizes 1024 2048 4096 --no-smollm2
    python benchmarks/run_svd_bench.py --device cuda --llama # GPU: + Llama-3-8B-shaped targets at r=256

Accuracy is measured against the float64 torch.linalg.svd (DESIGN.md section 4):
energy ratio, mean cos² of principal angles, orthonormality (worst over matrices).
Times are the minimum over repeats (the CPU is shared); the full-SVD reference
is timed once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from svd_common import best_time, llm_like_matrix, smollm2_projections  # noqa: E402

from pica_kernels import svd as svd_mod  # noqa: E402
from pica_kernels.svd import accuracy_report, truncated_svd  # noqa: E402

ENERGY_BAR = 0.9999


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int):
    def run():
        out = fn()
        sync(device)
        return out

    return best_time(run, repeats)


def lowrank_basis(w: torch.Tensor, rank: int, q: int, niter: int) -> torch.Tensor:
    """torch.svd_lowrank's top-rank input-side basis, (..., rank, in)."""
    _, _, v = torch.svd_lowrank(w, q=q, niter=niter)
    return v[..., :rank].transpose(-1, -2)


def matrix_case(size_m: int, size_n: int, rank: int, device: str, repeats: int) -> dict:
    w_cpu = llm_like_matrix(size_m, size_n)
    w = w_cpu.to(device)
    t_full64, ref = timed(lambda: torch.linalg.svd(w.double(), full_matrices=False), device, 1)
    ref = tuple(x.cpu() for x in ref)
    t_full32, _ = timed(lambda: torch.linalg.svd(w, full_matrices=False), device, 1)
    rows = [
        {"method": "torch.linalg.svd float64 (reference)", "time_s": t_full64, "energy": 1.0, "cos2": 1.0},
        {"method": "torch.linalg.svd float32", "time_s": t_full32},
    ]

    def add(name, fn):
        t, basis = timed(fn, device, repeats)
        rep = accuracy_report(w_cpu, basis.cpu(), "input", reference=ref)
        rows.append({"method": name, "time_s": t, **rep})
        return rep

    for method in ("accurate", "fast"):
        for be in ("cpp", "torch") if method == "accurate" and svd_mod.HAS_CPP else (svd_mod.backend(),):
            add(f"truncated_svd {method} [{be}]", lambda m=method, b=be: truncated_svd(w, rank, method=m, backend=b)[0])
    add("svd_lowrank q=r+8 niter=4", lambda: lowrank_basis(w, rank, rank + 8, 4))
    # svd_lowrank at matched accuracy: the cheapest niter (q = r+16) reaching the energy bar.
    for niter in (8, 16, 32):
        rep = add(f"svd_lowrank q=r+16 niter={niter}", lambda n=niter: lowrank_basis(w, rank, rank + 16, n))
        if rep["energy"] >= ENERGY_BAR:
            break
    for r in rows:
        r["speedup_vs_full64"] = t_full64 / r["time_s"]
    return {"case": f"{size_m}x{size_n}", "rank": rank, "rows": rows}


def group_by_shape(weights: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for name, w in weights.items():
        groups.setdefault((name.rsplit(".", 1)[-1], tuple(w.shape)), []).append(w)
    return [(role, torch.stack(ws)) for (role, _), ws in groups.items()]


def model_case(name: str, stacks: list[tuple[str, torch.Tensor]], rank: int, device: str, repeats: int,
               sample: bool = False) -> dict:
    """All projections of a model: per-group batched truncated_svd (as apply_pica) vs a per-layer full-SVD loop.

    stacks: (role, (L, out, in)) batches. Accuracy is checked on every layer, or with ``sample`` on the first
    layer of each role only (the float64 reference SVDs are the expensive part); the full-SVD loop time is
    then extrapolated from those layers (same shape, same cost per matrix)."""
    stacks = [(role, s.to(device)) for role, s in stacks]
    n_layers = sum(s.shape[0] for _, s in stacks)
    checks: list[list[int]] = []
    seen = set()
    for role, s in stacks:
        if not sample:
            checks.append(list(range(s.shape[0])))
        else:
            checks.append([] if role in seen else [0])
            seen.add(role)
    refs: list[dict[int, tuple]] = []
    per_role: dict[str, list[float]] = {}
    for (role, s), idx in zip(stacks, checks):
        rr = {}
        for i in idx:
            t0 = time.perf_counter()
            rr[i] = tuple(x.cpu() for x in torch.linalg.svd(s[i].double(), full_matrices=False))
            sync(device)
            per_role.setdefault(role, []).append(time.perf_counter() - t0)
        refs.append(rr)
    t_full = sum(sum(per_role[role]) / len(per_role[role]) * s.shape[0] for role, s in stacks)
    checked = sum(len(c) for c in checks)
    rows = [{"method": "torch.linalg.svd float64 loop (reference)", "time_s": t_full, "energy": 1.0, "cos2": 1.0,
             "extrapolated": checked < n_layers}]

    def add(label, fn):
        t, bases = timed(lambda: [fn(s) for _, s in stacks], device, repeats)
        worst = {"energy": 1.0, "cos2": 1.0, "ortho": 0.0}
        for (_, s), b, rr in zip(stacks, bases, refs):
            for i, ref in rr.items():
                rep = accuracy_report(s[i].cpu(), b[i].cpu(), "input", reference=ref)
                worst = {"energy": min(worst["energy"], rep["energy"]), "cos2": min(worst["cos2"], rep["cos2"]),
                         "ortho": max(worst["ortho"], rep["ortho"])}
        rows.append({"method": label, "time_s": t, **worst})

    for method in ("fast", "accurate"):
        add(f"truncated_svd {method} (batched per group)", lambda s, m=method: truncated_svd(s, rank, method=m)[0])
    add("svd_lowrank q=r+8 niter=4 (loop)", lambda s: torch.stack([lowrank_basis(m, rank, rank + 8, 4) for m in s]))
    for r in rows:
        r["speedup_vs_full64"] = rows[0]["time_s"] / r["time_s"]
    return {"case": name, "rank": rank, "layers": n_layers, "checked_layers": checked, "rows": rows}


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
             f"torch {result['torch']}, backend `{result['backend']}`, threads {result['threads']}, "
             f"load average {result['loadavg_start']} -> {result['loadavg_end']} (shared machine), "
             f"`{result['command']}`.", "",
             "Energy = ‖W V‖²_F / Σσ_i² (1 = optimal), cos² = mean cos² of principal angles to the float64 SVD; "
             "worst over the matrices checked.", ""]
    for case in result["cases"]:
        extra = f", {case['layers']} layers (accuracy on {case['checked_layers']})" if "layers" in case else ""
        lines += [f"## {case['case']}, r = {case['rank']}{extra}", "",
                  "| method | time (s) | speedup vs full fp64 | energy | cos² | ‖VᵀV−I‖_max |", "|---|---|---|---|---|---|"]
        for r in case["rows"]:
            def f(k, fmt, r=r):
                return format(r[k], fmt) if k in r and r[k] == r[k] else "–"

            t = f("time_s", ".3f") + (" (extrap.)" if r.get("extrapolated") else "")
            lines.append(f"| {r['method']} | {t} | {f('speedup_vs_full64', '.1f')} | {f('energy', '.6f')} | "
                         f"{f('cos2', '.5f')} | {f('ortho', '.1e')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--llama", action="store_true", help="Llama-3-8B-shaped targets at r=256 (GPU)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/svd_<device>)")
    args = ap.parse_args()
    dev = args.device
    result = {"device": device_name(dev), "torch": torch.__version__, "backend": svd_mod.backend(),
              "threads": torch.get_num_threads(), "loadavg_start": round(os.getloadavg()[0], 2),
              "command": "python " + " ".join(sys.argv), "cases": []}
    stem = Path(args.out or Path(__file__).resolve().parent / "results" / f"svd_{dev}")
    stem.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every case, so a run cut off by a time limit keeps what it measured
        result["loadavg_end"] = round(os.getloadavg()[0], 2)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        stem.with_suffix(".md").write_text(to_markdown(result))

    for n in args.sizes:
        print(f"matrix {n}x{n} r={args.rank}", flush=True)
        result["cases"].append(matrix_case(n, n, args.rank, dev, args.repeats))
        save()
    if not args.no_smollm2:
        print("SmolLM2-135M, all projections", flush=True)
        stacks = group_by_shape(smollm2_projections())
        result["cases"].append(model_case("SmolLM2-135M, all 210 projections", stacks, args.rank, dev, args.repeats))
        save()
    if args.llama:
        print("Llama-3-8B-shaped targets r=256", flush=True)
        result["cases"].append(model_case("Llama-3-8B-shaped (7 projections x 32 layers, synthetic)",
                                          llama3_8b_stacks(dev), 256, dev, 1, sample=True))
        save()
    print(to_markdown(result))


if __name__ == "__main__":
    main()
