"""The CPU path of PiCa against PEFT LoRA, side by side: per layer and a whole SmolLM2 training step.

    python benchmarks/cpu_path.py                   # -> benchmarks/results/cpu_path.json and cpu_path.md
    python benchmarks/cpu_path.py --threads 1 --rounds 21 --no-model

Per layer (SmolLM2 shapes, r = 32, fp32, forward + backward with dx, as inside a network): the frozen
nn.Linear, PiCaLinear (eager CPU: the reference's own autograd, called directly), PiCa through the
custom op (``torch.ops.pica.lowrank_linear``, the route eager CPU took before; what
``torch.compile`` still takes) and PEFT LoRA at the same rank. Methods are interleaved in shuffled
rounds (harness.Interleaved); a cell's ratio is the median over rounds of the per-round ratio to the
frozen layer, on the clock named in the output (process CPU time with one thread; wall time with
more, where CPU time would count the BLAS threads' spinning).

The FLOP floor of PiCa (factored form, input side): the frozen layer does 2*T*in*out multiply-adds
(y and dx); PiCa adds t = x@P.T (T*in*r), the M term of y (T*r*out), s = dy@M (T*out*r), the P term
of dx (T*r*in) and dM = dy.T@t (out*T*r): floor = 1 + r*(2*in + 3*out) / (2*in*out). Goal at the
largest T: PiCa within 1.5x of the floor's overhead. At large fp32 T the direct path computes y and
dx through W + M@P instead (ops.eager.merged_pays), which needs fewer multiply-adds than that floor.

Whole step: SmolLM2-135M-Instruct, forward with labels + backward + AdamW step (benchmarks/
test_model_bench.py's step and batch), frozen / PiCa r = 32 / LoRA r = 32, interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness as H  # noqa: E402

SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 192)]  # (in, out): up/gate, down, q/o, k/v
TOKENS = (1, 8, 64, 4096)


class PiCaCustomOp(nn.Module):
    """PiCa through the custom op (``pica::lowrank_linear``, reference backend), as eager CPU ran it before."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        y, _ = torch.ops.pica.lowrank_linear(x, layer.base_weight, layer.base_layer.bias, layer.m(),
                                                     layer.basis(), "reference")
        return y


def floor(in_f: int, out_f: int, rank: int = H.RANK) -> float:
    return 1 + rank * (2 * in_f + 3 * out_f) / (2 * in_f * out_f)


def paired_ratio(xs: list[float], base: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(xs, base))


