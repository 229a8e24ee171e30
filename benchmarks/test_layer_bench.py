"""Per-layer suite: one linear layer, every method side by side (see harness.py for how it measures).

One benchmark per (shape, T): pytest-benchmark times *interleaved rounds* (each round runs every
method once in a shuffled order, forward then forward+backward); the per-method medians, ratios to
the frozen layer and the memory numbers go to ``extra_info`` and from there into the JSON that
``benchmarks/run.py`` turns into tables and plots.

Profiles (``BENCH_PROFILE``): "cpu" (default; trimmed to run in a few minutes on 2 cores) and
"gpu" (T up to 16384, full Llama-3-8B shapes, SVFT everywhere).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import harness as H

PROFILE = os.environ.get("BENCH_PROFILE", "cpu")

SMOLLM2 = [("smollm2.q_o", 576, 576), ("smollm2.k_v", 192, 576), ("smollm2.gate_up", 1536, 576),
           ("smollm2.down", 576, 1536)]
LLAMA3 = [("llama3-8b.q_o", 4096, 4096), ("llama3-8b.gate_up", 14336, 4096)]

if PROFILE == "gpu":
    CASES = [(n, o, i, t, True) for n, o, i in SMOLLM2 for t in (1, 64, 512, 2048, 8192, 16384)]
    CASES += [(n, o, i, t, True) for n, o, i in LLAMA3 for t in (1, 512, 2048, 8192, 16384)]
    SQUARES = (256, 512, 1024, 2048, 4096, 8192)
    ROUNDS = int(os.environ.get("BENCH_ROUNDS", 20))
else:
    # CPU: T up to 4096 on SmolLM2 shapes. Llama-3-8B shapes at small T only and without SVFT: its
    # rebuild of a 4096^2 weight is ~0.4 TFLOP per training step whatever T (test_svft_cost_vs_shape
    # measures that growth up to 2048^2; the GPU profile runs SVFT on the full shapes).
    CASES = [(n, o, i, t, True) for n, o, i in SMOLLM2 for t in (1, 8, 64, 256, 1024, 4096)]
    CASES += [("llama3-8b.q_o", 4096, 4096, t, False) for t in (1, 256)]
    CASES += [("llama3-8b.gate_up", 14336, 4096, t, False) for t in (1, 64)]
    SQUARES = (256, 512, 1024, 2048)
    ROUNDS = int(os.environ.get("BENCH_ROUNDS", 0))  # 0: by size, see _rounds


def _rounds(out_f: int, in_f: int, tokens: int) -> int:
    """Rounds per cell: fixed on GPU; on CPU many where a round is cheap, 3 where it takes seconds."""
    if ROUNDS:
        return ROUNDS
    work = out_f * in_f * max(tokens, 64)
    return 3 if work >= 576 * 1536 * 4096 / 2 else 5 if work >= 576 * 1536 * 1024 / 2 else 11


def _inner(out_f: int, in_f: int, tokens: int) -> int:
    """Calls per sample: enough that a sample of a small cell is a few milliseconds, not one 30 us call."""
    return max(1, min(50, int(2e8 // (out_f * in_f * max(tokens, 1)))))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-T{c[3]}" for c in CASES])
def test_layer(benchmark, case):
    name, out_f, in_f, tokens, with_svft = case
    dev = H.device()
    torch.manual_seed(0)
    base, factors = H.make_base(out_f, in_f, dev)
    methods = H.layer_methods(out_f, in_f, dev, include_svft=with_svft)
    x = torch.randn(tokens, in_f, device=dev)
    gy = torch.randn(tokens, out_f, device=dev)

    mods, info = {}, {}
    for m in methods:
        mod = m.build(H.fresh_copy(base), factors)
        mods[m.name] = mod
        row = {"note": m.note, **H.param_counts(mod)}
        xi = x.detach().requires_grad_(True)
        row.update(H.saved_activation_bytes(lambda mod=mod, xi=xi: mod(xi), mod))
        row["peak_bytes"] = H.peak_bytes(H.train_fn(mod, x, gy), dev)
        info[m.name] = row

    fns = {}
    for mname, mod in mods.items():
        fns[f"{mname}|fwd"] = H.forward_fn(mod, x)
        fns[f"{mname}|fwd+bwd"] = H.train_fn(mod, x, gy)
    inter = H.Interleaved(fns, dev, inner=_inner(out_f, in_f, tokens))
    inter.run_round(record=False)  # warm-up: allocator, PEFT's first-call paths, BLAS packing
    rounds = _rounds(out_f, in_f, tokens)
    benchmark.group = f"layer {name} T={tokens}"
    benchmark.pedantic(inter.run_round, rounds=rounds, iterations=1)

    timing = {}
    for mode in ("fwd", "fwd+bwd"):
        sub = inter.subset({k.split("|")[0]: k for k in fns if k.endswith("|" + mode)})
        timing[mode] = sub.summary("frozen")
    for mname in info:
        for mode in ("fwd", "fwd+bwd"):
            t = timing[mode][mname]
            info[mname][mode] = {k: v for k, v in t.items()}
    benchmark.extra_info.update({
        "suite": "layer", "shape": name, "out": out_f, "in": in_f, "T": tokens, "rank": H.RANK,
        "methods": info, "env": H.environment(),
    })
    # Sanity (not performance): every method ran every round, and x's bytes are what LoRA must save.
    assert all(len(v) == rounds for v in inter.samples.values())
    lora = info[f"lora-r{H.RANK}"]
    assert lora["saved_bytes"] >= x.numel() * x.element_size()


@pytest.mark.parametrize("tokens", (1, 256))
@pytest.mark.parametrize("n", SQUARES)
def test_svft_cost_vs_shape(benchmark, n, tokens):
    """SVFT's forward+backward against out*in*min(out, in): square layers n x n at two T."""
    dev = H.device()
    base, factors = H.make_base(n, n, dev)
    x = torch.randn(tokens, n, device=dev)
    gy = torch.randn(tokens, n, device=dev)
    mods = {
        "frozen": H.fresh_copy(base),
        f"pica-r{H.RANK}": H.pica_layer(H.fresh_copy(base), factors),
        "svft-p": H.svft_layer(H.fresh_copy(base), factors, "plain", 0),
    }
    inter = H.Interleaved({k: H.train_fn(m, x, gy) for k, m in mods.items()}, dev)
    inter.run_round(record=False)
    rounds = ROUNDS or 3
    benchmark.group = f"svft-scaling n={n} T={tokens}"
    benchmark.pedantic(inter.run_round, rounds=rounds, iterations=1)
    info = {}
    for k, m in mods.items():
        info[k] = {**H.param_counts(m), "fwd+bwd": inter.summary("frozen")[k]}
        xi = x.detach().requires_grad_(True)
        info[k].update(H.saved_activation_bytes(lambda m=m, xi=xi: m(xi), m))
    benchmark.extra_info.update({"suite": "svft-scaling", "out": n, "in": n, "T": tokens,
                                 "work": n**3, "methods": info, "env": H.environment()})
    assert info["svft-p"]["trainable"] == n + 1


