"""The native front end's model-level API: switch, disable, delete and merge adapters.

``apply_pica`` lives in :mod:`pica_kernels.apply`, ``PiCaConfig`` in
:mod:`pica_kernels.config`, ``parameter_report`` in :mod:`pica_kernels.report`;
they are re-exported here for existing imports.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .apply import BANK_NAME, apply_pica, find_targets, get_bank, pica_layers, set_submodule
from .config import PiCaConfig
from .core.bases import batched_bases
from .core.defaults import DEFAULT_TARGETS
from .core.targets import group_key, role_of
from .layer import PiCaLinear

__all__ = [
    "BANK_NAME", "DEFAULT_TARGETS", "PiCaConfig", "active_adapter", "apply_pica", "batched_bases", "delete_adapter",
    "disable_adapter", "find_targets", "get_bank", "group_key", "merge", "merge_and_unload", "parameter_report",
    "pica_layers", "role_of", "set_adapter", "unmerge",
]


# ------------------------------------------------------------ adapters API
def _layers_or_raise(model: nn.Module) -> list[PiCaLinear]:
    get_bank(model)
    return [m for _, m in pica_layers(model)]


def active_adapter(model: nn.Module) -> str | None:
    layers = _layers_or_raise(model)
    return layers[0].active_adapter if layers else None


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of every PiCa layer."""
    bank = get_bank(model)
    if adapter_name not in bank.configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; the model has {sorted(bank.configs)}")
    for layer in _layers_or_raise(model):
        if adapter_name in layer.adapters:
            layer.set_adapter(adapter_name)
        else:
            layer.unmerge()
            layer.active_adapter = None  # this layer is not adapted by adapter_name: base output


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Context in which the model computes exactly its base output (unmerging and re-merging if merged)."""
    layers = _layers_or_raise(model)
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            for name in merged[id(layer)]:
                layer.merge(name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; the active adapter falls back to a remaining one."""
    bank = get_bank(model)
    if adapter_name not in bank.configs:
        raise KeyError(f"unknown adapter {adapter_name!r}; the model has {sorted(bank.configs)}")
    for layer in _layers_or_raise(model):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
    bank.remove(adapter_name)
    del bank.configs[adapter_name]
    remaining = next(iter(bank.configs), None)
    if remaining is not None and active_adapter(model) is None:
        set_adapter(model, remaining)


# -------------------------------------------------------------------- merge
def merge(model: nn.Module, adapter_name: str | None = None, *, safe_merge: bool = False) -> nn.Module:
    """Add ``ΔW`` of the active (or named) adapter into every base weight; see :meth:`PiCaLinear.merge`.

    Merging another adapter afterwards stacks: the weights become ``round(W0 + ΔW_a + ΔW_b)``.
    """
    layers = _layers_or_raise(model)
    if safe_merge:
        # Check every layer before touching any, so a failure leaves the model unmerged.
        for layer in layers:
            name = adapter_name or layer.active_adapter
            if name in layer.adapters and name not in layer.merged_adapters:
                merged = layer.base_weight.to(torch.float32) + layer.delta_weight(name)
                if not bool(torch.isfinite(merged).all()):
                    raise ValueError(f"merging adapter {name!r} gives NaN or Inf in a weight; nothing was merged")
    for layer in layers:
        name = adapter_name or layer.active_adapter
        if name in layer.adapters:
            layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every base weight bit for bit."""
    for layer in _layers_or_raise(model):
        layer.unmerge()
    return model


def merge_and_unload(
    model: nn.Module, adapter_name: str | None = None, *, dequantize: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Merge, then replace every PiCaLinear by its (merged) base layer and drop the bank: a plain model.

    Quantized bases: by default the merged weights are re-quantized (lossy, warns). With ``dequantize=True`` every
    quantized layer becomes a plain ``nn.Linear`` (adapted ones holding ``dequant(W0) + ΔW``, rounded once from
    fp32) in ``dtype`` (default: the dtype the weights were quantized from), so the result is an exact merge.
    """
    if dequantize:
        from .core.quant import dequantize_model, unload_dequantized

        for name, layer in list(pica_layers(model)):
            if layer.quantization:
                set_submodule(model, name, unload_dequantized(layer, adapter_name or layer.active_adapter, dtype))
    merge(model, adapter_name)
    for name, layer in list(pica_layers(model)):
        set_submodule(model, name, layer.base_layer)
    delattr(model, BANK_NAME)
    if dequantize:
        dequantize_model(model, dtype)
    return model




def parameter_report(model: nn.Module, adapter_name: str | None = None):
    """Trainable M and frozen basis counts per group (works on the meta device); see :mod:`pica_kernels.report`."""
    from .report import parameter_report as _report

    return _report(model, adapter_name)