def layer_cell(in_f: int, out_f: int, tokens: int, rounds: int, clock: str, seed: int) -> dict:
    dev = torch.device("cpu")
    torch.manual_seed(seed)
    base, factors = H.make_base(out_f, in_f, dev)
    pica = H.pica_layer(H.fresh_copy(base), factors)
    mods = {"frozen": H.fresh_copy(base), "pica": pica, "pica-op": PiCaCustomOp(H.pica_layer(H.fresh_copy(base),
                                                                                            factors)),
            f"lora-r{H.RANK}": H.peft_layer(H.fresh_copy(base), H.RANK)}
    x = torch.randn(tokens, in_f)
    gy = torch.randn(tokens, out_f)
    inner = max(1, min(200, int(4e8 // (out_f * in_f * tokens))))
    inter = H.Interleaved({k: H.train_fn(m, x, gy) for k, m in mods.items()}, dev, seed=seed, inner=inner)
    inter.run_round(record=False)
    for _ in range(rounds):
        inter.run_round()
    samples = inter.samples if clock == "cpu" else inter.wall
    row = {"in": in_f, "out": out_f, "T": tokens, "rank": H.RANK, "rounds": rounds, "inner": inner, "clock": clock,
           "floor": floor(in_f, out_f), "loadavg_after": list(os.getloadavg()), "methods": {}}
    for name in mods:
        row["methods"][name] = {
            "median_s": statistics.median(samples[name]),
            "ratio": paired_ratio(samples[name], samples["frozen"]),
            "ratio_cpu_time": paired_ratio(inter.samples[name], inter.samples["frozen"]),
            "ratio_wall": paired_ratio(inter.wall[name], inter.wall["frozen"]),
            "samples_s": samples[name],
        }
    saved = H.saved_activation_bytes(lambda: pica(x.detach().requires_grad_(True)), pica)
    row["pica_saved_bytes"] = saved["saved_bytes"]
    return row


def model_step(rounds: int, clock: str) -> dict:
    from benchmarks import test_model_bench as MB
    from pica_kernels.registry_models import load_smollm2

    model, tok = load_smollm2()
    tok.pad_token = tok.pad_token or tok.eos_token
    enc, labels = MB._batch(tok, torch.device("cpu"))
    names = ["frozen", f"pica-r{H.RANK}", f"lora-r{H.RANK}"]
    fns = {}
    for name in names:
        m = MB._apply(name, copy.deepcopy(model)).train()
        trainable = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None

        def run(m=m, opt=opt):
            m(**enc, labels=labels).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        fns[name] = run
    inter = H.Interleaved(fns, torch.device("cpu"), seed=7)
    inter.run_round(record=False)
    for _ in range(rounds):
        inter.run_round()
    samples = inter.samples if clock == "cpu" else inter.wall
    return {"model": "SmolLM2-135M-Instruct", "batch": MB.BATCH, "seq": MB.SEQ, "targets": MB.TARGETS,
            "rounds": rounds, "clock": clock, "loadavg_after": list(os.getloadavg()),
            "methods": {n: {"median_s": statistics.median(samples[n]),
                            "ratio": paired_ratio(samples[n], samples["frozen"]),
                            "ratio_cpu_time": paired_ratio(inter.samples[n], inter.samples["frozen"]),
                            "ratio_wall": paired_ratio(inter.wall[n], inter.wall["frozen"]),
                            "samples_s": samples[n]} for n in names}}


def markdown(res: dict) -> str:
    env = res["env"]
    lora = f"lora-r{H.RANK}"
    lines = [
        "# CPU path: PiCa vs PEFT LoRA (r = 32), fp32, forward + backward incl. dx",
        "",
        f"Measured {res['date']} by `python benchmarks/cpu_path.py {' '.join(res['argv'])}`; torch {env['torch']}, "
        f"{res['threads']} thread(s), clock: {res['clock']} "
        f"({'process CPU time' if res['clock'] == 'cpu' else 'wall time'}), {res['rounds']} interleaved shuffled "
        "rounds per cell, medians of per-round ratios to the frozen layer.",
        f"**Shared machine**: {env['cpu_count']} cores used by several jobs; load average "
        f"{' / '.join(f'{v:.1f}' for v in res['loadavg_before'])} before, "
        f"{' / '.join(f'{v:.1f}' for v in res['loadavg_after'])} after (1/5/15 min).",
        "",
        "`pica`: PiCaLinear on the direct CPU path (eager CPU calls the reference's own autograd); `pica-op`: "
        "the same layer through the custom op, the route eager CPU took before. Floor: the FLOP floor of the "
        "factored form, 1 + r(2 in + 3 out)/(2 in out); goal at T = 4096: PiCa <= 1 + 1.5 (floor - 1). "
        "At large fp32 T the direct path computes y and dx through W + M@P (fewer multiply-adds than the "
        "factored floor; same saved activations).",
        "",
        "| layer (in→out) | T | frozen ms | pica | pica-op | LoRA | floor | PiCa ≤ LoRA | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {shape: i for i, shape in enumerate(SHAPES)}
    for r in sorted(res["layers"], key=lambda r: (order.get((r["in"], r["out"]), 99), r["T"])):
        m = r["methods"]
        p, lo = m["pica"]["ratio"], m[lora]["ratio"]
        big = r["T"] == max(TOKENS)
        goal = 1 + 1.5 * (r["floor"] - 1)
        lines.append(f"| {r['in']}→{r['out']} | {r['T']} | {m['frozen']['median_s'] * 1e3:.3f} | {p:.3f} | "
                     f"{m['pica-op']['ratio']:.3f} | {lo:.3f} | {r['floor']:.3f} | {'yes' if p <= lo else 'NO'} | "
                     + (f"≤ {goal:.3f}: {'yes' if p <= goal else 'NO'}" if big else "") + " |")
    if res.get("model"):
        md = res["model"]
        m = md["methods"]
        lines += ["", f"## Whole training step: {md['model']}, {md['batch']}x{md['seq']} tokens, "
                      f"targets {', '.join(md['targets'])}, AdamW, {md['rounds']} rounds", "",
                  "| method | step s (median) | ratio to frozen |", "|---|---|---|"]
        for n, v in m.items():
            lines.append(f"| {n} | {v['median_s']:.3f} | {v['ratio']:.3f} |")
    lines += ["", "Raw samples, both clocks' ratios and the load after each cell: `cpu_path.json`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--model-rounds", type=int, default=11)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="default: cpu with one thread, wall with more")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": argv if argv is not None else
           sys.argv[1:], "threads": args.threads, "rounds": args.rounds, "clock": clock,
           "loadavg_before": list(os.getloadavg()), "env": H.environment(), "layers": []}
    for tokens in (int(t) for t in args.tokens.split(",")):
        for in_f, out_f in SHAPES:
            row = layer_cell(in_f, out_f, tokens, args.rounds, clock, seed=tokens)
            m = row["methods"]
            print(f"{in_f}->{out_f} T={tokens}: pica {m['pica']['ratio']:.3f} pica-op {m['pica-op']['ratio']:.3f} "
                  f"lora {m[f'lora-r{H.RANK}']['ratio']:.3f} floor {row['floor']:.3f} load {row['loadavg_after'][0]:.1f}",
                  flush=True)
            res["layers"].append(row)
    if not args.no_model:
        res["model"] = model_step(args.model_rounds, clock)
        print({n: round(v["ratio"], 3) for n, v in res["model"]["methods"].items()}, flush=True)
    res["loadavg_after"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_path.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "cpu_path.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
