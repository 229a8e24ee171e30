"""transformers.Trainer with a PiCa PEFT model on GSM-8K rows: checkpoint + resume == uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model

from pica_kernels.peft import PiCaPeftConfig

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"
MAX_LEN = 48


class _Rows(torch.utils.data.Dataset):
    """The first GSM-8K train rows, byte-tokenised into the tiny model's 97-token vocabulary."""

    def __init__(self, n: int):
        with GSM8K.open() as f:
            rows = [json.loads(next(f)) for _ in range(n)]
        self.items = []
        for row in rows:
            text = f"Q: {row['question']}\nA: {row['answer']}"
            ids = torch.tensor([b % 97 for b in text.encode()][:MAX_LEN])
            self.items.append({"input_ids": ids, "labels": ids.clone()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _trainer(out_dir: Path, max_steps: int):
    import transformers as tf

    model = get_peft_model(tiny_model("llama"), PiCaPeftConfig(r=4, task_type="CAUSAL_LM"))
    args = tf.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=5e-3,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=7,
        data_seed=7, dataloader_num_workers=0, disable_tqdm=True,
    )
    return tf.Trainer(model=model, args=args, train_dataset=_Rows(8))


def test_trainer_checkpoint_resume_equals_uninterrupted(tmp_path):
    assert GSM8K.is_file(), f"GSM-8K rows expected at {GSM8K} (shared/data beside the checkout)"
    full = _trainer(tmp_path / "full", max_steps=4)
    full.train()
    ref = {k: v.detach().clone() for k, v in full.model.base_model.pica_M["default"].items()}
    assert any(v.abs().sum() > 0 for v in ref.values())  # it trained
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()

    resumed = _trainer(tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = resumed.model.base_model.pica_M["default"]
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5)
    # The two steps after the checkpoint log the same losses in both runs.
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h][-2:] == pytest.approx(
        [h["loss"] for h in full.state.log_history if "loss" in h][-2:], rel=1e-5
    )
