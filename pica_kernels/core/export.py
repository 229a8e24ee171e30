"""Export a PiCa adapter as a standard PEFT LoRA adapter (one implementation for both front ends).

A PiCa layer is structurally a LoRA layer ``y = base(x) + (x @ A.T) @ B.T * scaling``:

======  =====================  =====================
side    ``lora_A`` (r, in)     ``lora_B`` (out, r)
======  =====================  =====================
input   ``P`` (frozen basis)   ``M`` (trained)
output  ``M`` (trained)        ``U_r`` (frozen basis)
======  =====================  =====================

with ``scaling = lora_alpha / r = 1`` (``lora_alpha = r`` per layer, no rsLoRA,
no dropout). The file is what ``peft.PeftModel.from_pretrained`` reads and what
LoRA servers (vLLM, SGLang, TGI multi-LoRA; llama.cpp after
``convert_lora_to_gguf.py``) load: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``. The format has
no notion of a shared matrix, so a shared ``M`` is written once per layer.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import reference

__all__ = ["LORA_CONFIG_FILE", "LORA_TENSORS_FILE", "LoraFactors", "lora_factors", "write_lora_adapter"]

LORA_CONFIG_FILE = "adapter_config.json"
LORA_TENSORS_FILE = "adapter_model.safetensors"
#: PEFT's key prefix of a LoRA adapter file (``PeftModel`` wraps the model as ``base_model.model``).
PEFT_KEY_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactors:
    """One layer of the exported adapter: module name in the base model, ``lora_A`` (r, in), ``lora_B`` (out, r)."""

    name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def lora_factors(name: str, basis: torch.Tensor, m: torch.Tensor, side: str, fan_in_fan_out: bool) -> LoraFactors:
    """The LoRA factors of one PiCa layer. basis: P (r, in) or U_r (out, r); m: M (out, r) or (r, in).

    The tensors keep their own dtypes (basis in the weight's dtype, M usually float32), so the
    exported values are exactly the ones the PiCa layer computes with.
    """
    up, down = reference.lowrank_factors(basis, m, side)  # y += (x @ down.T) @ up.T: up (out, r), down (r, in)
    return LoraFactors(name, down.detach().to("cpu").contiguous(), up.detach().to("cpu").contiguous(), fan_in_fan_out)


def _pattern(name: str) -> str:
    """A PEFT rank/alpha pattern that matches module ``name`` only (PEFT tests ``(.*\\.)?(pattern)$``)."""
    return re.escape(name)


def _target_modules(names: list[str], all_linear_names: Iterable[str] | None) -> list[str]:
    """Last name components when they select exactly ``names`` among the model's linear layers, else full names."""
    if all_linear_names is not None:
        short = sorted({n.rpartition(".")[2] for n in names})
        selected = {n for n in all_linear_names if n.rpartition(".")[2] in short}
        if selected == set(names):
            return short
    return sorted(names)


def write_lora_adapter(
    path: str | os.PathLike,
    layers: list[LoraFactors],
    *,
    base_model_name_or_path: str | None,
    task_type: str | None = None,
    all_linear_names: Iterable[str] | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write ``layers`` as a PEFT LoRA adapter directory ``path``; returns it.

    ``r`` is the most common rank; layers of another rank get ``rank_pattern`` and
    ``alpha_pattern`` entries (``lora_alpha = r`` everywhere, so the scaling is 1).
    ``all_linear_names``: every adaptable module name of the base model, used to
    write short ``target_modules`` (``["q_proj", "v_proj"]``, what LoRA servers
    expect) when they select exactly the exported layers.
    """
    from safetensors.torch import save_file

    if not layers:
        raise ValueError("no PiCa layer to export (the adapter has no layers)")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"module names must be unique, got duplicates {sorted(n for n, c in Counter(names).items() if c > 1)}")
    rank = Counter(layer.rank for layer in layers).most_common(1)[0][0]
    rank_pattern = {_pattern(layer.name): layer.rank for layer in layers if layer.rank != rank}
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        key = f"{PEFT_KEY_PREFIX}{layer.name}"
        # Shared M: one clone per layer, as the format has no shared tensors (safetensors refuses aliased storage).
        tensors[f"{key}.lora_A.weight"] = layer.lora_a.clone()
        tensors[f"{key}.lora_B.weight"] = layer.lora_b.clone()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "target_modules": _target_modules(names, all_linear_names),
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        **(extra_config or {}),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / LORA_TENSORS_FILE), metadata={"format": "pt"})
    with open(path / LORA_CONFIG_FILE, "w") as f:
        json.dump(config, f, indent=2)
    return path
