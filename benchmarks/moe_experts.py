"""PiCa on fused MoE experts, two ways side by side: the low-rank term on routed tokens vs a parametrization.

    python benchmarks/moe_experts.py                  # -> benchmarks/results/moe_experts.json and moe_experts.md
    python benchmarks/moe_experts.py --rounds 5 --tokens 128

One transformers ``MixtralExperts`` module (fp32, CPU), PiCa input side, one ``M`` per role shared by the experts:

- ``frozen``: the experts module alone, transformers' default experts implementation (``grouped_mm``);
  ``frozen-eager``: the same with its ``eager`` implementation (a loop over experts, as ``lowrank`` runs);
- ``lowrank``: what ``PiCaExperts`` runs (:func:`pica_kernels.core.experts.routed_forward`): each expert's routed
  tokens through ``F.linear(x_e, W_e) + (x_e @ P_e.T) @ M.T``; ``ΔW`` is never formed;
- ``param``: PEFT's way for ``target_parameters``: a ``torch.nn.utils.parametrize`` parametrization of
  ``gate_up_proj`` and ``down_proj`` returning ``W + ΔW`` (every expert's ``ΔW = M @ P_e``, (E, out, in), formed
  on every forward), then transformers' own forward.

Modes: ``train`` (forward + backward: dM and dx, as inside a network) and ``infer`` (forward, no graph). Methods
run in shuffled interleaved rounds (benchmarks/harness.Interleaved), process CPU time with one thread; a cell is
the median over rounds of the per-round ratio to ``frozen``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness as H  # noqa: E402
from pica_kernels.core import experts as X  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class DeltaParametrization(nn.Module):
    """``W + ΔW`` of one fused parameter (E, out_total, in): its roles' ``M @ P_e``, formed on every call."""

    def __init__(self, layout: X.ExpertsLayout, param: str, roles: dict[str, tuple]) -> None:
        super().__init__()
        self.layout, self.param = layout, param
        self.roles = {k: v for k, v in roles.items() if layout.role(k).param == param}
        self.ms = nn.ParameterDict({k: m for k, (_, m, _) in self.roles.items()})

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        deltas = {k: X.role_delta(basis, self.ms[k], side, w.dtype) for k, (basis, _, side) in self.roles.items()}
        return w + X.param_delta(self.layout, self.param, w, deltas, w.dtype)


def build(hidden: int, ffn: int, experts: int, top_k: int, rank: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                           num_experts_per_tok=top_k, num_attention_heads=8, num_key_value_heads=8)
    cfg._experts_implementation = "grouped_mm"  # transformers' default for a model on CPU
    module = tf.models.mixtral.modeling_mixtral.MixtralExperts(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, hidden ** -0.5)
            p.requires_grad_(False)
    layout = X.experts_layout("experts", module)
    weights = [(r.role, X.role_weight(getattr(module, r.param), r)) for r in layout.roles]
    bases = X.experts_bases(weights, rank, "input", method="accurate", seed=0)
    ms = {r.role: nn.Parameter(torch.randn(r.out_features, rank) * 0.01) for r in layout.roles}
    roles = {r.role: (bases[r.role], ms[r.role], "input") for r in layout.roles}
    param_module = copy.deepcopy(module)
    for p in layout.params:
        parametrize.register_parametrization(param_module, p, DeltaParametrization(layout, p, roles),
                                             unsafe=True)
    eager = copy.deepcopy(module)
    eager.config = copy.copy(cfg)
    eager.config._experts_implementation = "eager"
    return module, eager, param_module, layout, roles, ms


