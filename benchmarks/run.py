"""Run the benchmark suites and turn their pytest-benchmark JSON into tables and plots.

    python benchmarks/run.py                      # CPU suite -> benchmarks/results/   (make bench)
    python benchmarks/run.py --profile gpu        # GPU suite -> benchmarks/results/gpu/ (gpu_bench.sh)
    python benchmarks/run.py --report-only        # re-render results from OUT/raw.json

Writes to the output folder: ``raw.json`` (pytest-benchmark's JSON, every sample and extra_info),
``summary.json`` (the rows of the tables and the claim checks), ``results.md`` (tables, claims,
device, load) and PNG plots. On CPU it then runs ``benchmarks/quant_bench.py`` (SmolLM2 on an nf4 base, PiCa vs
PEFT QLoRA): ``quant_nf4.json`` and ``quant_nf4.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BYTES = 4  # float32 everywhere in these suites


def run_suites(profile: str, out: Path, suites: list[str], extra: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, BENCH_PROFILE=profile, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if profile == "gpu":
        env.setdefault("BENCH_DEVICE", "cuda")
    files = {"layer": "benchmarks/test_layer_bench.py", "model": "benchmarks/test_model_bench.py::test_model_step",
             "ready": "benchmarks/test_model_bench.py::test_ready_time"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[files[s] for s in suites],
           f"--benchmark-json={out / 'raw.json'}", "--benchmark-disable-gc", "--benchmark-columns=median,rounds",
           *extra]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


# ------------------------------------------------------------------ helpers
def mib(b: float) -> str:
    if b < 1024**2:
        return f"{b / 1024:.1f} KiB"
    return f"{b / 1024**2:.1f} MiB" if b < 1024**3 else f"{b / 1024**3:.2f} GiB"


def ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}"


def load(out: Path) -> tuple[list[dict], dict]:
    raw = json.loads((out / "raw.json").read_text())
    rows = [b["extra_info"] | {"_name": b["name"]} for b in raw["benchmarks"] if b.get("extra_info")]
    return rows, raw.get("machine_info", {})


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


# ------------------------------------------------------------------- claims
def claim_checks(rows: list[dict]) -> list[dict]:
    checks = []
    layer = [r for r in rows if r["suite"] == "layer"]
    # 1. Saved activations: PiCa = frozen + T*r; LoRA saves x (T*in) on top.
    ok_pica, ok_lora, n = True, True, 0
    for r in layer:
        m = r["methods"]
        rank, t, fin = r["rank"], r["T"], r["in"]
        pica = m.get(f"pica-r{rank}")
        if pica is None:
            continue
        n += 1
        ok_pica &= pica["saved_bytes"] - m["frozen"]["saved_bytes"] == t * rank * BYTES
        lora = m[f"lora-r{rank}"]
        ok_lora &= lora["saved_bytes"] - m["frozen"]["saved_bytes"] >= t * fin * BYTES
    checks.append({"claim": "PiCa's saved activations are the frozen layer's plus T*r; LoRA saves x (T*in)",
                   "held": bool(n and ok_pica and ok_lora),
                   "evidence": f"{n} layer cells: PiCa - frozen == T*r*4 bytes in all: {ok_pica}; "
                               f"LoRA - frozen >= T*in*4 bytes in all: {ok_lora}"})
    # 2. SVFT: step time grows with out*in*min(out,in) whatever T; stores >= 2x the weight.
    sc = [r for r in rows if r["suite"] == "svft-scaling"]
    if sc:
        slopes, t_indep = {}, []
        for t in sorted({r["T"] for r in sc}):
            pts = sorted((r["work"], r["methods"]["svft-p"]["fwd+bwd"]["median_s"]) for r in sc if r["T"] == t)
            if len(pts) >= 2:
                (w0, s0), (w1, s1) = pts[-2], pts[-1]
                slopes[t] = math.log(s1 / s0) / math.log(w1 / w0)
        by_n = {}
        for r in sc:
            by_n.setdefault(r["out"], {})[r["T"]] = r
        for nn, d in sorted(by_n.items()):
            if len(d) == 2:
                lo, hi = (d[k] for k in sorted(d))
                t_indep.append((nn, hi["methods"]["svft-p"]["fwd+bwd"]["median_s"]
                                / lo["methods"]["svft-p"]["fwd+bwd"]["median_s"],
                                hi["methods"]["frozen"]["fwd+bwd"]["median_s"]
                                / lo["methods"]["frozen"]["fwd+bwd"]["median_s"]))
        big = t_indep[-1] if t_indep else None
        held = bool(slopes) and all(0.7 <= s <= 1.3 for s in slopes.values()) and (big is None or big[1] < 1.5)
        checks.append({
            "claim": "SVFT's step time grows with out*in*min(out,in), whatever T",
            "held": held,
            "evidence": "log-log slope of SVFT_P fwd+bwd time vs n^3 between the two largest squares: "
                        + ", ".join(f"T={t}: {s:.2f}" for t, s in slopes.items())
                        + "; time(T=256)/time(T=1) per n (SVFT_P vs frozen): "
                        + ", ".join(f"n={nn}: {a:.2f} vs {b:.1f}" for nn, a, b in t_indep),
        })
    ratios = []
    for r in layer:
        for name in ("svft-p", "svft-b2"):
            m = r["methods"].get(name)
            if m:
                w = r["out"] * r["in"] * BYTES
                ratios.append((r["shape"], r["T"], name, m["resident_bytes"] / w,
                               (m["resident_bytes"] + m["saved_bytes"]) / w))
    if ratios:
        res_min = min(x[3] for x in ratios)
        tot_min = min(x[4] for x in ratios)
        checks.append({
            "claim": "SVFT stores at least twice the weight",
            "held": tot_min >= 2.0,
            "evidence": f"frozen U, sigma, Vh alone: {res_min:.2f}x to {max(x[3] for x in ratios):.2f}x the weight "
                        f"(2x only for square layers: (out+in)*min/(out*in)); with the rebuilt weight autograd "
                        f"saves for the backward: >= {tot_min:.2f}x in every cell",
        })
    # 3. Training-step overhead at r=32 on SmolLM2 shapes, T=4096: PiCa <= 1.10x, LoRA ~1.3x.
    # The dedicated step-overhead suite (more rounds) when present, else the largest-T layer cells.
    big = [r for r in rows if r["suite"] == "step-overhead"]
    if not big and layer:
        big = [r for r in layer if r["shape"].startswith("smollm2") and r["T"] == max(x["T"] for x in layer)]
    if big:
        p = {r["shape"]: r["methods"][f"pica-r{r['rank']}"]["fwd+bwd"]["ratio_to_frozen"] for r in big}
        lo = {r["shape"]: r["methods"][f"lora-r{r['rank']}"]["fwd+bwd"]["ratio_to_frozen"] for r in big}
        model = [r for r in rows if r["suite"] == "model"]
        mtxt = ""
        if model:
            mm = model[0]["methods"]
            mtxt = (f"; whole SmolLM2 step: PiCa {mm['pica-r32']['step']['ratio_to_frozen']:.2f}x, "
                    f"LoRA r=32 {mm['lora-r32']['step']['ratio_to_frozen']:.2f}x")
        rounds = big[0]["methods"]["frozen"]["fwd+bwd"]["rounds"]
        flops = {r["shape"]: 1 + r["rank"] * (r["out"] + r["in"]) / (r["out"] * r["in"]) for r in big}
        mtxt += "; FLOP bound 1 + r(out+in)/(out*in): " + ", ".join(f"{k}: {v:.3f}" for k, v in flops.items())
        checks.append({
            "claim": f"SmolLM2 shapes, T={big[0]['T']}, r=32: PiCa fwd+bwd <= 1.10x the frozen layer, PEFT LoRA "
                     f"~1.3x ({rounds} rounds)",
            "held": all(v <= 1.10 for v in p.values()),
            "evidence": "PiCa " + ", ".join(f"{k}: {v:.2f}x" for k, v in p.items())
                        + "; LoRA " + ", ".join(f"{k}: {v:.2f}x" for k, v in lo.items()) + mtxt,
        })
    return checks


# ------------------------------------------------------------------- tables
def layer_tables(rows: list[dict]) -> list[str]:
    lines = []
    layer = sorted((r for r in rows if r["suite"] == "layer"), key=lambda r: (r["shape"], r["T"]))
    lines += ["## Per layer: forward+backward time ratio to the frozen layer (median of per-round ratios)", ""]
    shapes = sorted({r["shape"] for r in layer})
    for shape in shapes:
        cells = [r for r in layer if r["shape"] == shape]
        methods = list(cells[0]["methods"])
        for r in cells:
            methods += [m for m in r["methods"] if m not in methods]
        out_f, in_f = cells[0]["out"], cells[0]["in"]
        lines += [f"### {shape}: out={out_f}, in={in_f}", "",
                  "| T | " + " | ".join(methods) + " | frozen fwd+bwd ms | rounds |",
                  "|---|" + "---|" * len(methods) + "---|---|"]
        for r in cells:
            m = r["methods"]
            vals = [fmt_ratio(m[k]["fwd+bwd"].get("ratio_to_frozen")) if k in m else "-" for k in methods]
            lines.append(f"| {r['T']} | " + " | ".join(vals)
                         + f" | {ms(m['frozen']['fwd+bwd']['median_s'])} | {m['frozen']['fwd+bwd']['rounds']} |")
        lines.append("")
    lines += ["## Per layer: forward only (no grad), ratio to the frozen layer", ""]
    for shape in shapes:
        cells = [r for r in layer if r["shape"] == shape]
        methods = list(cells[0]["methods"])
        lines += [f"### {shape}", "", "| T | " + " | ".join(methods) + " | frozen fwd ms |",
                  "|---|" + "---|" * len(methods) + "---|"]
        for r in cells:
            m = r["methods"]
            vals = [fmt_ratio(m[k]["fwd"].get("ratio_to_frozen")) if k in m else "-" for k in methods]
            lines.append(f"| {r['T']} | " + " | ".join(vals) + f" | {ms(m['frozen']['fwd']['median_s'])} |")
        lines.append("")
    lines += ["## Per layer: memory (largest T of each shape)", "",
              "saved = activations kept for the backward by one forward (beyond the layer's own parameters and "
              "buffers); peak = high-water mark above the start during one forward+backward; resident = the "
              "method's parameters and buffers.", "",
              "| shape | T | method | trainable | saved | saved - frozen | T*r*4 / T*in*4 | peak | resident |",
              "|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        r = max((x for x in layer if x["shape"] == shape), key=lambda x: x["T"])
        f = r["methods"]["frozen"]["saved_bytes"]
        for name, m in r["methods"].items():
            lines.append(f"| {shape} | {r['T']} | {name} | {m['trainable']:,} | {mib(m['saved_bytes'])} | "
                         f"{mib(m['saved_bytes'] - f)} | {mib(r['T'] * r['rank'] * BYTES)} / "
                         f"{mib(r['T'] * r['in'] * BYTES)} | {mib(m['peak_bytes'])} | {mib(m['resident_bytes'])} |")
    lines.append("")
    return lines


def model_table(rows: list[dict]) -> list[str]:
    model = [r for r in rows if r["suite"] == "model"]
    if not model:
        return []
    r = model[0]
    lines = [f"## SmolLM2-135M training step ({r['batch']}x{r['seq']} tokens, targets {', '.join(r['targets'])})", "",
             f"Base model: {r['base_params']:,} parameters, loaded in {r['base_load_s']:.1f} s "
             "(GGUF de-quantisation). Ready = load + apply (basis SVDs included).", "",
             "| method | step ms (median) | ratio to frozen | peak step memory | saved activations | trainable | "
             "extra resident (bases, U/V) | AdamW state | apply s | ready s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        lines.append(
            f"| {name} | {ms(m['step']['median_s'])} | {fmt_ratio(m['step'].get('ratio_to_frozen'))} | "
            f"{mib(m['peak_bytes'])} | {mib(m['saved_bytes'])} | {m['trainable']:,} | "
            f"{mib(m['resident_over_base_bytes'])} | {mib(m['optimizer_state_bytes'])} | {m['apply_s']:.1f} | "
            f"{m['load_to_ready_s']:.1f} |")
    lines += ["", f"Rounds: {r['methods']['frozen']['step']['rounds']} (interleaved).", ""]
    return lines


def ready_table(rows: list[dict]) -> list[str]:
    ready = [r for r in rows if r["suite"] == "ready"]
    if not ready:
        return []
    r = ready[0]
    m = r["methods"]
    lora = next(k for k in m if k.startswith("lora"))
    rounds = m[lora]["rounds"]
    lines = [f"## SmolLM2-135M ready time (load + apply), basis cache cold and warm ({rounds} interleaved rounds)", "",
             f"Every variant loads the model afresh from its GGUF file (wall time; targets {', '.join(r['targets'])}, "
             f"r = {r['rank']}). off: PICA_KERNELS_CACHE=0; cold: an empty cache; warm: the cache filled before the "
             f"rounds ({mib(r['cache_entry_bytes'])} of entries). Ratio: median over rounds of ready / LoRA's ready "
             f"in the same round. Load average at the start {r['env']['loadavg'][0]:.2f}, at the end "
             f"{r['loadavg_end'][0]:.2f}.", "",
             "| variant | ready s (median) | ready / LoRA's | apply or load_adapter s (median) | ready CPU s |",
             "|---|---|---|---|---|"]
    for name, v in m.items():
        lines.append(f"| {name} | {v['ready_wall_median_s']:.1f} | {v['ready_ratio_to_lora']:.3f} | "
                     f"{v['apply_median_s']:.2f} | {v['ready_cpu_median_s']:.1f} |")
    warm = [k for k in m if k.endswith("warm")]
    lines += ["", "Goal: warm within 5% of LoRA's ready time: " + ", ".join(
        f"{k} {m[k]['ready_ratio_to_lora']:.3f} ({'met' if m[k]['ready_ratio_to_lora'] <= 1.05 else 'missed'})"
        for k in warm) + ".", ""]
    return lines


def overhead_table(rows: list[dict]) -> list[str]:
    ov = [r for r in rows if r["suite"] == "step-overhead"]
    if not ov:
        return []
    lines = [f"## Training-step overhead on SmolLM2 shapes (forward+backward, T={ov[0]['T']}, "
             f"{ov[0]['methods']['frozen']['fwd+bwd']['rounds']} interleaved rounds)", "",
             "| shape | out x in | frozen ms | PiCa r=32 | LoRA r=32 | LoRA, PiCa's budget | FLOP bound of PiCa |",
             "|---|---|---|---|---|---|---|"]
    for r in ov:
        m = r["methods"]
        budget = [k for k in m if k.startswith("lora-") and k != f"lora-r{r['rank']}"]
        bud = f"{budget[0]}: {m[budget[0]]['fwd+bwd']['ratio_to_frozen']:.2f}x" if budget else "= r=32"
        pica, lora = m[f"pica-r{r['rank']}"]["fwd+bwd"], m[f"lora-r{r['rank']}"]["fwd+bwd"]
        lines.append(f"| {r['shape']} | {r['out']}x{r['in']} | {ms(m['frozen']['fwd+bwd']['median_s'])} | "
                     f"{pica['ratio_to_frozen']:.2f}x | {lora['ratio_to_frozen']:.2f}x | {bud} | "
                     f"{1 + r['rank'] * (r['out'] + r['in']) / (r['out'] * r['in']):.3f} |")
    lines.append("")
    return lines


def scaling_table(rows: list[dict]) -> list[str]:
    sc = sorted((r for r in rows if r["suite"] == "svft-scaling"), key=lambda r: (r["T"], r["out"]))
    if not sc:
        return []
    lines = ["## SVFT cost against the layer size (square n x n, forward+backward, ms)", "",
             "| n | T | frozen | pica-r32 | svft-p | svft-p / frozen |", "|---|---|---|---|---|---|"]
    for r in sc:
        m = r["methods"]
        lines.append(f"| {r['out']} | {r['T']} | {ms(m['frozen']['fwd+bwd']['median_s'])} | "
                     f"{ms(m['pica-r32']['fwd+bwd']['median_s'])} | {ms(m['svft-p']['fwd+bwd']['median_s'])} | "
                     f"{m['svft-p']['fwd+bwd']['ratio_to_frozen']:.1f}x |")
    lines.append("")
    return lines


def env_lines(rows: list[dict], machine: dict) -> list[str]:
    envs = [r["env"] for r in rows if "env" in r]
    loads = [e["loadavg"][0] for e in envs]
    e = envs[0] if envs else {}
    dev = e.get("gpu") or f"CPU ({machine.get('cpu', {}).get('brand_raw', 'unknown')}, {e.get('cpu_count')} cores)"
    return [f"- device: {dev}; torch {e.get('torch')}, peft {e.get('peft')}, {e.get('threads')} thread(s)",
            f"- 1-minute load average during the run: median {statistics.median(loads):.2f}, "
            f"min {min(loads):.2f}, max {max(loads):.2f} (recorded per benchmark in raw.json)" if loads else "",
            "- float32; rounds are interleaved (each round runs every method once, shuffled); times are medians, "
            "ratios are medians of per-round ratios",
            f"- clock: {_clock(rows)} (wall-clock medians are in raw.json / summary.json as wall_median_s)", ""]


def _clock(rows: list[dict]) -> str:
    if rows and all(r["suite"] == "ready" for r in rows):
        return "wall time (time.perf_counter): a ready time is what the user waits for; process CPU time alongside"
    for r in rows:
        for m in r.get("methods", {}).values():
            for v in m.values():
                if isinstance(v, dict) and "clock" in v:
                    return ("process CPU time (time.process_time): excludes time the OS gave to other jobs"
                            if v["clock"] == "cpu-process-time" else "wall time after torch.cuda.synchronize")
    return "unknown"


# -------------------------------------------------------------------- plots
def plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    layer = [r for r in rows if r["suite"] == "layer" and r["shape"].startswith("smollm2")]
    shapes = sorted({r["shape"] for r in layer})
    if layer:
        for key, fname, ylabel in (("ratio", "layer_step_ratio.png", "fwd+bwd time / frozen layer"),
                                   ("saved", "layer_saved_bytes.png", "saved activations (bytes)"),
                                   ("peak", "layer_peak_bytes.png", "peak fwd+bwd memory (bytes)")):
            fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), squeeze=False)
            for ax, shape in zip(axes[0], shapes):
                cells = sorted((r for r in layer if r["shape"] == shape), key=lambda r: r["T"])
                for name in cells[0]["methods"]:
                    ts = [r["T"] for r in cells if name in r["methods"]]
                    ms_ = [r["methods"][name] for r in cells if name in r["methods"]]
                    if key == "ratio":
                        ys = [m["fwd+bwd"]["ratio_to_frozen"] for m in ms_]
                    elif key == "saved":
                        ys = [max(m["saved_bytes"], 1) for m in ms_]
                    else:
                        ys = [max(m["peak_bytes"], 1) for m in ms_]
                    zero = key == "saved" and all(m["saved_bytes"] == 0 for m in ms_)
                    ax.plot(ts, ys, marker="o", label=f"{name} (0 B, drawn at 1)" if zero else name)
                if key == "saved":
                    ts = [r["T"] for r in cells]
                    ax.plot(ts, [t * cells[0]["rank"] * BYTES for t in ts], "k:", label="T*r*4")
                    ax.plot(ts, [t * cells[0]["in"] * BYTES for t in ts], "k--", label="T*in*4 (x)")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{shape} ({cells[0]['out']}x{cells[0]['in']})", fontsize=9)
                ax.set_xlabel("T (tokens)")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=6)  # per panel: the budget-matched LoRA rank differs per shape
            axes[0][0].set_ylabel(ylabel)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            made.append(fname)
    sc = [r for r in rows if r["suite"] == "svft-scaling"]
    if sc:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for t in sorted({r["T"] for r in sc}):
            pts = sorted((r["work"], r) for r in sc if r["T"] == t)
            for name, style in (("svft-p", "o-"), ("pica-r32", "s--"), ("frozen", "^:")):
                ax.plot([w for w, _ in pts], [r["methods"][name]["fwd+bwd"]["median_s"] for _, r in pts], style,
                        label=f"{name} T={t}")
        w = sorted({r["work"] for r in sc})
        ref = [r for r in sc if r["work"] == w[-1]]
        y1 = max(r["methods"]["svft-p"]["fwd+bwd"]["median_s"] for r in ref)
        ax.plot(w, [y1 * x / w[-1] for x in w], "k", alpha=0.3, label="∝ out·in·min(out,in)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("out·in·min(out,in) (square n×n)")
        ax.set_ylabel("fwd+bwd time (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "svft_scaling.png", dpi=110)
        plt.close(fig)
        made.append("svft_scaling.png")
    model = [r for r in rows if r["suite"] == "model"]
    if model:
        mm = model[0]["methods"]
        names = list(mm)
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        axes[0].bar(names, [mm[n]["step"]["ratio_to_frozen"] for n in names])
        axes[0].axhline(1.0, color="k", lw=0.8)
        axes[0].set_ylabel("train step time / frozen")
        axes[1].bar(names, [mm[n]["peak_bytes"] / 1024**2 for n in names])
        axes[1].set_ylabel("peak step memory (MiB)")
        axes[2].bar(names, [max(mm[n]["trainable"], 1) for n in names])
        axes[2].set_yscale("log")
        axes[2].set_ylabel("trainable parameters")
        for ax in axes:
            ax.tick_params(axis="x", rotation=45, labelsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"SmolLM2-135M, {model[0]['batch']}x{model[0]['seq']} tokens", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "model_step.png", dpi=110)
        plt.close(fig)
        made.append("model_step.png")
    return made


def report(out: Path, command: str) -> None:
    rows, machine = load(out)
    only_ready = all(r["suite"] == "ready" for r in rows)  # its own folder: no claims, tables or plots of the rest
    # The claims are about the per-layer suite: a run without it (--suites model) has no evidence for them.
    with_layers = any(r["suite"] in ("layer", "svft-scaling", "step-overhead") for r in rows)
    checks = claim_checks(rows) if with_layers else []
    made = [] if only_ready else plots(rows, out)
    lines = ["# Benchmark results", "", f"Command: `{command}`", ""] + env_lines(rows, machine)
    if with_layers:
        lines += ["## Claims", "", "| claim | held | evidence |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {'yes' if c['held'] else 'NO'} | {c['evidence']} |" for c in checks]
        lines += [""]
    lines += model_table(rows) + ready_table(rows) + overhead_table(rows)
    if with_layers:
        lines += layer_tables(rows) + scaling_table(rows)
    if made:
        lines += ["## Plots", ""] + [f"![{m}]({m})" for m in made] + [""]
    (out / "results.md").write_text("\n".join(lines))
    slim = []
    for r in rows:
        r = json.loads(json.dumps(r))
        for m in r.get("methods", {}).values():
            for v in m.values():
                if isinstance(v, dict):
                    v.pop("samples_s", None)
        slim.append(r)
    (out / "summary.json").write_text(json.dumps({"claims": checks, "rows": slim}, indent=1))
    print(f"wrote {out / 'results.md'}, summary.json, {', '.join(made)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--suites", default="layer,model,quant",
                    help="comma list of: layer, model, quant (quant: benchmarks/quant_bench.py, CPU only), ready "
                         "(SmolLM2 ready time with the basis cache cold and warm, ~10 min; not in the default: "
                         "python benchmarks/run.py --suites ready --out benchmarks/results/ready)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()
    out = args.out or (ROOT / "benchmarks" / "results" / ("gpu" if args.profile == "gpu" else ""))
    rc = 0
    suites = args.suites.split(",")
    if not args.report_only:
        pytest_suites = [s for s in suites if s != "quant"]
        if pytest_suites:
            rc = run_suites(args.profile, out, pytest_suites, args.pytest_args)
        if "quant" in suites and args.profile == "cpu":  # SmolLM2 on an nf4 base: quant_nf4.json / .md
            cmd = [sys.executable, str(ROOT / "benchmarks" / "quant_bench.py"), "--out", str(out)]
            print("+", " ".join(cmd), flush=True)
            quant_rc = subprocess.call(cmd, cwd=ROOT)
            rc = rc or quant_rc
    if (out / "raw.json").exists():
        command = "make bench" if args.profile == "cpu" else "bash benchmarks/gpu_bench.sh"
        if args.suites != ap.get_default("suites"):
            envs = [f"{k}={os.environ[k]}" for k in ("BENCH_READY_ROUNDS", "BENCH_MODEL_ROUNDS", "BENCH_THREADS")
                    if k in os.environ]
            command = " ".join([*envs, "python benchmarks/run.py", *(a for a in sys.argv[1:] if a != "--report-only")])
        report(out, command)
    return rc


if __name__ == "__main__":
    sys.exit(main())
