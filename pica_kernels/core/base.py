"""The frozen base layer an adapter sits on, as both front ends see it.

Which layers can be adapted (``nn.Linear``, transformers ``Conv1D`` whose weight is stored (in, out), and the
quantized bases of :mod:`.quant`), their weight as (out, in), and the one place a given basis is validated and
stored for a layer (:func:`prepare_basis`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from .. import reference
from . import quant

if TYPE_CHECKING:
    from .state import StateCell

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


try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # transformers is optional for the core layer
    _HFConv1D = None


@runtime_checkable
class PiCaLayer(Protocol):
    """A PiCa layer of either front end (``PiCaLinear``, ``PiCaPeftLinear``), as code that serves both reads it: the
    LoRA export, the base model's identity in adapter files, the adapter-state cells. Only cheap members, so that
    ``isinstance(module, PiCaLayer)`` computes nothing."""

    base_layer: nn.Module
    fan_in_fan_out: bool
    #: the quantisation of the base (:func:`pica_kernels.core.quant.quant_info`), None for a plain layer
    quantization: dict | None

    @property
    def pica_state_cell(self) -> StateCell:
        """The cell holding the model's adapter state."""

    def lora_factors(self, name: str, adapter: str | None = None) -> tuple[str, LoraFactors] | None:
        """``(adapter, its LoRA factors under module name name)``; ``adapter`` defaults to the layer's first active
        adapter; None when the layer does not carry it."""


def is_supported_base(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or (_HFConv1D is not None and isinstance(module, _HFConv1D))
            or quant.is_quantized_base(module))  # quantized-base hook (bitsandbytes, torchao)


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """True for transformers Conv1D, whose weight is stored as (in, out)."""
    return _HFConv1D is not None and isinstance(module, _HFConv1D)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a supported layer as (out, in): the tensor itself, a transposed view (Conv1D), or the
    dequantized weight of a quantized base (a new tensor)."""
    if quant.is_quantized_base(module):  # quantized-base hook
        return quant.dequantized_weight(module)
    return module.weight.T if is_fan_in_fan_out(module) else module.weight


def check_float_weight(weight: torch.Tensor, where: str = "base_layer.weight") -> None:
    """Where a front end takes a layer (its targets, a ``PiCaLinear`` built by hand): the (dequantized) weight, which
    the SVD reads and ``M`` takes its device from, is floating point."""
    if not weight.is_floating_point():
        raise TypeError(
            f"{where} has dtype {weight.dtype}; PiCa needs a floating-point weight (dequantize the layer, wrap it as "
            f"a supported quantized base, or exclude it)"
        )


def prepare_basis(basis: torch.Tensor, out_features: int, in_features: int, rank: int, side: str,
                  device: torch.device, dtype: torch.dtype, *, share_owned: bool = False) -> torch.Tensor:
    """``basis`` checked (floating point, (r, in) input side / (out, r) output side) and stored for a layer whose
    (dequantized) weight is on ``device`` in ``dtype``: detached, moved there, owning its storage (a row slice
    ``V[:r]`` or one item of a batched SVD result is a view that would keep the whole parent alive).
    ``share_owned``: a basis that already owns its whole storage there (another adapter's) is kept, not copied,
    so adapters of equal side and rank share it (one multi-task launch serves them in a mixed batch)."""
    if not basis.is_floating_point():
        raise TypeError(f"basis must be a floating-point tensor, got dtype {basis.dtype}")
    expected = reference.basis_shape(out_features, in_features, rank, side)
    if tuple(basis.shape) != expected:
        raise ValueError(f"basis must have shape {expected} for side={side!r}, r={rank}, got {tuple(basis.shape)}")
    basis = basis.detach().to(device=device, dtype=dtype)
    owned = (basis.is_contiguous() and basis.storage_offset() == 0
             and basis.untyped_storage().nbytes() == basis.numel() * basis.element_size())
    return basis if share_owned and owned else basis.clone(memory_format=torch.contiguous_format)
