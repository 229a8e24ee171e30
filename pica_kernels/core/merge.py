"""Delta weight and exact merge / unmerge, the one implementation both front ends call.

Merging adds ``ΔW`` of every merged adapter to the *original* weight in fp32
(fp64 for an fp64 base) and rounds once; merging a second adapter recomputes
``round(W0 + ΔW_a + ΔW_b)`` from ``W0`` (PEFT's stacking semantics). The
original weight is kept as a non-persistent buffer ``pica_original_weight``
(one copy of ``W`` per merged layer, in its dtype and device), so unmerge
restores ``W0`` bit for bit instead of subtracting in low precision.
"""

from __future__ import annotations

import copy
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
    return layer._buffers.get(ORIGINAL_WEIGHT, weight) if ORIGINAL_WEIGHT in layer._buffers else weight


def original_layer_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight of a PiCa layer (either front end) as stored before any merge (Conv1D: (in, out)); a quantized
    base's dequantized (out, in)."""
    if layer.quantization:  # quantized-base hook
        return quant.original_dequantized_weight(layer, layer.base_layer)
    return original_weight(layer, layer.base_layer.weight)


def weights_merged(layer: nn.Module) -> bool:
    """Whether ``layer``'s base weight holds merged adapters now (what the storage says, not the state)."""
    if layer.quantization:
        return getattr(layer, quant.SNAPSHOT, None) is not None
    return ORIGINAL_WEIGHT in layer._buffers


def _stacked(original: torch.Tensor, stack: list[str], delta: Callable[[str], torch.Tensor],
             fan_in_fan_out: bool) -> torch.Tensor:
    """``W0 + Σ ΔW`` of ``stack`` in the accumulation dtype, in the layout of ``original``."""
    acc = accumulation_dtype(original.dtype)
    merged = original.to(acc)
    for name in stack:
        d = delta(name).to(device=merged.device, dtype=acc)
        merged = merged + (d.T if fan_in_fan_out else d)
    return merged


@torch.no_grad()
def set_stack(layer: nn.Module, old: list[str], new: list[str], delta: Callable[[str], torch.Tensor], *,
              txn=None, safe_merge: bool = False) -> None:
    """Make ``layer.base_layer``'s weight ``round(W0 + Σ ΔW)`` over the merged stack ``new`` (``W0`` itself, bit for
    bit, when ``new`` is empty), the weight holding stack ``old`` now. Both front ends' layers.

    ``delta(name)`` gives ``ΔW`` (out, in). The stack is always recomputed from the original ``W0`` (kept as the
    non-persistent buffer ``pica_original_weight``; a quantized base keeps its original storage objects, see
    :func:`.quant.set_quantized_stack`) and rounded once. ``safe_merge``: a non-finite result raises ``ValueError``
    before the weight changes. ``txn``: the :class:`~pica_kernels.core.state.Transaction` that puts the values back
    on rollback (the buffer and storage objects themselves are restored by its snapshot).
    """
    if list(old) == list(new):
        return
    if layer.quantization:  # quantized-base hook
        quant.set_quantized_stack(layer, layer.base_layer, old, new, delta, txn=txn, safe_merge=safe_merge)
        return
    set_weight_stack(layer, ORIGINAL_WEIGHT, layer.base_layer.weight, old, new, delta,
                     fan_in_fan_out=layer.fan_in_fan_out, txn=txn, safe_merge=safe_merge)


@torch.no_grad()
def set_weight_stack(owner: nn.Module, buffer: str, weight: torch.Tensor, old: list[str], new: list[str],
                     delta: Callable[[str], torch.Tensor], *, fan_in_fan_out: bool = False, txn=None,
                     safe_merge: bool = False) -> None:
    """Make the plain tensor ``weight`` (any shape; a dense (out, in) weight or fused experts (E, out, in))
    ``round(W0 + Σ ΔW)`` over ``new``, holding the stack ``old`` now; ``W0`` is kept on ``owner`` as the
    non-persistent buffer ``buffer`` while anything is merged. ``delta(name)``: ``ΔW`` shaped like ``weight``
    (transposed for ``fan_in_fan_out``). See :func:`set_stack`."""
    if list(old) == list(new):
        return
    had = buffer in owner._buffers
    original = owner._buffers[buffer] if had else weight.detach().clone()
    if new:
        merged = _stacked(original, new, delta, fan_in_fan_out)
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError(f"merging adapter(s) {[n for n in new if n not in old]} gives NaN or Inf in the "
                             f"weight; nothing was merged")
    if txn is not None:
        if old:  # the weight holds round(W0 + Σ ΔW_old): the same computation gives the same bits back
            txn.on_rollback(lambda: weight.copy_(_stacked(original, old, delta, fan_in_fan_out).to(weight.dtype)))
        else:
            txn.on_rollback(lambda: weight.copy_(original))
    if new:
        if not had:
            owner.register_buffer(buffer, original, persistent=False)
        weight.copy_(merged.to(weight.dtype))
    else:
        weight.copy_(original)
        del owner._buffers[buffer]


def original_base(layer: nn.Module) -> nn.Module:
    """A module that computes what ``layer.base_layer`` computed before any merge: the base layer itself when
    nothing is merged, else a shallow proxy of it holding the original weight (or quantized storage), so its own
    forward runs unchanged and gives the unmerged output exactly, without touching the shared weights."""
    base = layer.base_layer
    if not weights_merged(layer):
        return base
    proxy = copy.copy(base)
    params = dict(base._parameters)
    if layer.quantization:
        storage = getattr(layer, quant.SNAPSHOT)
        params["weight"] = storage.weight
        if storage.extra:
            state = copy.copy(base.state)
            state.CB, state.SCB = storage.extra["CB"], storage.extra["SCB"]
            object.__setattr__(proxy, "state", state)
    else:
        params["weight"] = layer._buffers[ORIGINAL_WEIGHT]
    object.__setattr__(proxy, "_parameters", params)
    return proxy
