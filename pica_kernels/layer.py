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

from . import reference
from .core import forward as core_forward
from .core import merge as core_merge
from .core import quant as core_quant
from .core.bank import PiCaBank
from .core.base import check_float_weight, is_fan_in_fan_out, is_supported_base, prepare_basis, weight_out_in
from .core.defaults import BASE_ADAPTER, DEFAULT_SVD_METHOD, check_adapter_name, default_m_dtype
from .svd import truncated_svd

__all__ = ["BASE_ADAPTER", "PiCaBank", "PiCaLinear", "grouped_forward", "is_fan_in_fan_out", "is_supported_base",
           "mixed_batch", "weight_out_in"]

@dataclass(frozen=True)
class AdapterSpec:
    """What one layer knows about one adapter: its side, rank and the bank key of its ``M``."""

    side: str
    rank: int
    group: str


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]):
    """Within the block, every PiCaLinear of ``model`` serves sequence i of the batch with ``adapter_names[i]``.

    For models whose forward cannot pass ``adapter_names`` down to the layers
    (any Hugging Face model). Inputs must be (batch, seq, in) with
    ``batch == len(adapter_names)``.
    """
    layers = [m for m in model.modules() if isinstance(m, PiCaLinear)]
    for layer in layers:
        layer._mixed_batch_names = list(adapter_names)
    try:
        yield model
    finally:
        for layer in layers:
            layer._mixed_batch_names = None


def basis_buffer_name(side: str, rank: int) -> str:
    return f"basis_{side}_r{rank}"


class PiCaLinear(nn.Module):
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
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.fan_in_fan_out = is_fan_in_fan_out(base_layer)
        #: quantized-base hook: the base's quantisation (core.quant.quant_info), None for a plain layer.
        self.quantization = core_quant.quant_info(base_layer)
        self.out_features, self.in_features = self.base_weight.shape
        if bank is None:
            self.pica_bank = PiCaBank()
            bank = self.pica_bank
        # Unregistered on purpose: a shared bank is registered once, by its owner.
        object.__setattr__(self, "_bank", bank)
        self.adapters: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.add_adapter(
            adapter_name, rank, side, group=group, basis=basis, m_dtype=m_dtype,
            svd_method=svd_method, svd_seed=svd_seed,
        )

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

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def merged_adapter(self) -> str | None:
        """The adapter merged last (None when nothing is merged)."""
        return self.merged_adapters[-1] if self.merged_adapters else None

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight as stored before any merge (Conv1D: (in, out); quantized base: dequantized (out, in))."""
        if self.quantization:  # quantized-base hook
            return core_quant.original_dequantized_weight(self, self.base_layer)
        return core_merge.original_weight(self, self.base_layer.weight)

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
        """Add an adapter (the first one added becomes active). Adapters of equal side and rank share the basis."""
        reference.check_side(side)
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        min_dim = min(self.out_features, self.in_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min_dim:
            raise ValueError(
                f"rank must be an int in [1, min(out, in)] = [1, {min_dim}] for this layer "
                f"(out={self.out_features}, in={self.in_features}), got rank={rank!r}"
            )
        weight = self.base_weight
        check_float_weight(weight)
        if basis is not None and not basis.is_floating_point():
            raise TypeError(f"basis must be a floating-point tensor, got dtype {basis.dtype}")
        if m_dtype is not None and not m_dtype.is_floating_point:
            raise TypeError(f"m_dtype must be a floating-point dtype, got {m_dtype}")
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
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise KeyError(f"unknown adapter {adapter_name!r}; this layer has {sorted(self.adapters)}")
        if self.merged and adapter_name not in self.merged_adapters:
            raise RuntimeError(
                f"adapters {self.merged_adapters} are merged; unmerge before switching to {adapter_name!r}"
            )
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from this layer (its basis too, when no other adapter uses it)."""
        if adapter_name not in self.adapters:
            raise KeyError(f"unknown adapter {adapter_name!r}; this layer has {sorted(self.adapters)}")
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge before deleting it")
        spec = self.adapters.pop(adapter_name)
        if not any((s.side, s.rank) == (spec.side, spec.rank) for s in self.adapters.values()):
            delattr(self, basis_buffer_name(spec.side, spec.rank))
        if self._bank is getattr(self, "pica_bank", None):
            self._bank.remove(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.adapters), None)

    # ---------------------------------------------------------------- forward
    def _tensors(self, name: str) -> core_forward.AdapterTensors:
        return self.basis(name), self.m(name), self.adapters[name].side

    def forward(self, x: torch.Tensor, *, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``x`` (..., in) -> (..., out) with the active adapter.

        ``adapter_names`` (or :func:`mixed_batch` around a whole model): one
        adapter name per sequence of ``x`` (batch, seq, in), ``BASE_ADAPTER``
        for the base model alone (see :func:`pica_kernels.core.forward.mixed_forward`).
        """
        names = adapter_names if adapter_names is not None else getattr(self, "_mixed_batch_names", None)
        if names is not None and not self.disabled:
            known = set(self.adapters) | set(self._bank.configs) | {BASE_ADAPTER}
            unknown = sorted({n for n in names if n not in known})
            if unknown:
                raise KeyError(f"unknown adapters {unknown}; the model has {sorted(known - {BASE_ADAPTER})}")
        active = [] if self.active_adapter is None else [self.active_adapter]
        return core_forward.layer_forward(self, x, active=active, names=names, on_layer=self.adapters,
                                          disabled=self.disabled)

    # ------------------------------------------------------------------ merge
    def delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        """``ΔW`` (out, in) of an adapter in float32 (float64 for a float64 base)."""
        name = adapter or self.active_adapter
        spec = self.adapters[name]
        return core_merge.delta_weight(self.basis(name), self.m(name), spec.side, self.base_weight.dtype)

    def merge(self, adapter: str | None = None, *, safe_merge: bool = False) -> None:
        """Add ``ΔW`` into the base weight, stacking on adapters merged before: ``round(W0 + Σ ΔW)`` in fp32.

        The original weight is kept (one extra copy of W per merged layer) so
        that :meth:`unmerge` restores it bit for bit.
        """
        name = adapter or self.active_adapter
        if name is None or name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; this layer has {sorted(self.adapters)}")
        core_merge.merge_layer(self, [name], self.delta_weight, safe_merge=safe_merge)
        self.active_adapter = name

    def unmerge(self) -> None:
        """Restore the exact original base weight (a no-op when nothing is merged)."""
        core_merge.unmerge_layer(self)

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
    from .ops import grouped_lowrank_linear

    fused = [
        i for i, layer in enumerate(layers)
        if not (layer.disabled or layer.merged or layer.active_adapter is None
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
