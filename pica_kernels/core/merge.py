"""Delta weight and exact merge / unmerge, the one implementation both front ends call.

Merging adds ``ΔW`` of every merged adapter to the *original* weight in fp32
(fp64 for an fp64 base) and rounds once; merging a second adapter recomputes
``round(W0 + ΔW_a + ΔW_b)`` from ``W0`` (PEFT's stacking semantics). The
original weight is kept as a non-persistent buffer ``pica_original_weight``
(one copy of ``W`` per merged layer, in its dtype and device), so unmerge
restores ``W0`` bit for bit instead of subtracting in low precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import reference
from . import quant

ORIGINAL_WEIGHT = "pica_original_weight"


def accumulation_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def delta_weight(basis: torch.Tensor, m: torch.Tensor, side: str, weight_dtype: torch.dtype) -> torch.Tensor:
    """``ΔW`` (out, in) of one adapter, float32 (float64 for a float64 base). basis (r, in) / (out, r)."""
    return reference.delta_weight(basis, m, side).to(accumulation_dtype(weight_dtype))


def original_weight(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The base weight as stored before any merge (``weight`` itself when nothing is merged)."""
    return getattr(layer, ORIGINAL_WEIGHT) if getattr(layer, "merged_adapters", None) else weight


@torch.no_grad()
def merge_adapters(
    layer: nn.Module,
    weight: nn.Parameter,
    names: list[str],
    delta: Callable[[str], torch.Tensor],
    *,
    fan_in_fan_out: bool = False,
    safe_merge: bool = False,
) -> list[str]:
    """Merge ``names`` (those not merged yet) into ``weight``, stacking on ``layer.merged_adapters``.

    ``delta(name)`` gives ``ΔW`` (out, in); ``weight`` is stored (out, in), or (in, out) with
    ``fan_in_fan_out``. Returns the adapters newly merged. With ``safe_merge`` a non-finite result
    raises ``ValueError`` and nothing changes.
    """
    new = [n for n in dict.fromkeys(names) if n not in layer.merged_adapters]
    if not new:
        return []
    original = getattr(layer, ORIGINAL_WEIGHT) if layer.merged_adapters else weight.detach().clone()
    acc = accumulation_dtype(weight.dtype)
    merged = original.to(acc)
    for name in [*layer.merged_adapters, *new]:
        d = delta(name).to(acc)
        merged = merged + (d.T if fan_in_fan_out else d)
    if safe_merge and not bool(torch.isfinite(merged).all()):
        raise ValueError(f"merging adapter(s) {new} gives NaN or Inf in the weight; nothing was merged")
    if not layer.merged_adapters:
        layer.register_buffer(ORIGINAL_WEIGHT, original, persistent=False)
    weight.copy_(merged.to(weight.dtype))
    layer.merged_adapters.extend(new)
    return new


@torch.no_grad()
def unmerge_adapters(layer: nn.Module, weight: nn.Parameter) -> bool:
    """Restore the original weight bit for bit; False when nothing was merged."""
    if not layer.merged_adapters:
        return False
    weight.copy_(getattr(layer, ORIGINAL_WEIGHT))
    delattr(layer, ORIGINAL_WEIGHT)
    layer.merged_adapters.clear()
    return True


def merge_layer(layer: nn.Module, names: list[str], delta: Callable[[str], torch.Tensor], *,
                safe_merge: bool = False) -> None:
    """Merge ``names`` into ``layer.base_layer`` (both front ends' layers): exact stacking merge of a plain or Conv1D
    weight, or a re-quantizing merge of a quantized base (lossy, warns: :func:`.quant.merge_quantized`)."""
    if layer.quantization:  # quantized-base hook
        quant.merge_quantized(layer, layer.base_layer, names, delta, safe_merge=safe_merge)
    else:
        merge_adapters(layer, layer.base_layer.weight, names, delta, fan_in_fan_out=layer.fan_in_fan_out,
                       safe_merge=safe_merge)


def unmerge_layer(layer: nn.Module) -> bool:
    """Restore ``layer.base_layer``'s original weight (the original quantized storage for a quantized base) bit for
    bit; False when nothing was merged."""
    if layer.quantization:  # quantized-base hook
        return quant.unmerge_quantized(layer, layer.base_layer)
    return unmerge_adapters(layer, layer.base_layer.weight)
