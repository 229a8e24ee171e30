"""SmolLM2-135M-Instruct on GSM-8K: PiCa vs LoRA at a matched budget, exact match on a fixed test slice.

Both methods adapt q,k,v,up,down of the real SmolLM2-135M-Instruct (30 layers), train on the first
``--train-rows`` GSM-8K train rows (prompt "Question: ...\\nAnswer:", loss on the answer only, the
calculator annotations ``<<48/2=24>>`` stripped), and are scored by greedy decoding on the first
``--test-rows`` test questions: the number after "####" (else the last number of the reply) must equal the
reference. The base model is scored the same way.

Budget: PiCa r=64 shared has 196,608 trainable values, LoRA r=1 (the smallest LoRA) 207,360: matched
within 5%, LoRA a little larger. Learning rates are not tuned (one value each, in the record).

Data: ``--data-dir`` holds ``train.jsonl`` and ``test.jsonl`` as distributed by OpenAI
(https://github.com/openai/grade-school-math, grade_school_math/data/, MIT licence), or ``--dataset`` names a
Hugging Face dataset with ``question``/``answer`` columns and train/test splits (``openai/gsm8k:main``; needs
``pip install 'pica_kernels[datasets]'``). tests/data/gsm8k holds the first rows of each file.

Run (the committed results; ~15 min on 2 CPU cores; a tiny budget: 80 steps x 4 rows):
    python examples/gsm8k.py --data-dir ../shared/data/gsm8k --out docs/results/gsm8k/results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import time
from pathlib import Path

import torch

import pica_kernels as pk
from pica_kernels.registry_models import load_smollm2

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def read_jsonl(path: Path, limit: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= limit:
                break
            rows.append(json.loads(line))
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def load_rows(split: str, limit: int, data_dir: Path | None = None, dataset: str | None = None,
              **load_kwargs) -> list[dict]:
    """The first ``limit`` rows ({"question", "answer"}) of ``split`` ("train" or "test").

    From ``data_dir/{split}.jsonl``, or through ``datasets.load_dataset`` when ``dataset`` ("NAME[:CONFIG]",
    a hub name or a local dataset directory) is given; ``load_kwargs`` go to ``load_dataset``.
    """
    if (data_dir is None) == (dataset is None):
        raise ValueError("give exactly one of --data-dir and --dataset")
    if data_dir is not None:
        path = Path(data_dir) / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"--data-dir {data_dir} must contain {split}.jsonl (GSM-8K as distributed)")
        return read_jsonl(path, limit)
    try:
        import datasets
    except ImportError as e:
        raise ImportError("--dataset needs the datasets package: pip install 'pica_kernels[datasets]'") from e
    name, _, config = dataset.partition(":")
    rows = datasets.load_dataset(name, config or None, split=split, **load_kwargs)
    missing = {"question", "answer"} - set(rows.column_names)
    if missing:
        raise ValueError(f"--dataset {dataset}: split {split} lacks the columns {sorted(missing)}")
    rows = [{"question": r["question"], "answer": r["answer"]} for r in rows.select(range(min(limit, len(rows))))]
    if not rows:
        raise ValueError(f"--dataset {dataset}: split {split} has no rows")
    return rows


def prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def clean_answer(answer: str) -> str:
    """The reference solution without calculator annotations: ``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``."""
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def extract_number(text: str) -> str | None:
    """The number after the first "####", else the last number in ``text``; commas and a trailing ".0" dropped."""
    head, sep, tail = text.partition("####")
    found = _NUMBER.findall(tail if sep else head)
    if not found:
        return None
    value = (found[0] if sep else found[-1]).replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def build(method: str, base, args):
    model = copy.deepcopy(base)
    if method == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if method == "pica":
        return pk.apply_pica(model, pk.PiCaConfig(rank=args.pica_rank, target_modules=TARGETS), progress=False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=TARGETS)
        return get_peft_model(model, cfg)
    raise ValueError(f"unknown method {method!r}")


def train(model, tok, rows: list[dict], lr: float, args) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / args.steps))
    rng = random.Random(args.seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order += perm
        batch, order = [rows[i] for i in order[:args.batch_size]], order[args.batch_size:]
        ids, labels = [], []
        for r in batch:
            p = tok(prompt(r["question"]))["input_ids"]
            a = tok(" " + clean_answer(r["answer"]) + tok.eos_token)["input_ids"]
            seq = (p + a)[:args.max_len]
            ids.append(seq)
            labels.append(([-100] * len(p) + a)[:args.max_len])
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
        target = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if (step + 1) % 10 == 0:
            print(f"   step {step + 1:4d}  loss {sum(losses[-10:]) / 10:.3f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def score(model, tok, rows: list[dict], args) -> dict:
    """Greedy replies to each test question; exact match of the extracted number."""
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    correct, samples = 0, []
    for i in range(0, len(rows), args.eval_batch):
        chunk = rows[i:i + args.eval_batch]
        enc = tok([prompt(r["question"]) for r in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
        for r, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            reply = tok.decode(seq, skip_special_tokens=True)
            reply = reply.split("\nQuestion:")[0]  # the base model goes on with new questions
            pred, gold = extract_number(reply), extract_number(r["answer"])
            correct += pred is not None and pred == gold
            samples.append({"question": r["question"], "gold": gold, "pred": pred, "reply": reply})
    return {"exact_match": correct / len(rows), "correct": correct, "n": len(rows), "samples": samples}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["base", "pica", "lora"], choices=["base", "pica", "lora"])
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", type=Path, help="directory with GSM-8K's train.jsonl and test.jsonl "
                      "(https://github.com/openai/grade-school-math, grade_school_math/data/)")
    data.add_argument("--dataset", metavar="NAME[:CONFIG]", help="a Hugging Face dataset instead (openai/gsm8k:main) "
                      "or a local dataset directory; needs pip install 'pica_kernels[datasets]'")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--test-rows", type=int, default=100, help="the first N test questions")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--pica-rank", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=1)
    parser.add_argument("--pica-lr", type=float, default=2e-3)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--eval-batch", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train_rows = load_rows("train", args.train_rows, args.data_dir, args.dataset)
    test_rows = load_rows("test", args.test_rows, args.data_dir, args.dataset)
    base, tok = load_smollm2()
    records = []
    for method in args.methods:
        t0 = time.perf_counter()
        model = build(method, base, args)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lr = {"pica": args.pica_lr, "lora": args.lora_lr}.get(method)
        print(f"== {method}: {trainable:,} trainable", flush=True)
        losses = train(model, tok, train_rows, lr, args) if method != "base" else []
        train_s = time.perf_counter() - t0
        result = score(model, tok, test_rows, args)
        print(f"   exact match {result['correct']}/{result['n']} = {result['exact_match']:.3f} "
              f"(train {train_s:.0f} s, total {time.perf_counter() - t0:.0f} s)", flush=True)
        records.append({"method": method, "trainable": trainable, "lr": lr, "losses": losses,
                        "train_seconds": train_s, "total_seconds": time.perf_counter() - t0, **result})
        del model
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "runs": records}, indent=1))
    lines = ["| method | trainable | lr | steps x batch | train loss first 10 -> last 10 | exact match |",
             "|---|---:|---:|---:|---|---:|"]
    for r in records:
        first, last = r["losses"][:10], r["losses"][-10:]
        loss = (f"{sum(first) / max(1, len(first)):.3f} -> {sum(last) / max(1, len(last)):.3f}"
                if r["losses"] else "-")
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['lr'] or '-'} | "
                     f"{args.steps if r['losses'] else 0} x {args.batch_size} | {loss} | "
                     f"{r['correct']}/{r['n']} = {100 * r['exact_match']:.1f}% |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
