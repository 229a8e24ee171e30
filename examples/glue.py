"""GLUE-style fine-tuning of the real all-MiniLM-L6-v2: full FT, LoRA, SVFT_P, PiCa (shared and not).

For every task directory (GLUE format: ``train*.tsv`` and ``dev.tsv``) and method:

1. carve a validation slice out of train (``--val-size`` rows, fixed seed); the rest is the training set;
2. choose the learning rate of the method on that slice (seed 0, grid ``--lr-grid``, extended by one grid
   step, up to ``--max-extend`` times, while the best rate is at an edge); dev is never used for it;
3. train ``--seeds`` seeds at the chosen rate and report the task's GLUE metric on dev (accuracy; Matthews
   correlation for CoLA; Pearson for STS-B), trainable parameters, wall time and peak training memory;
4. for seed 0, record the spectral analysis of the adapted layers (intruder dimensions, DoRA's magnitude and
   direction change, Theorem 1 projection errors), at four checkpoints of training.

Model: the BERT encoder of all-MiniLM-L6-v2, mean pooling (how the model was trained), dropout 0.1, a
linear head (trainable in every method, counted apart). Adapted layers, for every method: query, key, value,
attention.output.dense, intermediate.dense, output.dense of the 6 encoder layers (36 layers, 6 roles).

Every record goes to ``--out`` (JSON, appended as runs finish; ``--resume`` skips what is there), and
``examples/glue_report.py`` turns it into the tables and plots of docs/results/glue/.

Data: a GLUE task directory as distributed (``--task-dir``: the ``train.tsv``/``dev.tsv`` of each task from
https://gluebenchmark.com/tasks, e.g. via the ``download_glue_data.py`` script of the GLUE baselines; files
beginning with a UTF-8 byte-order mark, as MRPC's do, are read too), or a Hugging Face dataset
(``--dataset nyu-mll/glue:sst2``; needs the ``datasets`` extra: ``pip install 'pica_kernels[datasets]'``; its
``train`` split, and ``validation`` as dev). tests/data/glue holds a few generated rows in the same layouts.

Run: ``make paper`` (the committed results: per task, ``--steps``/``--batch-size`` as in the Makefile;
~1.5 h on 2 CPU cores), or for one task
    python examples/glue.py --task-dir ../shared/data/SST-2 --steps 100 --out docs/results/glue/runs.json --resume
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the SVFT baseline lives in benchmarks/baselines
    sys.path.insert(0, str(ROOT))

import pica_kernels as pk  # noqa: E402
from pica_kernels.native import analysis  # noqa: E402
from pica_kernels.registry_models import load_minilm, minilm_dir  # noqa: E402

TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
METHODS = ("pica", "pica-unshared", "lora", "full", "svft")
# Learning-rate grids, one decade-ish around each method's usual range (LoRA and PiCa train small,
# zero-started factors and want rates 10-100x full fine-tuning's).
LR_GRID = {
    "full": (2e-5, 5e-5, 1e-4),
    "lora": (3e-4, 1e-3, 3e-3),
    "svft": (1e-3, 3e-3, 1e-2),
    "pica": (1e-3, 3e-3, 1e-2),
    "pica-unshared": (1e-3, 3e-3, 1e-2),
}
# Columns by which GLUE tasks name their texts and labels (train/dev headers); CoLA has no header.
TEXT_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                ("#1 String", "#2 String"), ("premise", "hypothesis"), ("sentence",))
LABEL_COLUMNS = ("label", "score", "gold_label", "Quality", "is_duplicate")


# ---------------------------------------------------------------------- data
@dataclass
class Split:
    texts: list[tuple[str, ...]]
    labels: list  # str class names or floats


@dataclass
class Task:
    name: str
    train: Split
    dev: Split
    regression: bool
    classes: list[str]
    metric: str


def _read_rows(path: str) -> list[list[str]]:
    # utf-8-sig: GLUE's MRPC files begin with a byte-order mark, which would otherwise glue itself to the
    # first header name ("\ufeffQuality") and hide the label column.
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _parse(path: str) -> Split:
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} is empty")
    header = rows[0]
    text_cols = next((cols for cols in TEXT_COLUMNS if all(c in header for c in cols)), None)
    label_col = next((c for c in LABEL_COLUMNS if c in header), None)
    if text_cols is not None and label_col is not None:
        ti = [header.index(c) for c in text_cols]
        li = header.index(label_col)
        body = rows[1:]
    elif len(header) == 4 and header[1] in ("0", "1"):  # CoLA: source, label, original label, sentence
        ti, li, body = [3], 1, rows
    else:
        raise ValueError(
            f"{path}: cannot find text and label columns; expected a header with one of "
            f"{[list(c) for c in TEXT_COLUMNS]} and one of {list(LABEL_COLUMNS)}, or CoLA's 4 headerless columns"
        )
    width = max(ti + [li]) + 1
    texts, labels = [], []
    for row in body:
        if len(row) < width:
            continue  # GLUE files have a few truncated rows (e.g. MNLI); skip rather than mis-parse
        texts.append(tuple(row[i] for i in ti))
        labels.append(row[li])
    return Split(texts, labels)


def load_task(task_dir: str | Path) -> Task:
    """Read a GLUE-format task directory: ``train*.tsv`` (the first in sorted order) and ``dev.tsv``."""
    task_dir = Path(task_dir)
    trains = sorted(glob.glob(str(task_dir / "train*.tsv")))
    dev = task_dir / "dev.tsv"
    if not trains or not dev.exists():
        raise FileNotFoundError(f"--task-dir {task_dir} must contain train*.tsv and dev.tsv")
    return _make_task(task_dir.name, _parse(trains[0]), _parse(str(dev)), where=str(task_dir))


def load_dataset_task(name: str, config: str | None = None, **load_kwargs) -> Task:
    """Read a GLUE task through the ``datasets`` package: ``train`` and ``validation`` (as dev) splits.

    ``name`` is a Hugging Face dataset (``nyu-mll/glue`` with ``config="sst2"``) or a local dataset directory
    (``train.jsonl`` + ``validation.jsonl``, ...); ``load_kwargs`` go to ``datasets.load_dataset``
    (``cache_dir=...``). Text columns as in the tsv files; the label column is ``label`` (class ids or scores).
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("--dataset needs the datasets package: pip install 'pica_kernels[datasets]'") from e
    loaded = datasets.load_dataset(name, config, **load_kwargs)
    dev_name = next((s for s in ("validation", "dev") if s in loaded), None)
    if "train" not in loaded or dev_name is None:
        raise ValueError(f"--dataset {name}: expected train and validation splits, found {sorted(loaded)}")
    splits = []
    for split in (loaded["train"], loaded[dev_name]):
        cols = split.column_names
        text_cols = next((c for c in TEXT_COLUMNS if all(x in cols for x in c)), None)
        label_col = next((c for c in LABEL_COLUMNS if c in cols), None)
        if text_cols is None or label_col is None:
            raise ValueError(f"--dataset {name}: cannot find text and label columns in {cols}; expected one of "
                             f"{[list(c) for c in TEXT_COLUMNS]} and one of {list(LABEL_COLUMNS)}")
        texts = [tuple(str(row[c]) for c in text_cols) for row in split]
        splits.append(Split(texts, [str(row[label_col]) for row in split]))
    task_name = config or Path(name.rstrip("/")).name
    return _make_task(task_name, splits[0], splits[1], where=f"--dataset {name}")


