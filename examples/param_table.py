"""The paper's parameter-count table, computed from model configs on the meta device (no weights, seconds).

Rows: full fine-tuning, LoRA and DoRA (real PEFT, ``low_cpu_mem_usage``), SVFT_P and SVFT_R (the baseline in
benchmarks/baselines/svft.py), PiCa (this package, shared M) at the paper's ranks, for Gemma-2B, Gemma-7B and
LLaMA-3-8B. Targets as in the paper: q,k,v,up,down on Gemma for LoRA/DoRA/PiCa, all seven projections on
LLaMA-3-8B; SVFT adapts all seven projections (its published Gemma counts need them). "frozen extra" is what a
method stores besides the base model (PiCa's bases, SVFT's U, σ, Vh).

Run: ``python examples/param_table.py`` -> docs/results/param_counts.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the SVFT baseline lives in benchmarks/baselines
    sys.path.insert(0, str(ROOT))

import pica_kernels as pk  # noqa: E402

MODELS = {
    "Gemma-2B": ("gemma", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                               num_attention_heads=8, num_key_value_heads=1, head_dim=256)),
    "Gemma-7B": ("gemma", dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                               num_attention_heads=16, num_key_value_heads=16, head_dim=256)),
    "LLaMA-3-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8)),
}
FIVE = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (method, setting) rows per model. Paper values: the counts the PiCa/SVFT papers print
# (only those we could check are listed; the rest are "-").
ROWS = {
    "Gemma-2B": [("full", None), ("lora", 32), ("dora", 16), ("dora", 1), ("lora", 1), ("svft_p", None),
                 ("svft_r", 16), ("pica", 32), ("pica", 256)],
    "Gemma-7B": [("full", None), ("lora", 32), ("dora", 16), ("lora", 1), ("svft_p", None), ("svft_r", 16),
                 ("pica", 16), ("pica", 128), ("pica", 256)],
    "LLaMA-3-8B": [("full", None), ("lora", 32), ("dora", 16), ("lora", 1), ("svft_p", None), ("svft_r", 16),
                   ("pica", 32), ("pica", 256)],
}
PAPER = {
    ("Gemma-2B", "pica", 32): "0.67M", ("Gemma-2B", "pica", 256): "5.37M",
    ("Gemma-2B", "svft_p", None): "0.19M", ("Gemma-2B", "svft_r", 16): "6.35M",
    ("Gemma-7B", "pica", 16): "0.64M", ("Gemma-7B", "pica", 128): "5.11M", ("Gemma-7B", "pica", 256): "10.22M",
    ("Gemma-7B", "lora", 32): "68.8M",
    ("LLaMA-3-8B", "pica", 32): "1.38M", ("LLaMA-3-8B", "pica", 256): "11.01M",
}
LABEL = {"full": "Full FT", "lora": "LoRA r={}", "dora": "DoRA r={}", "svft_p": "SVFT_P", "svft_r": "SVFT_R d={}",
         "pica": "PiCa r={} (shared)"}


def meta_model(name: str):
    import transformers as tf

    arch, cfg = MODELS[name]
    config = (tf.GemmaConfig if arch == "gemma" else tf.LlamaConfig)(**cfg)
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


def _unique_numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def count(model_name: str, method: str, setting: int | None) -> dict:
    """``{"trainable": int, "frozen_extra": int, "targets": [...]}`` for one row, built on the meta device."""
    model = meta_model(model_name)
    targets = SEVEN if model_name == "LLaMA-3-8B" else FIVE
    if method == "full":
        return {"trainable": _unique_numel(model.parameters()), "frozen_extra": 0, "targets": "all"}
    if method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, LoraConfig(r=setting, target_modules=targets,
                                                          use_dora=method == "dora"), low_cpu_mem_usage=True)
        trainable = _unique_numel(p for p in peft_model.parameters() if p.requires_grad)
        return {"trainable": trainable, "frozen_extra": 0, "targets": targets}
    if method in ("svft_p", "svft_r"):
        from benchmarks.baselines.svft import apply_svft, svft_counts

        pattern, d = ("plain", 0) if method == "svft_p" else ("banded", setting)
        apply_svft(model, SEVEN, pattern=pattern, off_diag=d)
        c = svft_counts(model)
        return {"trainable": c["coefficients"] + c["gates"], "coefficients": c["coefficients"],
                "frozen_extra": c["frozen_factors"], "targets": SEVEN}
    if method == "pica":
        pk.apply_pica(model, pk.PiCaConfig(rank=setting, target_modules=targets), progress=False)
        report = pk.parameter_report(model)
        return {"trainable": report.trainable, "frozen_extra": report.frozen_bases, "targets": targets}
    raise ValueError(f"unknown method {method!r}")


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "param_counts")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    rows = []
    for model_name in args.models:
        for method, setting in ROWS[model_name]:
            c = count(model_name, method, setting)
            rows.append({"model": model_name, "method": method, "setting": setting, **c,
                         "paper": PAPER.get((model_name, method, setting))})
            print(f"{model_name:11s} {LABEL[method].format(setting):20s} {c['trainable']:>15,}", flush=True)
    lines = ["# Parameter counts (meta device, `python examples/param_table.py`)", "",
             "Targets: LoRA/DoRA/PiCa on q,k,v,up,down (Gemma) or all seven projections (LLaMA-3-8B); SVFT on all "
             "seven. *frozen extra*: what the method stores besides the base model (PiCa bases, SVFT U/σ/Vh). "
             "SVFT's trainable count is its M coefficients plus one gate per layer (Gemma-2B SVFT_P: 193,536 + 126). "
             "*paper*: the count the PiCa paper prints, where we could check it.", ""]
    for model_name in args.models:
        lines += [f"## {model_name}", "", "| method | trainable | exact | frozen extra | paper |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            if r["model"] != model_name:
                continue
            extra = human(r["frozen_extra"]) if r["frozen_extra"] else "-"
            lines.append(f"| {LABEL[r['method']].format(r['setting'])} | {human(r['trainable'])} | "
                         f"{r['trainable']:,} | {extra} | {r['paper'] or '-'} |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
