"""``PiCaPeftExperts``: the PEFT tuner layer of PiCa on fused mixture-of-experts weights (``target_parameters``).

transformers 5 stores the experts of Mixtral, Qwen2-MoE / Qwen3-MoE and OLMoE as 3-D parameters of one experts
module (``gate_up_proj`` (E, 2*ffn, hidden), ``down_proj`` (E, hidden, ffn)). This layer wraps that module
(``base_layer``, PEFT's contract) and adapts the roles the config's ``target_parameters`` select: ``gate_proj`` and
``up_proj`` (the halves of ``gate_up_proj``) and ``down_proj``. The math is :mod:`pica_kernels.core.experts`, the
same functions the native front end's experts layer calls: per role a frozen basis per expert, (E, r, in) input
side / (E, out, r) output side, and ``M`` from the tuner's bank, shared by the experts (``share_experts=False``:
one per expert, (E, out, r) / (E, r, in)) and by the layers of the role (``share_m``).

Per-adapter state sits in containers keyed by adapter name, as PEFT expects: ``pica_basis`` (a ``ModuleDict`` of
:class:`~pica_kernels.peft.containers.BasisDict` ``{role: basis}``), ``pica_r`` ``{adapter: {role: rank}}``,
``pica_side`` ``{adapter: side}``, ``pica_group`` ``{adapter: {role: group key}}`` and ``pica_M``, a view
``{adapter: ParameterDict{role: M}}`` onto the bank (never a registered submodule: ``M`` lives once).

Forward (the experts module's signature ``(hidden_states (T, hidden), top_k_index (T, k), top_k_weights (T, k))``):
an active adapter runs :func:`pica_kernels.core.experts.routed_forward` (each expert's routed tokens through
``F.linear(x_e, W_e)`` plus ``(x_e @ B_e.T) @ A_e.T``; ``ΔW`` is never formed); disabled, merged or no adapter here:
the experts module's own forward (on the original weights when disabled while merged). A mixed batch
(``adapter_names=``) serves each sequence's tokens with its adapter (the MoE block hands the experts
``(batch * seq, hidden)`` in sequence order).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core import experts as core_experts
from ..core import state as core_state
from ..core.bank import AdapterView, PiCaBank
from ..core.experts import ExpertsLayout, ExpertTensors
from ..core.export import ExpertLoraFactors, experts_lora_factors
from .containers import BasisDict, CellStateMixin

__all__ = ["ExpertsMView", "PiCaPeftExperts"]


class ExpertsMView(AdapterView, nn.ModuleDict):
    """An experts layer's persistent ``{adapter: ParameterDict{role: M}}`` view onto the bank.

    A ``ModuleDict`` to code that inspects it (PEFT's ``get_layer_status``, ``set_requires_grad``), storing nothing:
    every access builds ``ParameterDict{role: M}`` of the bank's own Parameters through the layer's
    ``{adapter: {role: group key}}`` (``groups``), so ``M`` is registered once, by the bank (as
    :class:`~pica_kernels.core.bank.LayerMView` for a dense layer). Deleting an adapter forgets the layer's links.
    """

    def __init__(self, bank: PiCaBank, groups: dict[str, dict[str, str]]) -> None:
        super().__init__()
        object.__setattr__(self, "_bank", bank)
        object.__setattr__(self, "_groups", groups)

    def __getitem__(self, adapter: str) -> nn.ParameterDict:
        if adapter not in self:
            raise KeyError(adapter)
        return nn.ParameterDict({role: self._bank.get(adapter, g) for role, g in self._groups[adapter].items()})

    def __setitem__(self, adapter: str, value) -> None:
        current = self[adapter]
        with torch.no_grad():
            for role, m in value.items():
                current[role].data = m.data

    def __contains__(self, adapter: object) -> bool:
        return adapter in self._groups and all(self._bank.has(adapter, g) for g in self._groups[adapter].values())

    def extra_repr(self) -> str:
        return ", ".join(f"{a}: {{{', '.join(f'{r}: {tuple(m.shape)}' for r, m in self[a].items())}}}" for a in self)


class PiCaPeftExperts(CellStateMixin, nn.Module, BaseTunerLayer):
    """A frozen transformers experts module plus PiCa adapters on its roles (see the module docstring).

    Args:
        base_layer: the experts module, of layout ``layout`` (:func:`pica_kernels.core.experts.experts_layout`).
        m_store: the tuner's :class:`PiCaBank`.
        adapter_name, roles, side: the first adapter (see :meth:`update_layer`).
    """

    adapter_layer_names = ("pica_M",)
    other_param_names = ("pica_basis", "pica_r", "pica_side", "pica_group")

    def __init__(self, base_layer: nn.Module, m_store: PiCaBank, layout: ExpertsLayout, adapter_name: str, *,
                 roles: Mapping[str, tuple[int, str, torch.Tensor]], side: str, store_basis: bool = False,
                 inference_mode: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.pica_basis = nn.ModuleDict()
        self.pica_r: dict[str, dict[str, int]] = {}
        self.pica_side: dict[str, str] = {}
        self.pica_group: dict[str, dict[str, str]] = {}
        object.__setattr__(self, "_pica_store", m_store)  # unregistered: the tuner registers M once
        object.__setattr__(self, "pica_M", ExpertsMView(m_store, self.pica_group))  # plain attribute
        # Read by code serving every PiCa layer: fused experts are never quantized, never stored (in, out).
        self.quantization = None
        self.fan_in_fan_out = False
        self.update_layer(adapter_name, roles=roles, side=side, store_basis=store_basis,
                          inference_mode=inference_mode)

    # ------------------------------------------------------------ access
    def original(self, param: str) -> torch.Tensor:
        """Fused parameter ``param`` (E, out_total, in) as stored before any merge."""
        return core_experts.weight_of(self.base_layer, param, self)

    def get_m(self, adapter: str, role: str) -> nn.Parameter:
        return self._pica_store.get(adapter, self.pica_group[adapter][role])

    def tensors(self, adapter: str) -> dict[str, ExpertTensors]:
        """``{role: (basis, M, side)}`` of the roles ``adapter`` covers here."""
        side = self.pica_side[adapter]
        return {role: (self.pica_basis[adapter][role], self.get_m(adapter, role), side) for role in self.pica_r[adapter]}

    def pica_original_tensors(self) -> dict[str, torch.Tensor]:
        """``{state_dict key relative to this layer: tensor}`` of the fused parameters as before any merge (the base
        model's identity in adapter files, :func:`pica_kernels.core.files.base_tensors`)."""
        return {f"base_layer.{p}": self.original(p) for p in self.layout.params}

    def merged_ms(self) -> list[tuple[str, torch.Tensor]]:
        """``[(adapter, M), ...]`` of the merged adapters (the tripwire of a backward through merged weights)."""
        return [(a, self.get_m(a, role)) for a in self.merged_adapters for role in self.pica_r[a]]

    # ------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, *, roles: Mapping[str, tuple[int, str, torch.Tensor]], side: str,
                     store_basis: bool = False, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name``: per role ``(rank, group key of its M, basis (E, r, in) / (E, out, r))``."""
        bases = BasisDict()
        for role, (_r, group, basis) in roles.items():
            weight = core_experts.role_weight(self.original(self.layout.role(role).param), self.layout.role(role))
            self._pica_store.get(adapter_name, group)  # KeyError naming both when the tuner holds no such M
            bases.set(role, basis.detach().to(device=weight.device, dtype=weight.dtype).contiguous(),
                      persistent=store_basis)
        self.pica_basis[adapter_name] = bases
        self.pica_r[adapter_name] = {role: r for role, (r, _, _) in roles.items()}
        self.pica_group[adapter_name] = {role: g for role, (_, g, _) in roles.items()}
        self.pica_side[adapter_name] = side
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Bases to the fused weights' device and dtype; ``M`` (shared) in place, device only."""
        weight = getattr(self.base_layer, self.layout.up_param)
        device = torch.device(device if device is not None else weight.device)
        if adapter_name in self.pica_basis:
            bases = self.pica_basis[adapter_name]
            for role in list(bases.keys()):
                if bases[role].device.type != "meta":
                    bases[role] = bases[role].to(device, dtype=weight.dtype)
        if adapter_name in self.pica_M:
            for m in self.pica_M[adapter_name].values():
                if m.device not in (device, torch.device("meta")):
                    m.data = m.data.to(device)

    # ------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                **kwargs) -> torch.Tensor:
        with self._forward_state(kwargs.pop("adapter_names", None)) as (state, names, disabled):
            return core_experts.layer_forward(
                self, self.base_layer, self.layout, hidden_states, top_k_index, top_k_weights,
                active=list(state.active), names=names, disabled=disabled,
                merged=bool(state.merged_on(self.pica_r)), carried=self.pica_r, tensors=self.tensors)

    # ------------------------------------------------------------ merge
    def role_deltas(self, adapter: str) -> dict[str, torch.Tensor]:
        """``{role: ΔW (E, out, in)}`` of ``adapter`` in float32 (float64 for a float64 base)."""
        dtype = self.original(self.layout.up_param).dtype
        return {role: core_experts.role_delta(basis, m, side, dtype)
                for role, (basis, m, side) in self.tensors(adapter).items()}

    def _set_stack(self, before: core_state.AdapterState, after: core_state.AdapterState, txn,
                   safe_merge: bool = False) -> None:
        """The fused weights from the merged stack of ``before`` to that of ``after`` (inside a transaction)."""
        core_experts.set_experts_stack(self, self.base_layer, self.layout, before.merged_on(self.pica_r),
                                       after.merged_on(self.pica_r), self.role_deltas, txn=txn,
                                       safe_merge=safe_merge)

    # ------------------------------------------------------------ export
    def experts_lora_factors(self, name: str, adapter: str | None = None
                             ) -> tuple[str, list[ExpertLoraFactors]] | None:
        """``(adapter, the LoRA-for-parameters factors of its fused parameters under module name name)`` for
        ``export_lora``; ``adapter`` defaults to the first active one; None when this layer does not carry it."""
        active = list(self.active_adapters)
        adapter = adapter or (active[0] if active else None)
        if adapter is None or adapter not in self.pica_r:
            return None
        return adapter, experts_lora_factors(name, self.base_layer, self.layout, self.tensors(adapter))

    def __repr__(self) -> str:
        return "pica." + super().__repr__()

    def extra_repr(self) -> str:
        specs = "; ".join(f"{a}: side={self.pica_side[a]}, " + ", ".join(
            f"{role} r={r} group={self.pica_group[a][role]}" for role, r in roles.items())
            for a, roles in self.pica_r.items())
        return f"experts={self.layout.num_experts}, [{specs}]"