def _make_task(name: str, train: Split, dev_split: Split, where: str) -> Task:
    """Decide regression or classification from the labels, and the task's GLUE metric from its name."""
    try:
        values = [float(x) for x in train.labels + dev_split.labels]
        regression = any(v != int(v) for v in values)
    except ValueError:
        regression = False
    if regression:
        train.labels = [float(x) for x in train.labels]
        dev_split.labels = [float(x) for x in dev_split.labels]
        classes, metric = [], "pearson"
    else:
        classes = sorted(set(train.labels))
        unknown = set(dev_split.labels) - set(classes)
        if unknown:
            raise ValueError(f"{where}: dev labels {sorted(unknown)} never occur in train")
        metric = "mcc" if name.upper() == "COLA" else "accuracy"
    return Task(name, train, dev_split, regression, classes, metric)


def split_validation(train: Split, size: int, seed: int = 1234) -> tuple[Split, Split]:
    """(rest, validation): ``size`` rows drawn with a fixed seed; never the dev set."""
    if not 0 < size < len(train.texts):
        raise ValueError(f"--val-size must be in (0, {len(train.texts)}), got {size}")
    idx = list(range(len(train.texts)))
    random.Random(seed).shuffle(idx)
    val, rest = sorted(idx[:size]), sorted(idx[size:])

    def pick(ix):
        return Split([train.texts[i] for i in ix], [train.labels[i] for i in ix])

    return pick(rest), pick(val)


