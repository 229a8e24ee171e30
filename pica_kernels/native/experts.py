"""PiCaExperts: a transformers fused-experts module (Mixtral, Qwen2-MoE / Qwen3-MoE, OLMoE ...) adapted with PiCa.

The native front end's counterpart of :class:`~pica_kernels.native.layer.PiCaLinear` for 3-D expert weights; the
math, the layouts and the merge live in :mod:`pica_kernels.core.experts`. The experts module stays as
``base_layer`` (its parameters frozen; state_dict keys ``…experts.base_layer.gate_up_proj``); the layer holds one
frozen basis buffer per (role, side, rank), ``(E, r, in)`` / ``(E, out, r)``, and reads each adapter's ``M`` per
role from the model's bank, like a dense layer. The adapter state (active, merged, disabled) is the model's, read
from the bank's cell (:mod:`pica_kernels.core.state`).

Forward: with an active adapter, :func:`pica_kernels.core.experts.routed_forward` (each expert's routed tokens
through ``F.linear(x_e, W_e)`` plus the low-rank terms; ``ΔW`` is never formed); disabled, with no adapter covering
the module, or merged: the experts module's own forward (whichever experts implementation transformers dispatches
to), on the original weights when disabled while merged. A mixed batch (``mixed_batch`` / ``adapter_names``)
serves each sequence's tokens with its adapter: the MoE block hands the experts ``(batch * seq, hidden)`` in
sequence order, so token ``t`` belongs to sequence ``t // seq``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .. import reference
from ..core import experts as core_experts
from ..core import state as core_state
from ..core.bank import BankStateView, PiCaBank
from ..core.defaults import default_m_dtype
from ..core.experts import ExpertsLayout, ExpertTensors
from ..core.export import ExpertLoraFactors, experts_lora_factors
from .layer import AdapterSpec

__all__ = ["PiCaExperts", "experts_basis_buffer_name"]


def experts_basis_buffer_name(role: str, side: str, rank: int) -> str:
    return f"basis_{role}_{side}_r{rank}"


class PiCaExperts(BankStateView, nn.Module):
    """A fused experts module with PiCa adapters on some or all of its roles (gate_proj, up_proj, down_proj).

    Built by ``apply_pica`` (targets: the pseudo-layers ``<module>.<role>``, the parameter ``<module>.gate_up_proj``
    or the module; ``"all-linear"`` takes every role), never by hand: its adapters are the model's.

    Args:
        base_layer: the experts module (a checked layout, ``layout``); its parameters are frozen.
        layout: :func:`pica_kernels.core.experts.experts_layout` of it.
        bank: the model's :class:`PiCaBank`.

    Forward: ``(hidden_states (T, hidden), top_k_index (T, k), top_k_weights (T, k)) -> (T, hidden)``, the experts
    module's own signature.
    """

    def __init__(self, base_layer: nn.Module, layout: ExpertsLayout, bank: PiCaBank) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.layout = layout
        #: Read by code that handles both layer kinds (merge_and_unload, files): fused experts are never quantized
        #: and never (in, out).
        self.quantization = None
        self.fan_in_fan_out = False
        object.__setattr__(self, "_bank", bank)  # unregistered: the model registers its bank once
        #: ``{adapter: {role: AdapterSpec}}``: which roles each adapter covers (structure, not state).
        self.adapters: dict[str, dict[str, AdapterSpec]] = {}

    # ----------------------------------------------------------------- access
    @property
    def bank(self) -> PiCaBank:
        return self._bank

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    def original(self, param: str) -> torch.Tensor:
        """Fused parameter ``param`` (E, out_total, in) as stored before any merge."""
        return core_experts.weight_of(self.base_layer, param, self)

    def role_weight(self, role: str) -> torch.Tensor:
        """The original rows of ``role`` for every expert: a view (E, out, in)."""
        r = self.layout.role(role)
        return core_experts.role_weight(self.original(r.param), r)

    def basis(self, role: str, adapter: str) -> torch.Tensor:
        """The frozen basis of ``role`` under ``adapter``: (E, r, in) input side, (E, out, r) output side."""
        spec = self.adapters[adapter][role]
        return getattr(self, experts_basis_buffer_name(role, spec.side, spec.rank))

    def m(self, role: str, adapter: str) -> nn.Parameter:
        """``M`` of ``role`` under ``adapter``: (out, r) / (r, in) shared by the experts, or (E, out, r) /
        (E, r, in), one per expert."""
        return self._bank.get(adapter, self.adapters[adapter][role].group)

    def tensors(self, adapter: str) -> dict[str, ExpertTensors]:
        """``{role: (basis, M, side)}`` of the roles ``adapter`` covers here."""
        return {role: (self.basis(role, adapter), self.m(role, adapter), spec.side)
                for role, spec in self.adapters[adapter].items()}

    def pica_original_tensors(self) -> dict[str, torch.Tensor]:
        """``{state_dict key relative to this layer: tensor}`` of the fused parameters as before any merge (the
        base model's identity in adapter files, :func:`pica_kernels.core.files.base_tensors`)."""
        return {f"base_layer.{p}": self.original(p) for p in self.layout.params}

    def merged_ms(self) -> list[tuple[str, torch.Tensor]]:
        """``[(adapter, M), ...]`` of the merged adapters (the tripwire of a backward through merged weights)."""
        return [(a, self.m(role, a)) for a in self.merged_adapters for role in self.adapters[a]]

    def experts_lora_factors(self, name: str, adapter: str | None = None
                             ) -> tuple[str, list[ExpertLoraFactors]] | None:
        """``(adapter, the LoRA-for-parameters factors of its fused parameters under module name name)`` for
        ``export_lora`` (:func:`pica_kernels.core.export.experts_lora_factors`); ``adapter`` defaults to the active
        one; None when this layer does not carry it."""
        adapter = adapter or (self.state.active[0] if self.state.active else None)
        if adapter is None or adapter not in self.adapters:
            return None
        return adapter, experts_lora_factors(name, self.base_layer, self.layout, self.tensors(adapter))

    # --------------------------------------------------------------- adapters
    def _add_structure(self, adapter_name: str, specs: Mapping[str, AdapterSpec],
                       bases: Mapping[str, torch.Tensor | None], *, m_dtype: torch.dtype | None,
                       per_expert: bool) -> None:
        """This layer's part of a new adapter (inside the transaction that adds it to the model's state): per role,
        its basis (shared by adapters of equal side and rank; ``bases[role]`` (E, r, in) / (E, out, r) computed by
        the caller, or None to keep the one the layer holds) and its ``M`` in the bank."""
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        for role, spec in specs.items():
            r = self.layout.role(role)
            weight = self.role_weight(role)
            name = experts_basis_buffer_name(role, spec.side, spec.rank)
            basis = bases.get(role)
            if basis is not None or not hasattr(self, name):
                expected = (self.num_experts, *reference.basis_shape(r.out_features, r.in_features, spec.rank,
                                                                     spec.side))
                if basis is None or tuple(basis.shape) != expected:
                    got = None if basis is None else tuple(basis.shape)
                    raise ValueError(f"basis of expert role {role!r} must have shape {expected}, got {got}")
                basis = basis.detach().to(device=weight.device, dtype=weight.dtype)
                # Non-persistent, as a dense layer's: derived from the weights (or stored in the adapter file).
                self.register_buffer(name, basis.clone(memory_format=torch.contiguous_format), persistent=False)
            shape = core_experts.experts_m_shape(self.num_experts, r.out_features, r.in_features, spec.rank,
                                                 spec.side, per_expert)
            self._bank.create(adapter_name, spec.group, shape, m_dtype or default_m_dtype(weight.dtype),
                              weight.device)
        self.adapters[adapter_name] = dict(specs)

    def _remove_structure(self, adapter_name: str) -> None:
        """This layer's part of deleting an adapter: its specs, and each basis no other adapter uses."""
        specs = self.adapters.pop(adapter_name)
        used = {(role, s.side, s.rank) for other in self.adapters.values() for role, s in other.items()}
        for role, s in specs.items():
            if (role, s.side, s.rank) not in used:
                delattr(self, experts_basis_buffer_name(role, s.side, s.rank))

    # ---------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        cell = self._bank.cell
        token = cell.acquire_forward()  # no-op inside the model's forward, which holds it already
        try:
            state = cell.value
            sel = core_state.current_selection(cell)
            names = sel.names if sel is not None else None
            disabled = state.disabled or (sel is not None and sel.disabled)
            # One adapter applies at a time in the native front end (its state's first active one).
            return core_experts.layer_forward(
                self, self.base_layer, self.layout, hidden_states, top_k_index, top_k_weights,
                active=list(state.active[:1]), names=names, disabled=disabled,
                merged=bool(state.merged_on(self.adapters)), carried=self.adapters, tensors=self.tensors)
        finally:
            cell.release_forward(token)

    # ------------------------------------------------------------------ merge
    def role_deltas(self, adapter: str) -> dict[str, torch.Tensor]:
        """``{role: ΔW (E, out, in)}`` of ``adapter`` in float32 (float64 for a float64 base)."""
        dtype = self.original(self.layout.up_param).dtype
        return {role: core_experts.role_delta(basis, m, side, dtype) for role, (basis, m, side)
                in self.tensors(adapter).items()}

    def _set_stack(self, before: core_state.AdapterState, after: core_state.AdapterState, txn,
                   safe_merge: bool = False) -> None:
        """The fused weights from the merged stack of ``before`` to that of ``after`` (inside a transaction)."""
        core_experts.set_experts_stack(self, self.base_layer, self.layout, before.merged_on(self.adapters),
                                       after.merged_on(self.adapters), self.role_deltas, txn=txn,
                                       safe_merge=safe_merge)

    def extra_repr(self) -> str:
        specs = "; ".join(f"{a}: " + ", ".join(f"{role} side={s.side} r={s.rank} group={s.group}"
                                              for role, s in roles.items()) for a, roles in self.adapters.items())
        return f"experts={self.num_experts}, [{specs}]"
