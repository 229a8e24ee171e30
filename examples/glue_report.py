"""Tables and plots from the records of examples/glue.py.

Writes, next to the JSON (or into ``--out-dir``):
- ``README.md``: dev metric mean ± std over seeds per task and method, chosen learning rate, trainable
  parameters, wall time, peak training memory; the learning-rate search on the validation slice; the
  spectral summaries (intruder dimensions, DoRA's ΔM/ΔD correlation, Theorem 1 projection errors);
- ``intruders.png``, ``magnitude_direction.png``, ``theorem1.png``.

Run: ``python examples/glue_report.py docs/results/glue/runs.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

LABEL = {"full": "Full FT", "lora": "LoRA r=8", "svft": "SVFT_P", "pica": "PiCa r=16 shared",
         "pica-unshared": "PiCa r=16 unshared"}
METRIC = {"accuracy": "acc", "mcc": "MCC", "pearson": "Pearson"}
ORDER = ["full", "lora", "svft", "pica", "pica-unshared"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _methods(runs: list[dict]) -> list[str]:
    present = {r["method"] for r in runs}
    return [m for m in ORDER if m in present]


def _tasks(runs: list[dict]) -> list[str]:
    seen = []
    for r in runs:
        if r["task"] not in seen:
            seen.append(r["task"])
    return seen


def final_runs(runs, task, method):
    return sorted((r for r in runs if r["task"] == task and r["method"] == method and r.get("phase") == "final"),
                  key=lambda r: r["seed"])


def analysed(runs, task, method):
    return next((r for r in final_runs(runs, task, method) if "spectral" in r), None)


def summary_table(runs: list[dict], grid: dict) -> list[str]:
    tasks, methods = _tasks(runs), _methods(runs)
    metric = {r["task"]: METRIC[r["metric"]] for r in runs}
    head = "| method | trainable (adapted layers) | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " | mean |"
    lines = [head, "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for m in methods:
        cells, means, params = [], [], None
        for t in tasks:
            fr = final_runs(runs, t, m)
            if not fr:
                cells.append("-")
                continue
            mu, sd = _mean_std([100 * r["dev"] for r in fr])
            means.append(mu)
            cells.append(f"{mu:.1f} ± {sd:.1f} (n={len(fr)})")
            params = fr[0]["params"]
        mean = f"{statistics.fmean(means):.1f}" if len(means) == len(tasks) else "-"
        p = f"{params['adapter']:,}" if params else "-"
        lines.append(f"| {LABEL[m]} | {p} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def cost_table(runs: list[dict], grid: dict) -> list[str]:
    lines = ["| task | method | chosen lr (searched) | train s / run | wall s / run | peak MiB (seed 0) | "
             "train loss first 50 -> last 50 |", "|---|---|---|---:|---:|---:|---|"]
    for t in _tasks(runs):
        for m in _methods(runs):
            fr = final_runs(runs, t, m)
            if not fr:
                continue
            lr = fr[0]["lr"]
            g = sorted(r["lr"] for r in runs if r["task"] == t and r["method"] == m and r.get("phase") == "lr-search")
            edge = " (edge)" if len(g) > 1 and lr in (g[0], g[-1]) else ""
            a = analysed(runs, t, m)
            peak = f"{a['peak_bytes'] / 2**20:.0f}" if a and "peak_bytes" in a else "-"
            loss = (f"{statistics.fmean(r['train_loss_first50'] for r in fr):.3f} -> "
                    f"{statistics.fmean(r['train_loss_last50'] for r in fr):.3f}")
            lines.append(f"| {t} | {LABEL[m]} | {lr:g}{edge} ({', '.join(f'{x:g}' for x in g)}) | "
                         f"{statistics.fmean(r['train_seconds'] for r in fr):.0f} | "
                         f"{statistics.fmean(r['wall_seconds'] for r in fr):.0f} | {peak} | {loss} |")
    return lines


def search_table(runs: list[dict]) -> list[str]:
    lines = ["| task | method | validation metric per learning rate (seed 0) |", "|---|---|---|"]
    for t in _tasks(runs):
        for m in _methods(runs):
            rs = sorted((r for r in runs if r["task"] == t and r["method"] == m and r.get("phase") == "lr-search"),
                        key=lambda r: r["lr"])
            if rs:
                lines.append(f"| {t} | {LABEL[m]} | " + ", ".join(f"{r['lr']:g}: {100 * r['validation']:.1f}"
                                                                    for r in rs) + " |")
    return lines


def _final_snapshot(rec: dict) -> dict:
    return rec["spectral"][str(rec["steps"])]


def spectral_table(runs: list[dict]) -> list[str]:
    lines = ["| task | method | intruders, output side (sum over 36 layers) | intruders, input side | "
             "corr(ΔM, ΔD) | mean ε of top-16 singular vectors (output / input) | "
             "ΔW outside top-16 of W0 | Theorem 1 term at r=16 |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for t in _tasks(runs):
        for m in _methods(runs):
            a = analysed(runs, t, m)
            if a is None:
                continue
            snap = _final_snapshot(a)
            out_i = sum(v["intruders_output"] for v in snap.values())
            in_i = sum(v["intruders_input"] for v in snap.values())
            corr = _dm_dd_corr(a)
            eps_o = statistics.fmean(v["eps_output"] for v in snap.values())
            eps_i = statistics.fmean(v["eps_input"] for v in snap.values())
            proj = [v["projection"] for v in snap.values() if "projection" in v]
            k = proj[0]["ranks"].index(16) if proj and 16 in proj[0]["ranks"] else None
            pre = f"{statistics.fmean(p['pretrained'][k] for p in proj):.3f}" if k is not None else "-"
            bnd = f"{statistics.fmean(p['bound'][k] for p in proj):.3f}" if k is not None else "-"
            lines.append(f"| {t} | {LABEL[m]} | {out_i} | {in_i} | {corr:+.2f} | {eps_o:.3f} / {eps_i:.3f} | "
                         f"{pre} | {bnd} |")
    return lines


def _dm_dd_points(rec: dict) -> tuple[list[float], list[float], list[int]]:
    dm, dd, step = [], [], []
    for s, snap in rec["spectral"].items():
        for v in snap.values():
            dm.append(v["delta_m"])
            dd.append(v["delta_d"])
            step.append(int(s))
    return dm, dd, step


def _dm_dd_corr(rec: dict) -> float:
    """Pearson correlation of ΔM and ΔD over layers and checkpoints (DoRA: negative for full FT, positive for LoRA)."""
    dm, dd, _ = _dm_dd_points(rec)
    if len(dm) < 3 or statistics.pstdev(dm) == 0 or statistics.pstdev(dd) == 0:
        return float("nan")
    return statistics.correlation(dm, dd)


def plots(runs: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, methods = _tasks(runs), _methods(runs)
    written = []

    # Intruder dimensions: grouped bars, one panel per side.
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, side in zip(axes, ("output", "input")):
        for j, m in enumerate(methods):
            vals = []
            for t in tasks:
                a = analysed(runs, t, m)
                vals.append(sum(v[f"intruders_{side}"] for v in _final_snapshot(a).values()) if a else 0)
            ax.bar([i + j * width for i in range(len(tasks))], vals, width, label=LABEL[m])
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(tasks))], tasks)
        ax.set_title(f"intruder dimensions, {side} side (top-10, ε<0.5, 36 layers)")
    axes[0].set_ylabel("count")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "intruders.png", dpi=110)
    plt.close(fig)
    written.append("intruders.png")

    # DoRA magnitude/direction: ΔD vs ΔM, one panel per method (first task), colour = checkpoint.
    fig, axes = plt.subplots(len(tasks), len(methods), figsize=(3.2 * len(methods), 2.8 * len(tasks)),
                             squeeze=False)
    for i, t in enumerate(tasks):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            a = analysed(runs, t, m)
            if a is None:
                ax.axis("off")
                continue
            dm, dd, step = _dm_dd_points(a)
            ax.scatter(dm, dd, c=step, s=8, cmap="viridis")
            ax.set_title(f"{t} {LABEL[m]}\ncorr {_dm_dd_corr(a):+.2f}", fontsize=8)
            ax.tick_params(labelsize=6)
            if i == len(tasks) - 1:
                ax.set_xlabel("ΔM", fontsize=8)
            if j == 0:
                ax.set_ylabel("ΔD", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "magnitude_direction.png", dpi=110)
    plt.close(fig)
    written.append("magnitude_direction.png")

    # Theorem 1: fraction of ||ΔW_full||² outside a rank-r subspace, mean over the 36 layers.
    with_full = [t for t in tasks if analysed(runs, t, "full") is not None] or tasks[:1]
    fig, axes = plt.subplots(1, len(with_full), figsize=(4.2 * len(with_full), 3.6), squeeze=False)
    for ax, t in zip(axes[0], with_full):
        a = analysed(runs, t, "full")
        if a is None:
            ax.axis("off")
            continue
        proj = [v["projection"] for v in _final_snapshot(a).values() if "projection" in v]
        ranks = proj[0]["ranks"]
        for key, label, style in (("pretrained", "top-r of W0 (PiCa's subspace)", "o-"),
                                  ("bound", "Theorem 1 term: Σ_{i>r} σ_i(ΔW)² (best rank r)", "s--"),
                                  ("random", "random r-dim subspace", "^:")):
            rows = [[p[key][k] for p in proj if len(p["ranks"]) > k] for k in range(len(ranks))]
            ax.plot(ranks, [statistics.fmean(r) for r in rows], style, label=label, ms=4)
            ax.fill_between(ranks, [min(r) for r in rows], [max(r) for r in rows], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("r")
        ax.set_title(f"{t}: full FT ΔW, input side")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("||ΔW − proj_r(ΔW)||² / ||ΔW||²")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "theorem1.png", dpi=110)
    plt.close(fig)
    written.append("theorem1.png")
    return written


def report(path: Path, out_dir: Path | None = None, with_plots: bool = True) -> Path:
    data = json.loads(path.read_text())
    runs, grid = data["runs"], data.get("lr_grid", {})
    out_dir = out_dir or path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    env = data.get("environment", {})
    steps = sorted({(r["task"], r["steps"], r["batch_size"], r.get("train_rows")) for r in runs
                    if r.get("phase") == "final"})
    lines = ["# GLUE-style results on all-MiniLM-L6-v2 (`examples/glue.py`)", "",
             f"Device: CPU ({env.get('cpu', '?')} cores, {env.get('threads', '?')} torch threads), "
             f"torch {env.get('torch', '?')}, float32. "
             "Dev metric ×100, mean ± std over seeds; learning rate chosen per task and method on a "
             "validation slice of train (seed 0), never on dev. Every method also trains the linear head "
             "(385 values for STS-B, 770 for 2 classes), not counted in the table.", "",
             "Budget per run: " + "; ".join(f"{t}: {s} steps × batch {b} (of {n} train rows)"
                                            for t, s, b, n in steps) + ".", ""]
    lines += summary_table(runs, grid) + [""]
    lines += ["## Cost", ""] + cost_table(runs, grid) + [""]
    lines += ["## Learning-rate search (validation slice of train)", ""] + search_table(runs) + [""]
    lines += ["## Spectral analysis (seed 0, final weights; `pica_kernels.native.analysis`)", ""] + spectral_table(runs)
    lines += [""]
    if with_plots:
        for name in plots(runs, out_dir):
            lines.append(f"![{name}]({name})")
        lines.append("")
    out = out_dir / "README.md"
    out.write_text("\n".join(lines))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="JSON written by examples/glue.py")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    print(f"wrote {report(args.runs, args.out_dir, not args.no_plots)}")


if __name__ == "__main__":
    main()
