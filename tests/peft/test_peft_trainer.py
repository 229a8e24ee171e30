"""transformers.Trainer with a PiCa PEFT model on GSM-8K rows: checkpoint + resume == uninterrupted run.

A tiny Llama (byte-tokenised rows) in the default run; the real SmolLM2-135M with
its tokenizer under the ``slow`` marker.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, tiny_model
from peft import get_peft_model
from train_helpers import BF16_LOSS_RTOL, trainer_losses

from pica_kernels.peft import PiCaPeftConfig

GSM8K = DATA_DIR / "gsm8k" / "train.jsonl"  # the first GSM-8K train rows, shipped in tests/data
MAX_LEN = 48


class _Rows(torch.utils.data.Dataset):
    """The first GSM-8K train rows, byte-tokenised into the tiny model's 97-token vocabulary or by ``tokenizer``."""

    def __init__(self, n: int, tokenizer=None):
        with GSM8K.open() as f:
            rows = [json.loads(next(f)) for _ in range(n)]
        self.items = []
        for row in rows:
            text = f"Q: {row['question']}\nA: {row['answer']}"
            if tokenizer is None:
                ids = torch.tensor([b % 97 for b in text.encode()][:MAX_LEN])
            else:
                ids = torch.tensor(tokenizer(text)["input_ids"][:MAX_LEN])
            self.items.append({"input_ids": ids, "labels": ids.clone()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _trainer(out_dir: Path, max_steps: int, base=None, tokenizer=None, r: int = 4, save_steps: int = 2):
    import transformers as tf

    base = tiny_model("llama") if base is None else base
    model = get_peft_model(base, PiCaPeftConfig(r=r, task_type="CAUSAL_LM"))
    args = tf.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=5e-3,
        save_strategy="steps", save_steps=save_steps, logging_steps=1, report_to=[], use_cpu=True, seed=7,
        data_seed=7, dataloader_num_workers=0, disable_tqdm=True,
    )
    return tf.Trainer(model=model, args=args, train_dataset=_Rows(8, tokenizer))


def test_trainer_checkpoint_resume_equals_uninterrupted(tmp_path):
    _check_resume(tmp_path, lambda out: _trainer(out, max_steps=4), resume_step=2)


def test_trainer_bf16_autocast_trains_and_tracks_fp32(tmp_path):
    """The PEFT front end under Trainer(bf16=True, use_cpu=True), i.e. torch.autocast to bfloat16 around the
    forward: 3 steps whose losses track an fp32 run within BF16_LOSS_RTOL (train_helpers.py says why), M stays
    fp32, and the loss falls by more than twice that tolerance, so a run that does not train fails. Before, every
    PiCa layer raised under autocast; then, with the fused AdamW step invisible to the cast cache, M never moved."""
    runs = {}
    for bf16 in (False, True):
        model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4, task_type="CAUSAL_LM"))
        runs[bf16] = trainer_losses(model, tmp_path / str(bf16), bf16=bf16)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    fp32, bf16 = runs[False], runs[True]
    assert fp32[-1] < fp32[0] * (1 - 2 * BF16_LOSS_RTOL), fp32
    assert bf16 != fp32  # autocast did run
    assert bf16 == pytest.approx(fp32, rel=BF16_LOSS_RTOL)


@pytest.mark.slow
def test_trainer_resume_on_real_smollm2(tmp_path, smollm2_base):
    model, tok = smollm2_base
    # 2 steps, resumed from step 1: each step of the 135M model costs seconds on a CPU.
    _check_resume(
        tmp_path, lambda out: _trainer(out, 2, base=_float_copy(model), tokenizer=tok, r=8, save_steps=1), resume_step=1
    )


def _float_copy(model):
    """A copy the Trainer accepts: GGUF tensors were de-quantized to float on load, only the flag remained."""
    base = copy.deepcopy(model)
    base.hf_quantizer = None
    if "is_quantized" in vars(base):
        base.is_quantized = False
    return base


def _check_resume(tmp_path, make, resume_step: int):
    full = make(tmp_path / "full")
    full.train()
    ref = {k: v.detach().clone() for k, v in full.model.base_model.pica_M["default"].items()}
    assert any(v.abs().sum() > 0 for v in ref.values())  # it trained
    ckpt = tmp_path / "full" / f"checkpoint-{resume_step}"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()

    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = resumed.model.base_model.pica_M["default"]
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5)
    # The steps after the checkpoint log the same losses in both runs.
    n_after = full.state.max_steps - resume_step
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h][-n_after:] == pytest.approx(
        [h["loss"] for h in full.state.log_history if "loss" in h][-n_after:], rel=1e-5
    )
