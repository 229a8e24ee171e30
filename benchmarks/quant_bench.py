"""PiCa vs PEFT QLoRA on a 4-bit base: the real SmolLM2-135M-Instruct with its linear layers in bitsandbytes nf4.

    python benchmarks/quant_bench.py                # -> benchmarks/results/quant_nf4.json and quant_nf4.md
    python benchmarks/quant_bench.py --rounds 9 --batch 4 --seq 128

`make bench` runs it after the pytest suites (benchmarks/run.py, suite "quant").

Base: SmolLM2-135M-Instruct (loaded as tests/test_smollm2.py and benchmarks/test_model_bench.py load it), every
``nn.Linear`` but ``lm_head`` quantized to nf4 with ``pica_kernels.core.quant.quantize_base`` (bitsandbytes
``Linear4bit``, block size 64, double quantization, compute dtype float32: the model is float32 on CPU). Each method
gets its own copy of the quantized model; all target the same layers (q, k, v, up, down):

- ``frozen``: the nf4 model, nothing trainable, input embeddings requiring grad (so the backward computes every dx
  the adapters need), no optimizer;
- ``pica-r32``: ``apply_pica`` r = 32, input side, M shared per role (the default; the basis is the SVD of the
  dequantized weight);
- ``qlora-r32``: PEFT ``LoraConfig(r=32, lora_alpha=32, lora_dropout=0)`` -- same rank;
- ``qlora-r{b}``: LoRA at the rank whose trainable count is closest to PiCa's (r >= 1).

PEFT picks its bitsandbytes LoRA layer (``peft.tuners.lora.bnb.Linear4bit``, what QLoRA runs) when the model says
``is_loaded_in_4bit``, as a model quantized by transformers' ``BitsAndBytesConfig`` does; the quantized copy here
sets that flag and the script checks the layer type.

Measured per method (harness.py): trainable parameters, resident bytes (parameters, buffers and the 4-bit quant
states: absmax, code, nested state), peak memory of one training step (the first, so it includes allocating
AdamW's state; CPU: the profiler's allocation log), activations saved by one forward (saved_tensors_hooks,
deduplicated, parameters and quant states excluded), AdamW state bytes, and step time (forward with labels +
backward + AdamW step) over interleaved shuffled rounds: medians, and the median of per-round ratios to frozen.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness as H  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def quant_state_tensors(model) -> list[torch.Tensor]:
    """Tensors bitsandbytes keeps outside parameters and buffers: the 4-bit weights' quant states."""
    out = []
    for mod in model.modules():
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        while qs is not None:
            out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if torch.is_tensor(t)]
            qs = getattr(qs, "state2", None)
    return out


def resident_bytes(model) -> int:
    seen = {}
    for t in [*model.parameters(), *model.buffers(), *quant_state_tensors(model)]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def lora_rank_per_layer_sum(model) -> int:
    """Σ (in + out) over the targeted layers: LoRA's trainable count per unit of rank."""
    total = 0
    for name, mod in model.named_modules():
        if name.split(".")[-1] in TARGETS and hasattr(mod, "in_features"):
            total += mod.in_features + mod.out_features
    return total


def build(name: str, base):
    model = copy.deepcopy(base)
    if name == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    rank = int(name.split("-r")[1])
    if name.startswith("pica"):
        import pica_kernels as pk

        return pk.apply_pica(model, pk.PiCaConfig(rank=rank, target_modules=TARGETS), progress=False)
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model.is_loaded_in_4bit = True  # as transformers' BitsAndBytesConfig sets it: PEFT's bnb LoRA layer
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear4bit), f"PEFT did not take its bitsandbytes 4-bit path: {type(q)}"
    return model


