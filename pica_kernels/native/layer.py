"""PiCaLinear: a frozen linear layer plus one or more PiCa adapters.

The module is deliberately thin: it holds the frozen base layer, one frozen
basis buffer per (side, rank) in use, and references to the trainable ``M``
of each adapter, and dispatches the math to :func:`pica_kernels.pica_linear`.

Where ``M`` lives: in a :class:`PiCaBank`. A standalone ``PiCaLinear`` owns a
bank (registered as ``pica_bank``); layers created by ``apply_pica`` share one
bank held once at model level (``model.pica_bank``) and keep only an
unregistered reference to it, so a shared ``M`` appears once in
``model.parameters()`` and ``model.state_dict()`` (PEFT's VeRA does the same
with its shared projections). Layers look ``M`` up by key at each forward
rather than caching the Parameter, so whatever replaces parameters later
(``.to()``, FSDP, ``load_state_dict(assign=True)``) cannot leave a layer
holding a stale copy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .. import reference
from ..core import forward as core_forward
from ..core import merge as core_merge
from ..core import quant as core_quant
from ..core import state as core_state
from ..core.bank import BankStateView, PiCaBank
from ..core.base import (
    LoraFactors,
    check_float_weight,
    is_fan_in_fan_out,
    is_supported_base,
    prepare_basis,
    weight_out_in,
)
from ..core.defaults import BASE_ADAPTER, DEFAULT_SVD_METHOD, check_adapter_name, default_m_dtype
from ..core.export import lora_factors
from ..svd import truncated_svd
from . import transitions

__all__ = ["PiCaLinear", "grouped_forward", "mixed_batch"]

@dataclass(frozen=True)
class AdapterSpec:
    """What one layer knows about one adapter: its side, rank and the bank key of its ``M``."""

    side: str
    rank: int
    group: str


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]):
    """Within the block, in this thread / asyncio task only, every PiCaLinear of ``model`` serves sequence i of
    the batch with ``adapter_names[i]``.

    For models whose forward cannot pass ``adapter_names`` down to the layers
    (any Hugging Face model). Inputs must be (batch, seq, in) with
    ``batch == len(adapter_names)``. The selection travels in a context
    variable, never on the shared layers: forwards of other threads or tasks
    keep their own selection (or the active adapter).
    """
    cells = state_cells(model)
    names = list(adapter_names)
    known = {BASE_ADAPTER}.union(*(c.value.adapters for c in cells)) if cells else {BASE_ADAPTER}
    unknown = sorted({n for n in names if n not in known})
    if unknown:
        raise KeyError(f"unknown adapters {unknown}; the model has {sorted(known - {BASE_ADAPTER})}")
    with core_state.request(cells, names=names):
        yield model


def state_cells(model: nn.Module) -> list[core_state.StateCell]:
    """The adapter-state cells of the PiCa layers of ``model`` (one for a model built by apply_pica or PEFT)."""
    cells: dict[int, core_state.StateCell] = {}
    for m in model.modules():
        # One getattr per module, not isinstance(m, core.base.PiCaLayer) (ten times slower on a runtime protocol):
        # this runs on every mixed_batch / disable_adapter request.
        cell = getattr(m, "pica_state_cell", None)
        if isinstance(cell, core_state.StateCell):  # PiCaLinear, or the PEFT front end's layer
            cells.setdefault(id(cell), cell)
        elif isinstance(m, PiCaBank):  # the model's bank: also where only fused experts are adapted
            cells.setdefault(id(m.cell), m.cell)
    return list(cells.values())


def _check_adapter_args(adapter_name: object, rank: object, side: object, m_dtype: object, out_features: int,
                        in_features: int) -> None:
    """The arguments of a PiCaLinear built or extended by hand (apply_pica passes values its config checked)."""
    reference.check_side(side)
    check_adapter_name(adapter_name)
    min_dim = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min_dim:
        raise ValueError(
            f"rank must be an int in [1, min(out, in)] = [1, {min_dim}] for this layer "
            f"(out={out_features}, in={in_features}), got rank={rank!r}"
        )
    if m_dtype is not None and not m_dtype.is_floating_point:
        raise TypeError(f"m_dtype must be a floating-point dtype, got {m_dtype}")


def basis_buffer_name(side: str, rank: int) -> str:
    return f"basis_{side}_r{rank}"


class PiCaLinear(BankStateView, nn.Module):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``) adapted with PiCa.

    ``y = base(x) + (x @ P.T) @ M.T`` (side="input", P = top-r right singular
    vectors of W, (r, in); M (out, r)) or ``y = base(x) + (x @ M.T) @ U_r.T``
    (side="output", U_r (out, r); M (r, in)). ``M`` is zero-initialised, so a
    fresh layer returns exactly the base output.

    Args:
        base_layer: the layer to adapt; its parameters are frozen.
        rank: basis rank r, 1 <= r <= min(out, in).
        side: "input" (default, the paper's setting) or "output".
        adapter_name: name of the first adapter.
        bank: a shared :class:`PiCaBank` (apply_pica passes the model's); by
            default the layer owns a private one.
        group: key of ``M`` in the bank; layers with the same key share ``M``.
        basis: a precomputed basis of the right shape (skips the SVD).
        m_dtype: dtype of ``M``; default float32 (also for half-precision bases,
            as PEFT keeps adapter weights), float64 for a float64 base.
        svd_method, svd_seed: forwarded to :func:`pica_kernels.truncated_svd`.

    Shapes: input (..., in) -> output (..., out), any leading dims.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        side: str = "input",
        *,
        adapter_name: str = "default",
        bank: PiCaBank | None = None,
        group: str = "m",
        basis: torch.Tensor | None = None,
        m_dtype: torch.dtype | None = None,
        svd_method: str = DEFAULT_SVD_METHOD,
        svd_seed: int = 0,
    ) -> None:
        super().__init__()
        if not is_supported_base(base_layer):
            raise TypeError(
                f"base_layer must be nn.Linear or transformers Conv1D, got {type(base_layer).__name__}"
            )
        weight = weight_out_in(base_layer)
        check_float_weight(weight)
        _check_adapter_args(adapter_name, rank, side, m_dtype, *weight.shape)
        self._build(base_layer, rank, side, adapter_name=adapter_name, bank=bank, group=group, basis=basis,
                    m_dtype=m_dtype, svd_method=svd_method, svd_seed=svd_seed)

    @classmethod
    def _checked(cls, base_layer: nn.Module, rank: int, side: str, **kwargs) -> PiCaLinear:
        """A layer built from values checked already (``apply_pica``'s config and per-layer plan), not re-checked."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._build(base_layer, rank, side, **kwargs)
        return layer

    def _build(self, base_layer: nn.Module, rank: int, side: str, *, adapter_name: str, bank: PiCaBank | None,
               group: str, basis: torch.Tensor | None, m_dtype: torch.dtype | None, svd_method: str,
               svd_seed: int) -> None:
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.fan_in_fan_out = is_fan_in_fan_out(base_layer)
        #: quantized-base hook: the base's quantisation (core.quant.quant_info), None for a plain layer.
        self.quantization = core_quant.quant_info(base_layer)
        self.out_features, self.in_features = self.base_weight.shape
        own = bank is None
        if own:
            self.pica_bank = PiCaBank()
            bank = self.pica_bank
        # Unregistered on purpose: a shared bank is registered once, by its owner.
        object.__setattr__(self, "_bank", bank)
        #: which adapters cover this layer (side, rank, group): structure, not state. The adapter state (active,
        #: merged, disabled) is the model's, read from the bank's cell (see pica_kernels.core.state).
        self.adapters: dict[str, AdapterSpec] = {}
        self._add_structure(
            adapter_name, rank, side, group=group, basis=basis, m_dtype=m_dtype,
            svd_method=svd_method, svd_seed=svd_seed,
        )
        state = bank.cell.value
        if adapter_name not in state.adapters:
            # A layer on its own (or on a bank a user shares between layers by hand): its first adapter is active.
            bank.cell.value = state.evolve(adapters=(*state.adapters, adapter_name),
                                           active=state.active or (adapter_name,))
        if own:
            core_state.install_forward_scope(self, bank.cell)

    # ----------------------------------------------------------------- access
    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in): the stored tensor, a transposed view of a Conv1D's, or the dequantized
        weight of a quantized base (computed on each access)."""
        return weight_out_in(self.base_layer)

    @property
    def bank(self) -> PiCaBank:
        return self._bank

    def basis(self, adapter: str | None = None) -> torch.Tensor:
        spec = self.adapters[adapter or self.active_adapter]
        return getattr(self, basis_buffer_name(spec.side, spec.rank))

    def m(self, adapter: str | None = None) -> nn.Parameter:
        name = adapter or self.active_adapter
        return self._bank.get(name, self.adapters[name].group)

    # ------------------------------------------------------------------ state (read from the model's cell)
    @property
    def active_adapter(self) -> str | None:
        """The model's active adapter where it covers this layer, else None (this layer gives its base output)."""
        active = self.state.active
        return active[0] if active and active[0] in self.adapters else None

    @property
    def disabled(self) -> bool:
        return self.state.disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        transitions.set_disabled(self._own_bank("disabled = ..."), self, bool(value))

    def _own_bank(self, what: str) -> PiCaBank:
        """The bank of a layer that is its own model (it owns its bank); a layer of a larger model shares the
        model's state and is changed through the model (pica_kernels.merge(model), ...)."""
        if getattr(self, "pica_bank", None) is not self._bank:
            raise core_state.AdapterStateError(
                f"PiCaLinear.{what} on a layer of a larger model: adapter state is the model's (one value for all "
                f"its layers); call the model-level function (pica_kernels.set_adapter / merge / unmerge / "
                f"delete_adapter / disable_adapter(model, ...)) instead")
        return self._bank

    @property
    def merged_adapter(self) -> str | None:
        """The adapter merged last (None when nothing is merged)."""
        return self.merged_adapters[-1] if self.merged_adapters else None

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight as stored before any merge (Conv1D: (in, out); quantized base: dequantized (out, in))."""
        return core_merge.original_layer_weight(self)

    # --------------------------------------------------------------- adapters
    def add_adapter(
        self,
        adapter_name: str,
        rank: int,
        side: str = "input",
        *,
        group: str = "m",
        basis: torch.Tensor | None = None,
        m_dtype: torch.dtype | None = None,
        svd_method: str = DEFAULT_SVD_METHOD,
        svd_seed: int = 0,
    ) -> None:
        """Add an inactive adapter to this layer on its own (a layer of a larger model: ``apply_pica(model, ...,
        adapter_name=...)``). Adapters of equal side and rank share the basis."""
        self._own_bank("add_adapter")
        _check_adapter_args(adapter_name, rank, side, m_dtype, self.out_features, self.in_features)
        with core_state.transaction(self._bank.cell, [self]) as txn:
            self._add_structure(adapter_name, rank, side, group=group, basis=basis, m_dtype=m_dtype,
                                svd_method=svd_method, svd_seed=svd_seed)
            before = txn.before
            txn.publish(before.evolve(adapters=(*before.adapters, adapter_name),
                                      active=before.active or (adapter_name,)))

    def _add_structure(self, adapter_name: str, rank: int, side: str, *, group: str, basis: torch.Tensor | None,
                       m_dtype: torch.dtype | None, svd_method: str, svd_seed: int) -> None:
        """This layer's part of a new adapter: its basis (shared by adapters of equal side and rank), its ``M`` in
        the bank, its spec. Called inside a transaction that also adds the adapter to the model's state, with checked
        values (:func:`_check_adapter_args`, or apply_pica's config and plan); a given basis is checked by
        :func:`~pica_kernels.core.base.prepare_basis`."""
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        weight = self.base_weight
        name = basis_buffer_name(side, rank)
        if basis is not None or not hasattr(self, name):
            if basis is None:
                basis, _ = truncated_svd(weight, rank, side, method=svd_method, seed=svd_seed)
            basis = prepare_basis(basis, self.out_features, self.in_features, rank, side, weight.device, weight.dtype)
            # Non-persistent: the basis is derived from W (or stored in the adapter
            # file), so model.state_dict() stays the base model's plus M.
            self.register_buffer(name, basis, persistent=False)
        shape = reference.m_shape(self.out_features, self.in_features, rank, side)
        self._bank.create(adapter_name, group, shape, m_dtype or default_m_dtype(weight.dtype), weight.device)
        self.adapters[adapter_name] = AdapterSpec(side=side, rank=rank, group=group)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` active (a layer on its own; see :func:`pica_kernels.set_adapter`)."""
        transitions.set_active(self._own_bank("set_adapter"), self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (a layer on its own; see :func:`pica_kernels.delete_adapter`)."""
        transitions.delete(self._own_bank("delete_adapter"), self, [self], adapter_name)

    def _remove_structure(self, adapter_name: str) -> None:
        """This layer's part of deleting an adapter: its spec, and its basis when no other adapter uses it."""
        spec = self.adapters.pop(adapter_name)
        if not any((s.side, s.rank) == (spec.side, spec.rank) for s in self.adapters.values()):
            delattr(self, basis_buffer_name(spec.side, spec.rank))

    # ---------------------------------------------------------------- forward
    def _tensors(self, name: str) -> core_forward.AdapterTensors:
        return self.basis(name), self.m(name), self.adapters[name].side

    def forward(self, x: torch.Tensor, *, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``x`` (..., in) -> (..., out) with the active adapter.

        ``adapter_names`` (or :func:`mixed_batch` around a whole model): one
        adapter name per sequence of ``x`` (batch, seq, in), ``BASE_ADAPTER``
        for the base model alone (see :func:`pica_kernels.core.forward.mixed_forward`).
        """
        cell = self._bank.cell
        token = cell.acquire_forward()  # no-op inside the model's forward, which holds it already
        try:
            state, names, disabled = core_state.forward_view(cell, adapter_names)
            if names is not None and not disabled:
                known = set(state.adapters) | {BASE_ADAPTER}
                unknown = sorted({n for n in names if n not in known})
                if unknown:
                    raise KeyError(f"unknown adapters {unknown}; the model has {sorted(state.adapters)}")
            active = [a for a in state.active[:1] if a in self.adapters]
            return core_forward.layer_forward(self, x, active=active, names=names, on_layer=self.adapters,
                                              disabled=disabled, merged=bool(state.merged_on(self.adapters)))
        finally:
            cell.release_forward(token)

    # ------------------------------------------------------------------ merge
    def delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        """``ΔW`` (out, in) of an adapter in float32 (float64 for a float64 base)."""
        name = adapter or self.active_adapter
        spec = self.adapters[name]
        return core_merge.delta_weight(self.basis(name), self.m(name), spec.side, self.base_weight.dtype)

    def merge(self, adapter: str | None = None, *, safe_merge: bool = False) -> None:
        """Add ``ΔW`` into the base weight, stacking on adapters merged before: ``round(W0 + Σ ΔW)`` in fp32.

        The original weight is kept (one extra copy of W per merged layer) so
        that :meth:`unmerge` restores it bit for bit. A layer on its own; a layer
        of a larger model is merged with :func:`pica_kernels.merge`.
        """
        transitions.merge(self._own_bank("merge"), self, [self], adapter, safe_merge)

    def unmerge(self) -> None:
        """Restore the exact original base weight (a no-op when nothing is merged)."""
        transitions.unmerge(self._own_bank("unmerge"), self, [self])

    def _set_stack(self, before: core_state.AdapterState, after: core_state.AdapterState, txn,
                   safe_merge: bool = False) -> None:
        """This layer's weight from the merged stack of ``before`` to that of ``after`` (inside a transaction)."""
        core_merge.set_stack(self, before.merged_on(self.adapters), after.merged_on(self.adapters),
                             self.delta_weight, txn=txn, safe_merge=safe_merge)

    def lora_factors(self, name: str, adapter: str | None = None) -> tuple[str, LoraFactors] | None:
        """``(adapter, its LoRA factors under module name name)`` for ``export_lora`` (:mod:`pica_kernels.core.export`);
        ``adapter`` defaults to the active one; None when this layer does not carry it."""
        adapter = adapter or self.active_adapter
        if adapter is None or adapter not in self.adapters:
            return None
        return adapter, lora_factors(name, self.basis(adapter), self.m(adapter), self.adapters[adapter].side,
                                     self.fan_in_fan_out)

    def extra_repr(self) -> str:
        specs = ", ".join(f"{n}: side={s.side}, r={s.rank}, group={s.group}" for n, s in self.adapters.items())
        return f"in={self.in_features}, out={self.out_features}, active={self.active_adapter!r}, [{specs}]"


def grouped_forward(x: torch.Tensor, layers: list[PiCaLinear], *, backend: str = "auto") -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` for layers that share their input (q/k/v, gate/up), one shrink launch.

    The low-rank shrinks of all layers run as one GEMM against their
    concatenated ``B`` factors (:func:`pica_kernels.ops.grouped_lowrank_linear`);
    each layer then runs its concatenated-K GEMM. Layers that are merged,
    disabled, without an active adapter, or have a trainable base weight run
    on their own. x: (..., in); returns one (..., out_i) per layer.
    """
    from ..ops import grouped_lowrank_linear

    fused = [
        i for i, layer in enumerate(layers)
        if not (layer.disabled or layer.merged or layer.active_adapter is None
                or core_state.current_selection(layer.bank.cell) is not None  # a request's own selection
                or layer.base_weight.requires_grad
                or (layer.base_layer.bias is not None and layer.base_layer.bias.requires_grad))
    ]
    outs: list[torch.Tensor | None] = [None] * len(layers)
    if len(fused) >= 2:
        a_list, b_list, ranks = [], [], []
        for i in fused:
            spec = layers[i].adapters[layers[i].active_adapter]
            a, b = reference.lowrank_factors(layers[i].basis(), layers[i].m(), spec.side)
            a_list.append(a)
            b_list.append(b)
            ranks.append(spec.rank)
        dtype = b_list[0].dtype
        for b in b_list[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        b_cat = torch.cat([b.to(dtype) for b in b_list])  # (sum r, in): frozen bases, or output-side M's
        ys = grouped_lowrank_linear(
            x, [layers[i].base_weight for i in fused], [layers[i].base_layer.bias for i in fused],
            a_list, b_cat, ranks, backend=backend,
        )
        for i, y in zip(fused, ys):
            outs[i] = y
    return [y if y is not None else layer(x) for y, layer in zip(outs, layers)]
