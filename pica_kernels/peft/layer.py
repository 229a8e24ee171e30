"""``PiCaPeftLinear``: the PEFT tuner layer of PiCa, a thin wrapper over :mod:`pica_kernels.core`.

Follows PEFT's ``BaseTunerLayer`` contract: the original module stays as ``base_layer``; per-adapter state
sits in containers keyed by adapter name (``pica_M``, ``pica_basis``, ``pica_r``, ``pica_side``,
``pica_group``). ``M`` lives once, in the tuner's :class:`~pica_kernels.core.bank.PiCaBank`
(``base_model.pica_M``); ``pica_M`` here is this layer's persistent :class:`~pica_kernels.core.bank.LayerMView`
of it (not a Module, so ``M`` is never registered twice). Basis checks, forward, mixed batches, delta weight
and merges are the core's functions, the same ones the native :class:`pica_kernels.PiCaLinear` calls.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core import base as core_base
from ..core import forward as core_forward
from ..core import merge as core_merge
from ..core import quant as core_quant
from ..core import state as core_state
from ..core.bank import LayerMView, PiCaBank
from ..core.base import LoraFactors
from ..core.export import lora_factors
from .containers import BasisDict, CellStateMixin


class PiCaPeftLinear(CellStateMixin, nn.Module, BaseTunerLayer):
    """A frozen ``nn.Linear`` / transformers ``Conv1D`` / quantized base plus PiCa adapters (see module docstring).

    Args:
        base_layer: the layer to adapt (its parameters are frozen by the tuner).
        m_store: the tuner's :class:`PiCaBank` ``{adapter: ParameterDict{group: M}}``.
        adapter_name, r, side, group, basis: the first adapter (see :meth:`update_layer`).
    """

    adapter_layer_names = ("pica_M",)
    other_param_names = ("pica_basis", "pica_r", "pica_side", "pica_group")

    def __init__(self, base_layer: nn.Module, m_store: PiCaBank, adapter_name: str, *, r: int, side: str, group: str,
                 basis: torch.Tensor, store_basis: bool = False, inference_mode: bool = False, **kwargs: Any) -> None:
        super().__init__()
        if not core_base.is_supported_base(base_layer):
            raise TypeError(f"PiCa adapts nn.Linear and transformers Conv1D layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.pica_basis = BasisDict()
        self.pica_r: dict[str, int] = {}
        self.pica_side: dict[str, str] = {}
        self.pica_group: dict[str, str] = {}
        object.__setattr__(self, "_pica_store", m_store)  # unregistered: the tuner registers M once
        object.__setattr__(self, "pica_M", LayerMView(m_store, self.pica_group))  # plain attribute, not a submodule
        self.fan_in_fan_out = core_base.is_fan_in_fan_out(base_layer)
        self.quantization = core_quant.quant_info(base_layer)  # None for a plain layer
        w = core_base.weight_out_in(base_layer)
        self.out_features, self.in_features = w.shape
        self._weight_dtype = w.dtype  # the (dequantized) weight's dtype: bases and ΔW follow it, never uint8 storage
        self.kwargs = kwargs
        self.update_layer(adapter_name, r=r, side=side, group=group, basis=basis, store_basis=store_basis,
                          inference_mode=inference_mode)

    def get_m(self, adapter: str) -> nn.Parameter:
        return self._pica_store.get(adapter, self.pica_group[adapter])

    def update_layer(self, adapter_name: str, *, r: int, side: str, group: str, basis: torch.Tensor,
                     store_basis: bool = False, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name``: its basis (r, in) / (out, r), side, rank and the key of its shared ``M``."""
        basis = core_base.prepare_basis(basis, self.out_features, self.in_features, r, side,
                                        self.base_layer.weight.device, self._weight_dtype, share_owned=True)
        self._pica_store.get(adapter_name, group)  # KeyError naming both when the tuner holds no such M
        self.pica_basis.set(adapter_name, basis, persistent=store_basis)
        self.pica_r[adapter_name], self.pica_side[adapter_name], self.pica_group[adapter_name] = r, side, group
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the basis to the base layer's device and dtype; ``M`` (shared) in place, device only."""
        weight = self.base_layer.weight
        device = torch.device(device if device is not None else weight.device)
        if adapter_name in self.pica_basis and self.pica_basis[adapter_name].device.type != "meta":
            dtype = self._weight_dtype if self.quantization else weight.dtype
            self.pica_basis[adapter_name] = self.pica_basis[adapter_name].to(device, dtype=dtype)
        if adapter_name in self.pica_M and self.pica_M[adapter_name].device not in (device, torch.device("meta")):
            self.pica_M[adapter_name] = self.pica_M[adapter_name].data.to(device)

    def _tensors(self, adapter: str) -> core_forward.AdapterTensors:
        return self.pica_basis[adapter], self.get_m(adapter), self.pica_side[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self._forward_state(kwargs.pop("adapter_names", None)) as (state, names, disabled):
            return core_forward.layer_forward(self, x, *args, active=list(state.active), names=names,
                                              on_layer=self.pica_r, disabled=disabled,
                                              merged=bool(state.merged_on(self.pica_r)), **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` of ``adapter`` in the base weight's layout ((out, in); (in, out) for Conv1D), float32."""
        d = core_merge.delta_weight(*self._tensors(adapter), self._weight_dtype)
        return d.T if self.fan_in_fan_out else d

    def _delta(self, adapter: str) -> torch.Tensor:
        return core_merge.delta_weight(*self._tensors(adapter), self._weight_dtype)

    def _set_stack(self, before: core_state.AdapterState, after: core_state.AdapterState, txn,
                   safe_merge: bool = False) -> None:
        """This layer's weight from the merged stack of ``before`` to that of ``after`` (inside a transaction)."""
        core_merge.set_stack(self, before.merged_on(self.pica_r), after.merged_on(self.pica_r), self._delta,
                             txn=txn, safe_merge=safe_merge)

    def lora_factors(self, name: str, adapter: str | None = None) -> tuple[str, LoraFactors] | None:
        """``(adapter, its LoRA factors under module name name)`` for ``export_lora`` (:mod:`pica_kernels.core.export`);
        ``adapter`` defaults to the first active one; None when this layer does not carry it."""
        active = list(self.active_adapters)
        adapter = adapter or (active[0] if active else None)
        if adapter is None or adapter not in self.pica_r:
            return None
        return adapter, lora_factors(name, *self._tensors(adapter), self.fan_in_fan_out)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "pica." + super().__repr__()

    def extra_repr(self) -> str:
        specs = ", ".join(f"{a}: side={self.pica_side[a]}, r={self.pica_r[a]}, group={self.pica_group[a]}"
                          for a in self.pica_r)
        return f"in={self.in_features}, out={self.out_features}, [{specs}]"