def measure(tokens: int, args, module, eager, param_module, layout, adapters, ms) -> list[dict]:
    """The rows (train, infer) of one token count: every method's median time and ratio to ``frozen``."""
    dev = torch.device("cpu")
    rows = []
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, args.hidden, generator=g)
    index = torch.stack([torch.randperm(args.experts, generator=g)[: args.top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, args.top_k, generator=g), -1)
    gy = torch.randn(tokens, args.hidden, generator=g)
    calls = {
        "frozen": lambda x: module(x, index, weights),
        "frozen-eager": lambda x: eager(x, index, weights),
        "lowrank": lambda x: X.routed_forward(module, layout, x, index, weights, adapters),
        "param": lambda x: param_module(x, index, weights),
    }
    # Same result before timing: the two PiCa forms agree with each other.
    with torch.no_grad():
        torch.testing.assert_close(calls["lowrank"](x), calls["param"](x), atol=1e-4, rtol=1e-4)
    for mode in ("train", "infer"):
        def make(fn, mode=mode):
            if mode == "infer":
                def run():
                    with torch.no_grad():
                        fn(x)
                return run

            def run():
                xr = x.detach().requires_grad_(True)
                fn(xr).backward(gy)
                for m in ms.values():
                    m.grad = None
            return run

        bench = H.Interleaved({k: make(f) for k, f in calls.items()}, dev)
        bench.run_round(record=False)  # warm-up
        for _ in range(args.rounds):
            bench.run_round()
        summary = bench.summary("frozen")
        rows.append({"tokens": tokens, "mode": mode,
                     **{k: {"median_ms": 1e3 * v["median_s"], "ratio": v.get("ratio_to_frozen", 1.0)}
                        for k, v in summary.items()}})
        print(f"T={tokens} {mode}: " + ", ".join(f"{k} {v['median_s'] * 1e3:.2f} ms "
                                                  f"(x{v.get('ratio_to_frozen', 1.0):.2f})"
                                                  for k, v in summary.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "moe_experts"))
    args = ap.parse_args()
    H.configure()
    module, eager, param_module, layout, roles, ms = build(args.hidden, args.ffn, args.experts, args.top_k, args.rank)
    adapters = {k: [v] for k, v in roles.items()}
    load_before = os.getloadavg()
    rows = []
    for tokens in args.tokens:
        rows += measure(tokens, args, module, eager, param_module, layout, adapters, ms)
    env = {**H.environment(), "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    shape = {k: getattr(args, k) for k in ("hidden", "ffn", "experts", "top_k", "rank", "rounds")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"shape": shape, "environment": env, "rows": rows}, indent=1))
    lines = [
        "# PiCa on fused MoE experts: low-rank term on routed tokens vs parametrization (CPU, fp32)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python benchmarks/moe_experts.py`; "
        f"torch {env['torch']}, {env['threads']} thread(s), process CPU time, {args.rounds} interleaved shuffled "
        f"rounds per cell, medians of per-round ratios to `frozen`. One MixtralExperts module: hidden "
        f"{args.hidden}, ffn {args.ffn}, {args.experts} experts, top-{args.top_k}, PiCa r = {args.rank} input side, "
        f"one M per role shared by the experts.",
        f"**Shared machine**: 2 cores used by other jobs; load average {' / '.join(f'{v:.1f}' for v in load_before)} "
        f"before, {' / '.join(f'{v:.1f}' for v in env['loadavg_after'])} after (1/5/15 min).",
        "",
        "`frozen`: transformers' experts forward (grouped_mm); `frozen-eager`: its eager loop; `lowrank`: PiCaExperts' routed forward, "
        "F.linear(x_e, W_e) + (x_e @ P_e.T) @ M.T per expert; `param`: a parametrization adding every expert's "
        "ΔW = M @ P_e to the fused weights on each forward (PEFT's target_parameters way), then transformers' "
        "forward. train = forward + backward (dM and dx).",
        "",
        "| T | mode | frozen ms | frozen-eager | lowrank | param |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['mode']} | {r['frozen']['median_ms']:.2f} | "
                     f"{r['frozen-eager']['ratio']:.2f} | {r['lowrank']['ratio']:.2f} | {r['param']['ratio']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