# ------------------------------------------------------------------- metrics
def metric_value(metric: str, preds: torch.Tensor, labels: torch.Tensor) -> float:
    """accuracy / Matthews correlation / Pearson, as GLUE defines them (0 when undefined, as sklearn)."""
    if metric == "pearson":
        p, y = preds.double() - preds.double().mean(), labels.double() - labels.double().mean()
        den = float(p.norm() * y.norm())
        return float(p @ y) / den if den > 0 else 0.0
    if metric == "accuracy":
        return float((preds == labels).double().mean())
    if metric == "mcc":
        tp = float(((preds == 1) & (labels == 1)).sum())
        tn = float(((preds == 0) & (labels == 0)).sum())
        fp = float(((preds == 1) & (labels == 0)).sum())
        fn = float(((preds == 0) & (labels == 1)).sum())
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / den if den > 0 else 0.0
    raise ValueError(f"unknown metric {metric!r}")


# --------------------------------------------------------------------- model
class Encoder(nn.Module):
    """BERT encoder + mean pooling + dropout + linear head; ``forward`` returns logits (B, C) or scores (B,)."""

    def __init__(self, bert: nn.Module, n_out: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(bert.config.hidden_size, n_out)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        h = h.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out = self.head(self.dropout(pooled))
        return out.squeeze(-1) if out.shape[-1] == 1 else out


def adapted_layers(model: Encoder) -> dict[str, nn.Module]:
    """Name -> module of the 36 adapted layers, whatever wraps them."""
    found = {}
    for name, mod in model.bert.named_modules():
        if any(name == t or name.endswith("." + t) for t in TARGETS) and name.startswith("encoder."):
            found[name] = mod
    return found


def effective_weight(mod: nn.Module) -> torch.Tensor:
    """The (out, in) weight the layer computes with, base + adapter, float64."""
    from benchmarks.baselines.svft import SVFTLinear

    with torch.no_grad():
        if isinstance(mod, pk.PiCaLinear):
            return (mod.base_weight.double() + mod.delta_weight().double())
        if isinstance(mod, SVFTLinear):
            return mod.dense_weight().double()
        if hasattr(mod, "get_delta_weight"):  # PEFT LoRA layer
            return mod.base_layer.weight.double() + mod.get_delta_weight(mod.active_adapter[0]).double()
        return mod.weight.double()


def build(method: str, task: Task, seed: int, args) -> Encoder:
    """Fresh model for ``method`` with its head; only the method's parameters and the head train."""
    bert, _ = load_minilm()
    torch.manual_seed(seed)
    model = Encoder(bert, 1 if task.regression else len(task.classes))
    if method == "full":
        pass
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        # A regex (full match) so that pooler.dense, unused under mean pooling, is not adapted.
        targets = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|" \
                  r"intermediate\.dense|output\.dense)"
        cfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=targets)
        model.bert = get_peft_model(model.bert, cfg).base_model.model
    elif method == "svft":
        from benchmarks.baselines.svft import apply_svft

        apply_svft(model.bert, TARGETS, pattern="plain", init="official", seed=seed)
    elif method in ("pica", "pica-unshared"):
        pk.apply_pica(model.bert, pk.PiCaConfig(rank=args.pica_rank, target_modules=TARGETS,
                                                share=method == "pica"), progress=False)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method != "full":
        for name, p in model.bert.named_parameters():
            if "pooler" in name:
                p.requires_grad_(False)
    else:
        for name, p in model.bert.named_parameters():
            p.requires_grad_("pooler" not in name)  # mean pooling: the pooler is unused
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