OVERHEAD_T = 16384 if PROFILE == "gpu" else 4096
OVERHEAD_ROUNDS = int(os.environ.get("BENCH_OVERHEAD_ROUNDS", 30 if PROFILE == "gpu" else 11))


@pytest.mark.parametrize("shape", SMOLLM2, ids=[s[0] for s in SMOLLM2])
def test_step_overhead(benchmark, shape):
    """The training-step overhead claim, with more rounds: forward+backward of PiCa r=32 and PEFT LoRA
    (equal rank, equal budget) against the frozen layer on SmolLM2 shapes at large T."""
    name, out_f, in_f = shape
    dev = H.device()
    base, factors = H.make_base(out_f, in_f, dev)
    rb = H.lora_budget_rank(out_f, in_f)
    mods = {"frozen": H.fresh_copy(base), f"pica-r{H.RANK}": H.pica_layer(H.fresh_copy(base), factors),
            f"lora-r{H.RANK}": H.peft_layer(H.fresh_copy(base), H.RANK)}
    if rb != H.RANK:
        mods[f"lora-r{rb}"] = H.peft_layer(H.fresh_copy(base), rb)
    x = torch.randn(OVERHEAD_T, in_f, device=dev)
    gy = torch.randn(OVERHEAD_T, out_f, device=dev)
    inter = H.Interleaved({k: H.train_fn(m, x, gy) for k, m in mods.items()}, dev, seed=1)
    inter.run_round(record=False)
    benchmark.group = f"step-overhead {name} T={OVERHEAD_T}"
    benchmark.pedantic(inter.run_round, rounds=OVERHEAD_ROUNDS, iterations=1)
    timing = inter.summary("frozen")
    info = {k: {**H.param_counts(m), "fwd+bwd": timing[k]} for k, m in mods.items()}
    benchmark.extra_info.update({"suite": "step-overhead", "shape": name, "out": out_f, "in": in_f,
                                 "T": OVERHEAD_T, "rank": H.RANK, "methods": info, "env": H.environment()})
    assert all(len(v) == OVERHEAD_ROUNDS for v in inter.samples.values())
