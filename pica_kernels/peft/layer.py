"""``PiCaPeftLinear``: the PEFT tuner layer of PiCa.

Follows PEFT's ``BaseTunerLayer`` contract: the original module stays as
``base_layer``; per-adapter state sits in containers keyed by adapter name
(``pica_basis``, ``pica_r``, ``pica_side``, ``pica_group``).

Where ``M`` lives: once, on the tuner (``PiCaPeftModel.pica_M[adapter][group]``),
like VeRA's shared projections. The layer keeps an *unregistered* reference to
that container and looks ``M`` up by (adapter, group) at every forward, so
``M`` appears once in ``parameters()`` / ``state_dict()`` and whatever replaces
the Parameter objects later (``.to()``, ``load_state_dict(assign=True)``, FSDP)
cannot leave a layer holding a stale copy. ``pica_M`` (listed in
``adapter_layer_names``) is a read-only view ``{adapter: this layer's M}`` built
on access: PEFT's generic ``set_adapter`` / ``set_requires_grad`` /
``enable_adapters`` / ``get_layer_status`` act on the shared Parameter objects
through it, while PEFT code that *assigns* into it (``delete_adapter``,
``_move_adapter_to_device_of_base_layer``) only touches the throw-away view;
the tuner and :meth:`PiCaPeftLinear._move_adapter_to_device_of_base_layer`
handle ``M`` themselves, in place, so sharing survives.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .. import reference
from ..layer import is_fan_in_fan_out, is_supported_base, weight_out_in


class BasisDict(BufferDict):
    """A ``BufferDict`` whose entries are persistent or not one by one.

    The basis of an adapter with ``store_bases=True`` is persistent (it is saved
    with the adapter); otherwise it is derived from ``W`` on load and kept out of
    ``state_dict()`` (so PEFT never reports it as a missing key). Re-assigning an
    existing key (PEFT's device/dtype moves do) keeps its persistence.
    """

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
        m_store: the tuner's ``nn.ModuleDict`` ``{adapter: ParameterDict{group: M}}``.
        adapter_name, r, side, group, basis: the first adapter (see :meth:`update_layer`).
    """

    adapter_layer_names = ("pica_M",)
    other_param_names = ("pica_basis", "pica_r", "pica_side", "pica_group")

    def __init__(
        self,
        base_layer: nn.Module,
        m_store: nn.ModuleDict,
        adapter_name: str,
        *,
        r: int,
        side: str,
        group: str,
        basis: torch.Tensor,
        store_basis: bool = False,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not is_supported_base(base_layer):
            raise TypeError(
                f"PiCa adapts nn.Linear and transformers Conv1D layers, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.pica_basis = BasisDict()
        self.pica_r: dict[str, int] = {}
        self.pica_side: dict[str, str] = {}
        self.pica_group: dict[str, str] = {}
        # Unregistered on purpose: the tuner registers M once.
        object.__setattr__(self, "_pica_store", m_store)
        self._disable_adapters = False
        self.merged_adapters = []
        self.fan_in_fan_out = is_fan_in_fan_out(base_layer)
        self.out_features, self.in_features = weight_out_in(base_layer).shape
        self.kwargs = kwargs
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, r=r, side=side, group=group, basis=basis, store_basis=store_basis,
            inference_mode=inference_mode,
        )

    # ------------------------------------------------------------- adapters
    @property
    def pica_M(self) -> nn.ParameterDict:
        """``{adapter: M}`` of this layer: the tuner's shared Parameter objects (a fresh view per access)."""
        view = nn.ParameterDict()
        for adapter, group in self.pica_group.items():
            params = self._pica_store[adapter] if adapter in self._pica_store else None
            if params is not None and group in params:
                view[adapter] = params[group]
        return view

    def get_m(self, adapter: str) -> nn.Parameter:
        return self._pica_store[adapter][self.pica_group[adapter]]

    def update_layer(
        self,
        adapter_name: str,
        *,
        r: int,
        side: str,
        group: str,
        basis: torch.Tensor,
        store_basis: bool = False,
        inference_mode: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``: its basis (r, in) / (out, r), side, rank and the key of its shared ``M``."""
        reference.check_side(side)
        expected = reference.basis_shape(self.out_features, self.in_features, r, side)
        if tuple(basis.shape) != expected:
            raise ValueError(f"basis must have shape {expected} for side={side!r}, r={r}, got {tuple(basis.shape)}")
        if adapter_name not in self._pica_store or group not in self._pica_store[adapter_name]:
            raise KeyError(f"the tuner holds no M for adapter {adapter_name!r}, group {group!r}")
        weight = self.get_base_layer().weight
        basis = basis.detach().to(device=weight.device, dtype=weight.dtype).contiguous()
        self.pica_basis.set(adapter_name, basis, persistent=store_basis)
        self.pica_r[adapter_name] = r
        self.pica_side[adapter_name] = side
        self.pica_group[adapter_name] = group
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the basis to the base layer's device and dtype; move ``M`` (shared) in place, device only."""
        weight = self.get_base_layer().weight
        device = device if device is not None else weight.device
        if adapter_name in self.pica_basis and self.pica_basis[adapter_name].device.type != "meta":
            self.pica_basis[adapter_name] = self.pica_basis[adapter_name].to(device, dtype=weight.dtype)
        if adapter_name in self.pica_group and adapter_name in self._pica_store:
            m = self.get_m(adapter_name)
            if m.device.type != "meta" and m.device != torch.device(device):
                with torch.no_grad():
                    m.data = m.data.to(device)

    # --------------------------------------------------------------- forward
    def _lowrank(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The adapter term ``(x @ B.T) @ A.T`` of ``adapter`` in ``x.dtype``: x (..., in) -> (..., out)."""
        a, b = reference.lowrank_factors(self.pica_basis[adapter], self.get_m(adapter), self.pica_side[adapter])
        return reference.lowrank_term(x, a, b)  # dM accumulated in fp32 when M's dtype differs from x's

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged:
                raise ValueError("Cannot pass `adapter_names` while adapters are merged; unmerge first")
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.pica_r]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = weight_out_in(base)
        if len(active) == 1 and not args and not kwargs and self.quantization_backend is None and x.dtype == weight.dtype:
            from ..ops import pica_linear  # late import: ops dispatches to the fused kernels where they exist

            a = active[0]
            return pica_linear(x, weight, base.bias, self.pica_basis[a], self.get_m(a), side=self.pica_side[a])
        result = self.base_layer(x, *args, **kwargs)
        for a in active:
            result = result + self._lowrank(x.to(result.dtype), a)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Per-sample adapters: ``adapter_names[i]`` ("__base__" for none) applies to ``x[i]``, x (B, ..., in).

        Samples whose adapters share one basis tensor (same side and rank, e.g. tasks
        trained from one base model) share the basis product: input side
        ``t = x @ P.T`` is computed once for all of them, then each task's rows get
        ``t @ M_task.T``; output side each task's rows get ``s = x @ M_task.T`` and
        one ``s @ U_r.T`` follows for all of them.
        """
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"got {len(adapter_names)} adapter_names for a batch of {x.shape[0]}")
        result = self.base_layer(x, *args, **kwargs)
        xs = x.to(result.dtype)
        by_basis: dict[tuple[int, str], list[str]] = {}
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or name not in self.pica_r:
                continue
            by_basis.setdefault((self.pica_basis[name].data_ptr(), self.pica_side[name]), []).append(name)
        for (_, side), names in by_basis.items():
            rows = [i for i, n in enumerate(adapter_names) if n in names]
            rows_t = torch.tensor(rows, device=x.device)
            basis = self.pica_basis[names[0]].to(xs.dtype)
            if side == "input":
                t = F.linear(xs[rows_t], basis)  # (R, ..., r): the basis product, once
                delta = torch.empty(*t.shape[:-1], self.out_features, dtype=xs.dtype, device=x.device)
                for name in names:
                    sub = torch.tensor([j for j, i in enumerate(rows) if adapter_names[i] == name], device=x.device)
                    delta[sub] = F.linear(t[sub], self.get_m(name).to(xs.dtype))
            else:
                s = torch.empty(len(rows), *xs.shape[1:-1], basis.shape[1], dtype=xs.dtype, device=x.device)
                for name in names:
                    sub = torch.tensor([j for j, i in enumerate(rows) if adapter_names[i] == name], device=x.device)
                    s[sub] = F.linear(xs[rows_t[sub]], self.get_m(name).to(xs.dtype))
                delta = F.linear(s, basis)  # (R, ..., out): the basis product, once
            result = result.index_add(0, rows_t, delta.to(result.dtype))
        return result

    # ----------------------------------------------------------------- merge
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW`` of ``adapter`` in the base weight's layout ((out, in), (in, out) for Conv1D), float32
        (float64 for a float64 base)."""
        d = reference.delta_weight(self.pica_basis[adapter], self.get_m(adapter), self.pica_side[adapter])
        if self.get_base_layer().weight.dtype == torch.float64:
            d = d.to(torch.float64)
        return d.T if self.fan_in_fan_out else d

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into the base weight: ``W + Σ ΔW`` computed in fp32 from the original ``W``, rounded once.

        The original weight is kept (non-persistent buffer ``pica_original_weight``,
        one copy of ``W`` per merged layer) so :meth:`unmerge` restores it bit for bit.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.pica_r]
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        original = self.pica_original_weight if self.merged else weight.detach().clone()
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        merged = original.to(acc)
        for a in [*self.merged_adapters, *adapter_names]:
            merged = merged + self.get_delta_weight(a).to(acc)
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter(s) {adapter_names} seem to be broken; nothing was merged"
            )
        if not self.merged:
            self.register_buffer("pica_original_weight", original, persistent=False)
        weight.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original base weight."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().weight.copy_(self.pica_original_weight)
        del self.pica_original_weight
        self.merged_adapters = []

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "pica." + super().__repr__()

    def extra_repr(self) -> str:
        specs = ", ".join(
            f"{a}: side={self.pica_side[a]}, r={self.pica_r[a]}, group={self.pica_group[a]}" for a in self.pica_r
        )
        return f"in={self.in_features}, out={self.out_features}, [{specs}]"