def trainable_counts(model: Encoder) -> dict[str, int]:
    head = sum(p.numel() for p in model.head.parameters())
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return {"adapter": total - head, "head": head}


# ------------------------------------------------------------------ training
def batches(tok, split: Split, task: Task, batch_size: int, max_len: int, order: list[int]):
    for i in range(0, len(order), batch_size):
        ix = order[i:i + batch_size]
        cols = list(zip(*[split.texts[j] for j in ix]))
        enc = tok(*cols, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        if task.regression:
            y = torch.tensor([split.labels[j] for j in ix], dtype=torch.float32)
        else:
            y = torch.tensor([task.classes.index(split.labels[j]) for j in ix])
        yield enc, y


def length_grouped_order(lengths: list[int], batch_size: int, rng: random.Random, mega: int = 50) -> list[int]:
    """A shuffled epoch in which each run of ``batch_size`` rows has similar lengths (less padding).

    As transformers' ``group_by_length``: shuffle, cut into mega-batches of ``mega`` batches, sort each by
    length, cut into batches, shuffle the batches. Padding to the batch's longest row then costs ~1.3x the
    mean length instead of ~3x (SST-2), which is most of the step time on CPU.
    """
    perm = list(range(len(lengths)))
    rng.shuffle(perm)
    chunks = []
    for i in range(0, len(perm), batch_size * mega):
        group = sorted(perm[i:i + batch_size * mega], key=lambda j: -lengths[j])
        chunks += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(chunks)
    return [j for chunk in chunks for j in chunk]


def loss_fn(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y) if task.regression else F.cross_entropy(out, y)


@torch.no_grad()
def evaluate(model: Encoder, tok, split: Split, task: Task, args) -> float:
    model.eval()
    order = sorted(range(len(split.texts)), key=lambda i: sum(len(t) for t in split.texts[i]))
    preds = []
    for enc, _ in batches(tok, split, task, 128, args.max_len, order):
        out = model(**enc)
        preds.append(out if task.regression else out.argmax(-1))
    model.train()
    preds = torch.cat(preds)[torch.argsort(torch.tensor(order))]  # back to the split's row order
    labels = (torch.tensor(split.labels) if task.regression
              else torch.tensor([task.classes.index(x) for x in split.labels]))
    return metric_value(task.metric, preds, labels)


def spectral_snapshot(w0: dict[str, torch.Tensor], model: Encoder, args, full: bool) -> dict:
    """Per adapted layer: ΔM/ΔD; with ``full`` also intruders (both sides), projection errors of ΔW over
    ranks (Theorem 1) and the singular-vector drift ε (the SVDs cost ~10 s a snapshot: final step only)."""
    snap = {}
    for name, mod in adapted_layers(model).items():
        w = effective_weight(mod)
        delta = w - w0[name]
        rec = analysis.magnitude_direction(w0[name], w)
        snap[name] = rec
        if not full:
            continue
        for side in ("output", "input"):
            rec[f"intruders_{side}"] = analysis.intruder_dimensions(
                w0[name], w, k=args.intruder_k, threshold=args.intruder_threshold, side=side)["count"]
        if float(delta.norm()) > 0:
            ranks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r <= min(delta.shape)]
            rec["projection"] = analysis.projection_errors(w0[name], delta, ranks, side="input")
            rec.update(analysis.singular_vector_drift(w0[name], w, args.pica_rank))
    return snap


def peak_step_bytes(model: Encoder, opt, tok, split: Split, task: Task, args) -> int:
    """Peak bytes allocated during one training step on the longest batch, above the resident model.

    Resident bytes (weights, buffers, optimizer state after the first step) are added by the caller.
    """
    from benchmarks.harness import peak_bytes

    longest = sorted(range(len(split.texts)), key=lambda i: -sum(len(t) for t in split.texts[i]))
    enc, y = next(batches(tok, split, task, args.batch_size, args.max_len, longest[:args.batch_size]))

    def step():
        loss_fn(task, model(**enc), y).backward()
        opt.zero_grad(set_to_none=True)

    return peak_bytes(step, torch.device("cpu"))


