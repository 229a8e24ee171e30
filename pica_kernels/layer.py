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
from .svd import truncated_svd

try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # transformers is optional for the core layer
    _HFConv1D = None


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (_HFConv1D is not None and isinstance(module, _HFConv1D))


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """True for transformers Conv1D, whose weight is stored as (in, out)."""
    return _HFConv1D is not None and isinstance(module, _HFConv1D)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a supported layer as (out, in): the tensor itself, or a transposed view (Conv1D)."""
    return module.weight.T if is_fan_in_fan_out(module) else module.weight


class PiCaBank(nn.Module):
    """The trainable ``M`` matrices, ``adapters[adapter_name][group_key]``.

    Group keys are ParameterDict keys, so they contain no ".". One bank may be
    referenced by many layers; only its owner registers it as a submodule.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        # Adapter name -> PiCaConfig, filled by apply_pica (plain attribute: not state).
        self.configs: dict = {}

    def has(self, adapter: str, group: str) -> bool:
        return adapter in self.adapters and group in self.adapters[adapter]

    def get(self, adapter: str, group: str) -> nn.Parameter:
        try:
            return self.adapters[adapter][group]
        except KeyError:
            raise KeyError(f"no M for adapter {adapter!r}, group {group!r} in the PiCa bank") from None

    def create(
        self, adapter: str, group: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> nn.Parameter:
        """Zero-initialised ``M`` (PiCa starts at exactly the base model); returns the existing one if present."""
        if adapter not in self.adapters:
            self.adapters[adapter] = nn.ParameterDict()
        params = self.adapters[adapter]
        if group in params:
            existing = params[group]
            if tuple(existing.shape) != tuple(shape):
                raise ValueError(
                    f"group {group!r} of adapter {adapter!r} already has M of shape {tuple(existing.shape)}, "
                    f"a layer asked for {tuple(shape)}"
                )
            return existing
        params[group] = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        return params[group]

    def remove(self, adapter: str) -> None:
        if adapter in self.adapters:
            del self.adapters[adapter]

    def groups(self, adapter: str) -> dict[str, nn.Parameter]:
        return dict(self.adapters[adapter].items()) if adapter in self.adapters else {}


@dataclass(frozen=True)
class AdapterSpec:
    """What one layer knows about one adapter: its side, rank and the bank key of its ``M``."""

    side: str
    rank: int
    group: str


#: In ``adapter_names``: this sequence uses the base model, no adapter.
BASE_ADAPTER = "__base__"


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
        svd_method: str = "accurate",
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
        self.out_features, self.in_features = self.base_weight.shape
        if bank is None:
            self.pica_bank = PiCaBank()
            bank = self.pica_bank
        # Unregistered on purpose: a shared bank is registered once, by its owner.
        object.__setattr__(self, "_bank", bank)
        self.adapters: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self.add_adapter(
            adapter_name, rank, side, group=group, basis=basis, m_dtype=m_dtype,
            svd_method=svd_method, svd_seed=svd_seed,
        )

    # ----------------------------------------------------------------- access
    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in): the stored tensor, or a transposed view of a Conv1D's."""
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
        return self.merged_adapter is not None

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
        svd_method: str = "accurate",
        svd_seed: int = 0,
    ) -> None:
        """Add an adapter (the first one added becomes active). Adapters of equal side and rank share the basis."""
        reference.check_side(side)
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        min_dim = min(self.out_features, self.in_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min_dim:
            raise ValueError(
                f"rank must be an int in [1, min(out, in)] = [1, {min_dim}] for this layer "
                f"(out={self.out_features}, in={self.in_features}), got rank={rank!r}"
            )
        weight = self.base_weight
        name = basis_buffer_name(side, rank)
        if basis is not None or not hasattr(self, name):
            if basis is None:
                basis, _ = truncated_svd(weight, rank, side, method=svd_method, seed=svd_seed)
            expected = reference.basis_shape(self.out_features, self.in_features, rank, side)
            if tuple(basis.shape) != expected:
                raise ValueError(f"basis must have shape {expected} for side={side!r}, got {tuple(basis.shape)}")
            basis = basis.detach().to(device=weight.device, dtype=weight.dtype)
            # Own the storage: a row slice (V[:r]) or one item of a batched SVD
            # result is a contiguous view that would keep the whole parent alive.
            basis = basis.clone(memory_format=torch.contiguous_format)
            # Non-persistent: the basis is derived from W (or stored in the adapter
            # file), so model.state_dict() stays the base model's plus M.
            self.register_buffer(name, basis, persistent=False)
        shape = reference.m_shape(self.out_features, self.in_features, rank, side)
        if m_dtype is None:
            m_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self._bank.create(adapter_name, group, shape, m_dtype, weight.device)
        self.adapters[adapter_name] = AdapterSpec(side=side, rank=rank, group=group)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise KeyError(f"unknown adapter {adapter_name!r}; this layer has {sorted(self.adapters)}")
        if self.merged and self.merged_adapter != adapter_name:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged; unmerge before switching to {adapter_name!r}"
            )
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from this layer (its basis too, when no other adapter uses it)."""
        if adapter_name not in self.adapters:
            raise KeyError(f"unknown adapter {adapter_name!r}; this layer has {sorted(self.adapters)}")
        if self.merged_adapter == adapter_name:
            self.unmerge()
        spec = self.adapters.pop(adapter_name)
        if not any((s.side, s.rank) == (spec.side, spec.rank) for s in self.adapters.values()):
            delattr(self, basis_buffer_name(spec.side, spec.rank))
        if self._bank is getattr(self, "pica_bank", None):
            self._bank.remove(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.adapters), None)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``x`` (..., in) -> (..., out) with the active adapter.

        ``adapter_names`` (or :func:`mixed_batch` around a whole model): one
        adapter name per sequence of ``x`` (batch, seq, in), ``BASE_ADAPTER``
        for the base model alone. Input-side adapters of equal rank share the
        basis, so such a batch runs as one multi-task launch
        (:func:`pica_kernels.ops.multitask_pica_linear`); other mixes run
        sequence by sequence.
        """
        names = adapter_names if adapter_names is not None else getattr(self, "_mixed_batch_names", None)
        if names is not None and not self.disabled and not self.merged:
            return self._forward_mixed(x, list(names))
        if self.disabled or self.active_adapter is None:
            if self.merged:
                # Like PEFT: a disabled adapter must give the base output exactly.
                self.unmerge()
            return self.base_layer(x)
        if self.merged:
            return self.base_layer(x)
        from .ops import pica_linear  # late import: ops dispatches to kernels or the reference

        spec = self.adapters[self.active_adapter]
        return pica_linear(
            x, self.base_weight, self.base_layer.bias, self.basis(), self.m(), side=spec.side
        )

    def _forward_mixed(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        from .ops import multitask_pica_linear, pica_linear

        if x.dim() != 3 or x.shape[0] != len(names):
            raise ValueError(f"adapter_names needs x of shape (batch={len(names)}, seq, in), got {tuple(x.shape)}")
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.adapters})
        if unknown:
            raise KeyError(f"unknown adapters {unknown}; this layer has {sorted(self.adapters)}")
        used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
        specs = {(self.adapters[n].side, self.adapters[n].rank) for n in used}
        if len(specs) == 1 and next(iter(specs))[0] == "input":
            # One basis for all: stack the M's (a few (out, r) copies), one multi-task launch.
            ms = [self.m(n) for n in used]
            dtype = torch.promote_types(ms[0].dtype, torch.float32) if len({m.dtype for m in ms}) > 1 else ms[0].dtype
            if BASE_ADAPTER in names:
                ms.append(torch.zeros_like(ms[0]))
            m_stack = torch.stack([m.to(dtype) for m in ms])
            index = {n: i for i, n in enumerate(used)}
            ids = torch.tensor([index.get(n, len(used)) for n in names], device=x.device)
            return multitask_pica_linear(
                x, self.base_weight, self.base_layer.bias, self.basis(used[0]), m_stack, ids
            )
        outs = []
        for i, name in enumerate(names):
            xi = x[i : i + 1]
            if name == BASE_ADAPTER:
                outs.append(self.base_layer(xi))
            else:
                spec = self.adapters[name]
                outs.append(pica_linear(xi, self.base_weight, self.base_layer.bias, self.basis(name),
                                        self.m(name), side=spec.side))
        return torch.cat(outs)

    # ------------------------------------------------------------------ merge
    def delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        """``ΔW`` (out, in) of an adapter in float32 (float64 for a float64 base)."""
        name = adapter or self.active_adapter
        spec = self.adapters[name]
        d = reference.delta_weight(self.basis(name), self.m(name), spec.side)
        return d.to(torch.float64) if self.base_weight.dtype == torch.float64 else d

    @torch.no_grad()
    def merge(self, adapter: str | None = None, *, safe_merge: bool = False) -> None:
        """Add ``ΔW`` into the base weight: computed in fp32, rounded once.

        The original weight is kept (buffer ``original_weight``, same dtype and
        device, i.e. one extra copy of W per merged layer) so that
        :meth:`unmerge` restores it bit for bit.
        """
        name = adapter or self.active_adapter
        if name is None or name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; this layer has {sorted(self.adapters)}")
        if self.merged:
            if self.merged_adapter == name:
                return
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged; unmerge it first")
        w = self.base_layer.weight
        delta = self.delta_weight(name)
        merged = self.base_weight.to(delta.dtype) + delta
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError(f"merging adapter {name!r} gives NaN or Inf in the weight; nothing was merged")
        self.register_buffer("original_weight", w.detach().clone(), persistent=False)
        w.copy_((merged.T if self.fan_in_fan_out else merged).to(w.dtype))
        self.merged_adapter = name
        self.active_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original base weight (a no-op when nothing is merged)."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self.original_weight)
        del self.original_weight
        self.merged_adapter = None

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
