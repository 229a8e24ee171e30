"""A few transformers.Trainer steps on a tiny model, for the mixed-precision tests of both front ends.

Not a conftest.py (tests import ``conftest`` by name; a second one would shadow it) and not collected.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Relative tolerance of a bf16 (autocast) run's losses against the same run in fp32: one bf16 ulp at the loss's
#: magnitude (2**-7: bf16 keeps 8 significant bits). The forward's GEMMs round to bf16 (relative error <= 2**-8
#: each) and the loss averages the log-softmax of such logits over every token, so the first loss agrees to far
#: better than that (2e-5 measured), and the fp32-accumulated dM keeps the next steps as close (3e-5 measured at
#: steps 2 and 3). The tolerance still fails a run that does not train: the loss falls 3% in these 3 steps.
BF16_LOSS_RTOL = 2.0**-7

SEQ = torch.tensor([(7 * i * i + 3 * i) % 97 for i in range(32)])  # one fixed sequence: 3 steps visibly learn it


class _Repeated(torch.utils.data.Dataset):
    """Six copies of one sequence: every batch is the same, so the loss falls from step to step."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": SEQ, "labels": SEQ.clone()}


def trainer_losses(model, out_dir: Path, *, bf16: bool, steps: int = 3) -> list[float]:
    """Train ``model`` for ``steps`` steps with ``transformers.Trainer(use_cpu=True, bf16=bf16)`` (autocast to
    bfloat16 around the forward when ``bf16``; the Trainer's default optimizer, fused AdamW) and return the loss
    logged at each step."""
    import transformers as tf

    args = tf.TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=2, learning_rate=2e-2,
        lr_scheduler_type="constant", save_strategy="no", logging_steps=1, report_to=[], use_cpu=True, seed=7,
        data_seed=7, dataloader_num_workers=0, disable_tqdm=True, bf16=bf16,
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=_Repeated())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