def resident_bytes(model: Encoder, opt) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def run(task: Task, method: str, seed: int, lr: float, train: Split, evals: dict[str, Split], args,
        analyse: bool = False) -> dict:
    tok = run.tok
    t_start = time.perf_counter()
    model = build(method, task, seed, args).train()
    params = trainable_counts(model)
    w0 = {n: effective_weight(m) for n, m in adapted_layers(model).items()} if analyse else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=args.weight_decay)
    steps = args.steps
    warmup = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    rng = random.Random(seed)
    lengths = [sum(len(t) for t in text) for text in train.texts]
    order: list[int] = []
    losses, snapshots = [], {}
    checkpoints = {steps // 4, steps // 2, 3 * steps // 4, steps}
    step = 0
    t_train = time.perf_counter()
    while step < steps:
        if len(order) < args.batch_size:
            order += length_grouped_order(lengths, args.batch_size, rng)
        ix, order = order[:args.batch_size], order[args.batch_size:]
        enc, y = next(batches(tok, train, task, args.batch_size, args.max_len, ix))
        loss = loss_fn(task, model(**enc), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{task.name}/{method} seed {seed} lr {lr}: loss {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        step += 1
        if analyse and step in checkpoints:
            snapshots[str(step)] = spectral_snapshot(w0, model, args, full=step == steps)
    train_s = time.perf_counter() - t_train
    record = {
        "task": task.name, "method": method, "seed": seed, "lr": lr, "steps": steps,
        "batch_size": args.batch_size, "max_len": args.max_len, "train_rows": len(train.texts), "params": params,
        "train_loss_first50": sum(losses[:50]) / len(losses[:50]),
        "train_loss_last50": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": train_s,
        "metric": task.metric,
    }
    for split_name, split in evals.items():
        record[split_name] = evaluate(model, tok, split, task, args)
    if analyse:
        record["spectral"] = snapshots
        record["peak_bytes"] = resident_bytes(model, opt) + peak_step_bytes(model, opt, tok, train, task, args)
    record["wall_seconds"] = time.perf_counter() - t_start
    return record


# ----------------------------------------------------------------------- CLI
def choose_lr(lrs: list[float], scores: dict[float, float]) -> float:
    """The best-scoring rate; among tied ones the middle one (in log scale) of the tied, not an edge."""
    top = max(scores[lr] for lr in lrs)
    tied = sorted(lr for lr in lrs if scores[lr] == top)
    return tied[(len(tied) - 1) // 2]


def extend_grid(lrs: list[float], scores: dict[float, float], allowed: bool) -> float | None:
    """The next learning rate to try when the best one is at an edge of the (sorted) grid, else None.

    A best value at the edge says the optimum may lie outside: step one grid ratio further (rounded to one
    significant digit). ``allowed`` caps how many extensions a method gets (``--max-extend``).
    """
    lrs = sorted(lrs)
    if not allowed or len(lrs) < 2:
        return None
    top = max(scores[lr] for lr in lrs)
    if sum(scores[lr] == top for lr in lrs) > 1:
        return None  # a tie (e.g. every rate predicts the majority class): the edge says nothing
    best = max(lrs, key=lambda lr: scores[lr])
    if best == lrs[-1]:
        return float(f"{best * lrs[-1] / lrs[-2]:.0e}")
    if best == lrs[0]:
        return float(f"{best * lrs[0] / lrs[1]:.0e}")
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-dir", action="append", default=[],
                        help="GLUE task directory as distributed: train*.tsv and dev.tsv (repeat); the full sets "
                             "come from https://gluebenchmark.com/tasks")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME[:CONFIG]",
                        help="a Hugging Face dataset instead, e.g. nyu-mll/glue:sst2, or a local dataset directory "
                             "(train and validation splits; needs pip install 'pica_kernels[datasets]'); repeat")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--val-size", type=int, default=500, help="rows of train held out to choose the LR")
    parser.add_argument("--dev-limit", type=int, default=0, help="evaluate on the first N dev rows (0: all)")
    parser.add_argument("--lr-grid", nargs="*", default=[], metavar="METHOD=LR,LR,...",
                        help="override a method's learning-rate grid")
    parser.add_argument("--max-extend", type=int, default=1,
                        help="learning rates added per method when the best is at an edge of the grid")
    parser.add_argument("--pica-rank", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--intruder-k", type=int, default=10)
    parser.add_argument("--intruder-threshold", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of run records")
    parser.add_argument("--resume", action="store_true", help="keep records already in --out and skip their runs")
    args = parser.parse_args(argv)
    if not args.task_dir and not args.dataset:
        parser.error("give at least one --task-dir or --dataset")
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = dict(LR_GRID)
    for item in args.lr_grid:
        method, _, values = item.partition("=")
        if method not in METHODS or not values:
            raise SystemExit(f"--lr-grid expects METHOD=LR,LR,... with METHOD in {METHODS}, got {item!r}")
        grid[method] = tuple(float(v) for v in values.split(","))

    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    run.tok = AutoTokenizer.from_pretrained(minilm_dir())
    records = []
    if args.resume and args.out.exists():
        records = json.loads(args.out.read_text())["runs"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    def save():
        env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": os.cpu_count()}
        args.out.write_text(json.dumps({"settings": settings, "lr_grid": grid, "environment": env,
                                        "runs": records}, indent=1))

    def done(**key):
        return next((r for r in records if all(r.get(k) == v for k, v in key.items())), None)

    def tasks():
        for task_dir in args.task_dir:
            yield load_task(task_dir)
        for spec in args.dataset:
            name, _, config = spec.partition(":")
            yield load_dataset_task(name, config or None)

    for task in tasks():
        rest, val = split_validation(task.train, args.val_size)
        dev = task.dev if not args.dev_limit else Split(task.dev.texts[:args.dev_limit],
                                                        task.dev.labels[:args.dev_limit])
        print(f"== {task.name}: train {len(rest.texts)}, validation slice {len(val.texts)}, dev {len(dev.texts)}, "
              f"metric {task.metric}", flush=True)
        for method in args.methods:
            lrs = list(grid[method])
            while True:
                for lr in lrs:
                    if done(task=task.name, method=method, phase="lr-search", lr=lr, steps=args.steps) is None:
                        rec = run(task, method, 0, lr, rest, {"validation": val}, args)
                        rec["phase"] = "lr-search"
                        records.append(rec)
                        save()
                        print(f"   lr-search {method:14s} lr {lr:.0e}: validation {rec['validation']:.4f} "
                              f"({rec['wall_seconds']:.0f} s)", flush=True)
                scores = {lr: done(task=task.name, method=method, phase="lr-search", lr=lr, steps=args.steps)["validation"]
                          for lr in lrs}
                more = extend_grid(lrs, scores, len(lrs) - len(grid[method]) < args.max_extend)
                if more is None:
                    break
                lrs = sorted(lrs + [more])
            best = choose_lr(lrs, scores)
            stale = [r for r in records if r["task"] == task.name and r["method"] == method
                     and r.get("phase") in ("final", "lr-search") and r["steps"] != args.steps
                     or r["task"] == task.name and r["method"] == method and r.get("phase") == "final"
                     and r["lr"] != best]
            if stale:  # finals of an earlier search that a grid extension superseded
                print(f"   dropping {len(stale)} runs of {method} superseded by a grid extension or another --steps")
                records[:] = [r for r in records if not any(r is x for x in stale)]
                save()
            for seed in range(args.seeds):
                if done(task=task.name, method=method, phase="final", seed=seed, lr=best, steps=args.steps) is None:
                    rec = run(task, method, seed, best, rest, {"dev": dev}, args, analyse=seed == 0)
                    rec["phase"] = "final"
                    records.append(rec)
                    save()
                    print(f"   final     {method:14s} lr {best:.0e} seed {seed}: dev {rec['dev']:.4f} "
                          f"({rec['wall_seconds']:.0f} s)", flush=True)
    save()


if __name__ == "__main__":
    main()
