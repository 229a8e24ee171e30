"""``export_lora``: write a PiCa adapter as a standard PEFT LoRA adapter (both front ends).

The native front end (a model from :func:`pica_kernels.apply_pica`) and the PEFT
front end (a ``PeftModel`` with a PiCa config) only differ in where they keep
the basis and ``M``; each layer class hands its factors out through its public
``lora_factors`` method (:class:`pica_kernels.core.base.PiCaLayer`), and
:func:`pica_kernels.core.export.write_lora_adapter` writes them. See docs/export.md
for serving the result with vLLM, SGLang and llama.cpp.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..core.base import LoraFactors, PiCaLayer, is_supported_base
from ..core.experts import fused_parameters
from ..core.export import PEFT_KEY_PREFIX, ExpertLoraFactors, write_lora_adapter

__all__ = ["export_lora"]


def _plain_name(name: str) -> str:
    """Module name in the base model: a PeftModel's ``base_model.model.`` prefix removed."""
    return name[len(PEFT_KEY_PREFIX):] if name.startswith(PEFT_KEY_PREFIX) else name


def _is_experts_layer(module: nn.Module) -> bool:
    """A PiCa layer on fused MoE experts (either front end): it hands out LoRA-for-parameters factors."""
    return callable(getattr(module, "experts_lora_factors", None))


def _collect(model: nn.Module, adapter_name: str | None
             ) -> tuple[list[LoraFactors], list[ExpertLoraFactors], list[str], list[str], str]:
    """The LoRA factors of ``adapter_name`` (default: the active adapter) of dense layers and of fused expert
    parameters, every adaptable module name, every fused expert parameter's name, the adapter."""
    layers: list[LoraFactors] = []
    expert_layers: list[ExpertLoraFactors] = []
    linear_names: list[str] = []
    expert_names: list[str] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, PiCaLayer) or _is_experts_layer(module):
            inside.append(name)
            plain = _plain_name(name)
            if isinstance(module, PiCaLayer):
                linear_names.append(plain)
                found = module.lora_factors(plain, adapter_name)
            else:
                expert_names.extend(f"{plain}.{p}" for p in fused_parameters(module.base_layer))
                found = module.experts_lora_factors(plain, adapter_name)
            if found is None:
                continue
            adapter, factors = found
            if adapter_name is None:
                adapter_name = adapter  # the first active adapter found decides for the whole model
            if isinstance(factors, LoraFactors):
                layers.append(factors)
            else:
                expert_layers.extend(factors)
        elif name and is_supported_base(module):
            linear_names.append(_plain_name(name))
        elif name:
            expert_names.extend(f"{_plain_name(name)}.{p}" for p in fused_parameters(module))
    if not layers and not expert_layers:
        raise ValueError(
            f"{type(model).__name__} has no PiCa layer with adapter {adapter_name!r}; "
            f"export_lora needs a model from apply_pica or a PeftModel with a PiCa config"
        )
    return layers, expert_layers, linear_names, expert_names, adapter_name


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (``model.base_model.model``), else ``model``."""
    tuner = getattr(model, "base_model", None)
    return tuner.model if type(model).__name__.startswith("PeftModel") and hasattr(tuner, "model") else model


def _base_model_name(model: nn.Module) -> str | None:
    cfg = getattr(_inner_model(model), "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None


def _task_type(model: nn.Module) -> str | None:
    cls = type(_inner_model(model)).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForSeq2SeqLM", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return None


def export_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write PiCa adapter ``adapter_name`` (default: the active one) of ``model`` as a PEFT LoRA adapter; returns path.

    ``path`` becomes a directory holding ``adapter_config.json`` and
    ``adapter_model.safetensors``: ``lora_A = P`` (r, in), ``lora_B = M`` (out, r)
    on the input side, ``lora_A = M`` (r, in), ``lora_B = U_r`` (out, r) on the
    output side, ``lora_alpha = r`` (scaling 1), ``rank_pattern`` / ``alpha_pattern``
    for layers of another rank. ``peft.PeftModel.from_pretrained(base, path)`` on the
    same base model then computes what the PiCa model computes.

    Fused MoE experts are written as PEFT's LoRA for parameters (``target_parameters``,
    :mod:`pica_kernels.core.export` gives the layout): a fused ``gate_up_proj`` of rank
    ``2r`` (its gate and up roles side by side), ``down_proj`` of rank ``r``. What that
    format cannot express raises :class:`pica_kernels.core.export.LoraExportError`
    naming the module and why.

    Works for models from :func:`pica_kernels.apply_pica` and for PEFT models with a
    PiCa config. ``base_model_name_or_path`` and ``task_type`` default to what the
    model's config and class say.
    """
    layers, expert_layers, linear_names, expert_names, _ = _collect(model, adapter_name)
    merged = [name for name, m in model.named_modules()
              if (isinstance(m, PiCaLayer) or _is_experts_layer(m)) and m.merged]
    if merged:
        import warnings

        warnings.warn(
            f"{len(merged)} PiCa layer(s) are merged (e.g. {merged[0]!r}); the exported LoRA adapter is meant for the "
            f"unmerged base model, not for this model's merged weights",
            UserWarning,
            stacklevel=2,
        )
    return write_lora_adapter(
        path,
        layers,
        base_model_name_or_path=base_model_name_or_path or _base_model_name(model),
        task_type=task_type or _task_type(model),
        all_linear_names=linear_names,
        expert_layers=expert_layers,
        all_expert_names=expert_names,
    )
