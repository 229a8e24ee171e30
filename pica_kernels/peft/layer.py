"""``PiCaPeftLinear``: the PEFT tuner layer of PiCa, a thin wrapper over :mod:`pica_kernels.core`.

Follows PEFT's ``BaseTunerLayer`` contract: the original module stays as
``base_layer``; per-adapter state sits in containers keyed by adapter name
(``pica_M``, ``pica_basis``, ``pica_r``, ``pica_side``, ``pica_group``).
``M`` lives once, in the tuner's :class:`~pica_kernels.core.bank.PiCaBank`
(``base_model.pica_M``); ``pica_M`` here is this layer's persistent
:class:`~pica_kernels.core.bank.LayerMView` of it (not a Module, so ``M`` is
never registered twice). Forward, mixed batches, delta weight and merges are
the core's functions, shared with the native :class:`pica_kernels.PiCaLinear`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .. import reference
from ..core import forward as core_forward
from ..core import merge as core_merge
from ..core import quant as core_quant
from ..core.bank import LayerMView, PiCaBank
from ..core.defaults import BASE_ADAPTER
from ..layer import is_fan_in_fan_out, is_supported_base, weight_out_in


class BasisDict(BufferDict):
    """A ``BufferDict`` whose entries are persistent (``store_bases=True``: saved with the adapter) or not (derived
    from ``W`` on load) one by one; re-assigning a key (PEFT's device/dtype moves) keeps its persistence."""

    def set(self, key: str, tensor: torch.Tensor, persistent: bool) -> None:
        self.register_buffer(key, tensor, persistent=persistent)

    def __setitem__(self, key, buffer):
        persistent = (key not in self._non_persistent_buffers_set) if key in self._buffers else self.persistent
        self.register_buffer(key, buffer, persistent=persistent)

    def __delitem__(self, key):
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)


def adapter_names_pre_forward_hook(module, args, kwargs, adapter_names):
    """Pre-forward hook (with_kwargs) that passes the per-sample `adapter_names` to a PiCa layer."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class PiCaPeftLinear(nn.Module, BaseTunerLayer):
    """A frozen ``nn.Linear`` / transformers ``Conv1D`` plus PiCa adapters (see module docstring).

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
        if not is_supported_base(base_layer):
            raise TypeError(f"PiCa adapts nn.Linear and transformers Conv1D layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.pica_basis = BasisDict()
        self.pica_r: dict[str, int] = {}
        self.pica_side: dict[str, str] = {}
        self.pica_group: dict[str, str] = {}
        object.__setattr__(self, "_pica_store", m_store)  # unregistered: the tuner registers M once
        object.__setattr__(self, "pica_M", LayerMView(m_store, self.pica_group))  # plain attribute, not a submodule
        self._disable_adapters = False
        self.merged_adapters = []
        self.fan_in_fan_out = is_fan_in_fan_out(base_layer)
        #: quantized-base hook: the base's quantisation (core.quant.quant_info), None for a plain layer.
        self.quantization = core_quant.quant_info(base_layer)
        w = weight_out_in(base_layer)
        self.out_features, self.in_features = w.shape
        self._weight_dtype = w.dtype  # the (dequantized) weight's dtype: bases and ΔW follow it, never uint8 storage
        self.kwargs = kwargs
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r=r, side=side, group=group, basis=basis, store_basis=store_basis,
                          inference_mode=inference_mode)

    def get_m(self, adapter: str) -> nn.Parameter:
        return self._pica_store[adapter][self.pica_group[adapter]]

    def update_layer(self, adapter_name: str, *, r: int, side: str, group: str, basis: torch.Tensor,
                     store_basis: bool = False, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name``: its basis (r, in) / (out, r), side, rank and the key of its shared ``M``."""
        expected = reference.basis_shape(self.out_features, self.in_features, r, side)
        if tuple(basis.shape) != expected:
            raise ValueError(f"basis must have shape {expected} for side={side!r}, r={r}, got {tuple(basis.shape)}")
        if not self._pica_store.has(adapter_name, group):
            raise KeyError(f"the tuner holds no M for adapter {adapter_name!r}, group {group!r}")
        weight = self.get_base_layer().weight
        self.pica_basis.set(adapter_name, basis.detach().to(device=weight.device, dtype=self._weight_dtype).contiguous(),
                            persistent=store_basis)
        self.pica_r[adapter_name] = r
        self.pica_side[adapter_name] = side
        self.pica_group[adapter_name] = group
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the basis to the base layer's device and dtype; ``M`` (shared) in place, device only."""
        weight = self.get_base_layer().weight
        device = device if device is not None else weight.device
        if adapter_name in self.pica_basis and self.pica_basis[adapter_name].device.type != "meta":
            dtype = self._weight_dtype if self.quantization else weight.dtype
            self.pica_basis[adapter_name] = self.pica_basis[adapter_name].to(device, dtype=dtype)
        if adapter_name in self.pica_M:
            m = self.pica_M[adapter_name]
            if m.device.type != "meta" and m.device != torch.device(device):
                self.pica_M[adapter_name] = m.data.to(device)

    # --------------------------------------------------------------- forward
    def _tensors(self, adapter: str) -> core_forward.AdapterTensors:
        return self.pica_basis[adapter], self.get_m(adapter), self.pica_side[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        # quantized-base hook: no weight for the fused ops, the base layer's own forward runs
        weight = None if self.quantization else weight_out_in(self.get_base_layer())
        if adapter_names is not None:
            if self.merged:
                raise ValueError("Cannot pass `adapter_names` while adapters are merged; unmerge first")
            names = [n if n in self.pica_r else BASE_ADAPTER for n in adapter_names]  # adapters not on this layer
            return core_forward.mixed_forward(self.base_layer, weight, x, names, self._tensors)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [self._tensors(a) for a in self.active_adapters if a in self.pica_r]
        return core_forward.adapter_forward(self.base_layer, weight, x, active)

    # ----------------------------------------------------------------- merge
    def _delta(self, adapter: str) -> torch.Tensor:
        basis, m, side = self._tensors(adapter)
        return core_merge.delta_weight(basis, m, side, self._weight_dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` of ``adapter`` in the base weight's layout ((out, in); (in, out) for Conv1D), float32."""
        d = self._delta(adapter)
        return d.T if self.fan_in_fan_out else d

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into the base weight, stacking: ``round(W0 + Σ ΔW)`` in fp32 (see core.merge)."""
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.pica_r]
        if self.quantization:  # quantized-base hook: re-quantize, lossy (warns)
            core_quant.merge_quantized(self, self.get_base_layer(), names, self._delta, safe_merge=safe_merge)
            return
        core_merge.merge_adapters(self, self.get_base_layer().weight, names, self._delta,
                                  fan_in_fan_out=self.fan_in_fan_out, safe_merge=safe_merge)

    def unmerge(self) -> None:
        """Restore the exact original base weight."""
        if self.quantization:  # quantized-base hook: the original storage objects back
            restored = core_quant.unmerge_quantized(self, self.get_base_layer())
        else:
            restored = core_merge.unmerge_adapters(self, self.get_base_layer().weight)
        if not restored:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "pica." + super().__repr__()

    def extra_repr(self) -> str:
        specs = ", ".join(f"{a}: side={self.pica_side[a]}, r={self.pica_r[a]}, group={self.pica_group[a]}"
                          for a in self.pica_r)
        return f"in={self.in_features}, out={self.out_features}, [{specs}]"