def run(args) -> dict:
    from benchmarks import test_model_bench as MB
    from pica_kernels.core.quant import quant_info, quantize_base
    from pica_kernels.registry_models import load_smollm2

    H.configure()
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    tok.pad_token = tok.pad_token or tok.eos_token
    fp32_resident = resident_bytes(model)
    t0 = time.perf_counter()
    base = quantize_base(model, "nf4")
    quant_s = time.perf_counter() - t0
    del model
    gc.collect()
    qinfo = quant_info(base.model.layers[0].self_attn.q_proj)
    MB.BATCH, MB.SEQ = args.batch, args.seq
    enc, labels = MB._batch(tok, dev)

    pica_count = 0
    names = ["frozen", f"pica-r{args.rank}", f"qlora-r{args.rank}"]
    models, opts, info = {}, {}, {}
    for name in names + ["qlora-match"]:
        if name == "qlora-match":  # LoRA's rank closest to PiCa's trainable count, known once PiCa is built
            name = f"qlora-r{max(1, round(pica_count / lora_rank_per_layer_sum(base)))}"
            if name in models:
                continue
            names.append(name)
        t0 = time.perf_counter()
        m = build(name, base).train()
        apply_s = time.perf_counter() - t0
        trainable = [p for p in m.parameters() if p.requires_grad]
        if name.startswith("pica"):
            pica_count = sum(p.numel() for p in trainable)
        models[name] = m
        opts[name] = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None
        info[name] = {"trainable": sum(p.numel() for p in trainable), "resident_bytes": resident_bytes(m),
                      "apply_s": apply_s}

    def step_fn(name):
        m, opt = models[name], opts[name]

        def step():
            m(**enc, labels=labels).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        return step

    fns = {n: step_fn(n) for n in names}
    for name in names:  # the first step of each method, measured for memory (not timed)
        saved = {}
        skip = _Resident(models[name])

        def measured(name=name, saved=saved, skip=skip):
            saved.update(H.saved_activation_bytes(fns[name], skip))

        info[name]["peak_bytes"] = H.peak_bytes(measured, dev)
        info[name]["saved_bytes"] = saved["saved_bytes"]
        info[name]["optimizer_state_bytes"] = MB._state_bytes(opts[name]) if opts[name] else 0
        print(f"{name}: peak {info[name]['peak_bytes'] / 2**20:.1f} MiB, saved {saved['saved_bytes'] / 2**20:.1f} MiB, "
              f"trainable {info[name]['trainable']:,}", flush=True)
    inter = H.Interleaved(fns, dev, seed=11)
    inter.run_round(record=False)
    for i in range(args.rounds):
        inter.run_round()
        print(f"round {i + 1}/{args.rounds}, load {os.getloadavg()[0]:.1f}", flush=True)
    timing = inter.summary("frozen")
    for name in names:
        info[name]["step"] = timing[name]
    return {"model": "SmolLM2-135M-Instruct", "quantization": qinfo, "targets": TARGETS, "batch": args.batch,
            "seq": args.seq, "rank": args.rank, "rounds": args.rounds, "clock": inter.clock_name,
            "base_load_s": load_s, "quantize_s": quant_s, "fp32_model_resident_bytes": fp32_resident,
            "methods": info}


class _Resident(torch.nn.Module):
    """A module whose parameters and buffers are a model's plus its quant-state tensors (for the saved-bytes skip)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        for i, t in enumerate(quant_state_tensors(model)):
            self.register_buffer(f"qs{i}", t, persistent=False)


def markdown(res: dict) -> str:
    env = res["env"]
    q = res["quantization"]
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = [
        f"# PiCa vs PEFT QLoRA on an nf4 base: {res['model']}",
        "",
        f"Measured {res['date']} by `{' '.join(['python benchmarks/quant_bench.py', *res['argv']])}` (part of "
        "`make bench`); "
        f"torch {env['torch']}, peft {env.get('peft', '?')}, bitsandbytes {res['bitsandbytes']}, "
        f"{env['threads']} thread(s), clock: {res['clock']}, {res['rounds']} interleaved shuffled rounds "
        "(medians; ratio = median of per-round ratios to frozen).",
        f"**Shared machine**: {env['cpu_count']} cores used by several jobs; load average "
        f"{' / '.join(f'{v:.1f}' for v in res['loadavg_before'])} before, "
        f"{' / '.join(f'{v:.1f}' for v in res['loadavg_after'])} after (1/5/15 min).",
        "",
        f"Base: every linear layer but lm_head in bitsandbytes {q['type']} (block size {q['block_size']}, double "
        f"quantization {q['double_quant']}, compute dtype {q['dtype']}); resident model "
        f"{mib(res['methods']['frozen']['resident_bytes'])} (float32: {mib(res['fp32_model_resident_bytes'])}). "
        f"Step: {res['batch']}x{res['seq']} tokens, forward with labels + backward + AdamW; adapters on "
        f"{', '.join(res['targets'])}. QLoRA = PEFT's bitsandbytes LoRA layer (`lora.bnb.Linear4bit`), "
        "lora_alpha = r, dropout 0.",
        "",
        "| method | trainable | step s (median) | vs frozen | peak step memory | saved activations | AdamW state | "
        "resident | apply s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["methods"].items():
        st = m["step"]
        lines.append(f"| {name} | {m['trainable']:,} | {st['median_s']:.3f} | {st.get('ratio_to_frozen', 1.0):.3f}x | "
                     f"{mib(m['peak_bytes'])} | {mib(m['saved_bytes'])} | {mib(m['optimizer_state_bytes'])} | "
                     f"{mib(m['resident_bytes'])} | {m['apply_s']:.1f} |")
    lines += ["", "Peak: the first step (AdamW allocates its state in it), above what was allocated before it. "
              "Saved activations: one forward's tensors kept for the backward, deduplicated by storage, "
              "parameters and quant states excluded. Apply: adapter construction on the loaded nf4 model (PiCa: the "
              "basis SVDs of the dequantized weights included). Raw samples (both clocks): `quant_nf4.json`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=H.RANK)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report-only", action="store_true", help="re-render quant_nf4.md from OUT/quant_nf4.json")
    args = ap.parse_args(argv)
    if args.report_only:
        (args.out / "quant_nf4.md").write_text(markdown(json.loads((args.out / "quant_nf4.json").read_text())))
        return
    import bitsandbytes

    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "argv": argv if argv is not None else sys.argv[1:], "loadavg_before": list(os.getloadavg())}
    res.update(run(args))
    res.update({"loadavg_after": list(os.getloadavg()), "env": H.environment(),
                "bitsandbytes": bitsandbytes.__version__})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_nf4.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "quant_nf4.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
