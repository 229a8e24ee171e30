"""The forward of an adapted layer, called by both front ends (no math here: the ops do it).

:func:`layer_forward` is the whole forward of a layer of either front end (disabled, merged, a mixed batch, or
the active adapters). ``adapter_forward`` runs ``y = x@W.T + Σ_i (x@B_i.T)@A_i.T + b`` for the active
adapters as ONE :func:`pica_kernels.ops.lowrank_linear` call (the factors of
several adapters concatenated along r), so the fused kernels and their fp32
``dM`` accumulation serve every front end. ``mixed_forward`` serves one
adapter per sequence: input-side adapters sharing one basis run as one
:func:`pica_kernels.ops.multitask_pica_linear` launch, other mixes per group of
sequences. ``x`` is checked once per call: by the op where one runs, by :func:`check_input` where only the base
layer does.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn

from .. import reference
from ..ops import checks, eager
from ..ops.dispatch import compute_dtype
from .base import weight_out_in
from .defaults import BASE_ADAPTER
from .merge import original_base

#: What a layer knows about one adapter at forward time: (basis, M, side).
AdapterTensors = tuple[torch.Tensor, torch.Tensor, str]


def check_input(x: torch.Tensor, in_features: int) -> None:
    """``x`` (..., in) floating point, or a ValueError/TypeError naming ``x`` (the ops' own check)."""
    checks.check_x(x, in_features)


def check_input_dtype(x: torch.Tensor, weight: torch.Tensor) -> None:
    """``x`` in the dtype of the layer's (plain, unquantized) weight (out, in), or a TypeError naming both, as a
    plain ``nn.Linear`` would refuse them (with a bare "mat1 and mat2" error). Inside a ``torch.autocast`` region
    of x's device the GEMMs run in autocast's dtype whatever the two dtypes are: nothing to check there."""
    if x.dtype == weight.dtype or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(f"x has dtype {x.dtype}, the layer's weight has {weight.dtype}: cast the input "
                    f"(x.to({weight.dtype})) or the model (model.to({x.dtype})), or run under torch.autocast")


class _MergedTripwire(torch.autograd.Function):
    """Identity on ``y`` that ties it to the merged adapters' ``M``: a backward through the layer reaches
    :meth:`backward`, which says why no gradient can flow to ``M`` (it is folded into the base weight) instead of
    torch's bare "does not require grad" or a silently untrained ``M``."""

    @staticmethod
    def forward(ctx, y, names, *ms):
        ctx.names = names
        return y.clone()  # a fresh tensor: a view made inside a Function could not be modified in place later

    @staticmethod
    def backward(ctx, grad):
        names = ", ".join(repr(n) for n in ctx.names)
        raise RuntimeError(
            f"adapter {names} is merged into the base weights, so its M gets no gradient: unmerge before training "
            f"(pica_kernels.unmerge(model) natively, model.unmerge_adapter() under PEFT), or freeze M "
            f"(requires_grad_(False)) to train other parameters through the merged model"
        )


def merged_output(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``y`` of a merged layer, tied to the merged ``M`` that still require grad when the layer trains (training
    mode, grad enabled), so that a backward through it fails with a message (:class:`_MergedTripwire`); as is
    otherwise (inference, or ``M`` frozen). ``layer.merged_ms()``, where a layer has it, gives ``[(adapter, M),
    ...]`` of its merged adapters (a layer with several ``M`` per adapter: fused experts); else
    ``layer._tensors(adapter)[1]``."""
    if not (layer.training and torch.is_grad_enabled()):
        return y
    merged_ms = getattr(layer, "merged_ms", None)
    pairs = merged_ms() if merged_ms is not None else [(n, layer._tensors(n)[1]) for n in layer.merged_adapters]
    pairs = [(n, m) for n, m in pairs if m.requires_grad]
    if not pairs:
        return y
    return _MergedTripwire.apply(y, list(dict.fromkeys(n for n, _ in pairs)), *(m for _, m in pairs))


def layer_forward(
    layer: nn.Module,
    x: torch.Tensor,
    *args,
    active: list[str],
    names: list[str] | None,
    on_layer: Collection[str],
    disabled: bool,
    merged: bool,
    **kwargs,
) -> torch.Tensor:
    """The forward of an adapted layer of either front end, for one state the caller read once.

    ``layer`` has ``base_layer``, ``in_features``, ``quantization`` and ``_tensors(name) -> AdapterTensors``.
    ``active``: its active adapters; ``names``: one adapter per sequence (a mixed batch; ``BASE_ADAPTER`` or an
    adapter not in ``on_layer`` gives the base output) or None; ``on_layer``: the adapters this layer has;
    ``merged``: adapters are merged into its weight. Disabled adapters give the base output exactly, also while
    merged: the base layer's own forward runs on the original weight (:func:`.merge.original_base`), and nothing
    shared is changed. ``args``/``kwargs`` go to the base layer where it runs alone.
    """
    base = layer.base_layer
    weight = None if layer.quantization else weight_out_in(base)  # quantized base: its own forward + the term
    if weight is not None:
        check_input_dtype(x, weight)
    if disabled or (names is None and merged):
        check_input(x, layer.in_features)
        if disabled and merged:
            return original_base(layer)(x, *args, **kwargs)
        y = base(x, *args, **kwargs)
        return merged_output(layer, y) if merged else y
    if names is not None:
        if merged:
            raise ValueError("cannot pass adapter_names (a mixed batch) while adapters are merged; unmerge first")
        names = [n if n in on_layer else BASE_ADAPTER for n in names]
        return mixed_forward(base, weight, x, names, layer._tensors, layer.in_features)
    tensors = [layer._tensors(a) for a in active if a in on_layer]
    return adapter_forward(base, weight, x, tensors, layer.in_features)


def adapter_forward(
    base_layer: nn.Module, weight: torch.Tensor | None, x: torch.Tensor, adapters: list[AdapterTensors],
    in_features: int,
) -> torch.Tensor:
    """``base_layer(x)`` plus the low-rank terms of ``adapters``. weight: the base weight (out, in), or None for a
    base the ops cannot read (a quantized layer: its own forward runs, the term is added); x (..., in)."""
    from ..ops import lowrank_linear

    # The op runs when x and W meet in one dtype in the GEMM: equal dtypes, or both cast by an autocast region
    # (the op follows autocast as nn.Linear does; ops/dispatch.py, "autocast").
    fused = weight is not None and compute_dtype(x) == compute_dtype(weight)
    if not adapters or not fused:
        check_input(x, in_features)  # no op checks x on these paths
    if not adapters:
        return base_layer(x)
    bias = getattr(base_layer, "bias", None)
    factors = [reference.lowrank_factors(basis, m, side) for basis, m, side in adapters]
    if len(factors) == 1:
        a, b = factors[0]
    else:
        dtype = factors[0][1].dtype
        for fa, fb in factors:
            dtype = torch.promote_types(torch.promote_types(dtype, fa.dtype), fb.dtype)
        a = torch.cat([fa.to(dtype) for fa, _ in factors], dim=1)  # (out, Σr)
        b = torch.cat([fb.to(dtype) for _, fb in factors], dim=0)  # (Σr, in)
    if fused:
        return lowrank_linear(x, weight, bias, a, b)  # checks every argument
    # A quantized base (or x in another dtype than W): the base layer decides the output dtype, the term follows
    # it (in the autocast dtype inside an autocast region: lowrank_term follows autocast like the op).
    y = base_layer(x)
    return y + eager.lowrank_term(x.to(y.dtype), a, b)


def mixed_forward(
    base_layer: nn.Module,
    weight: torch.Tensor | None,
    x: torch.Tensor,
    names: list[str],
    lookup: Callable[[str], AdapterTensors],
    in_features: int,
) -> torch.Tensor:
    """Sequence i of ``x`` (batch, ..., in) through adapter ``names[i]`` (``BASE_ADAPTER``: base alone).

    A 2-D ``x`` of ``batch * seq`` rows is a token-flattened batch, sequence ``i`` in rows ``[i*seq, (i+1)*seq)``:
    what a mixture-of-experts block hands its dense layers (Qwen2-MoE's shared expert gets ``(batch*seq, hidden)``).
    """
    from ..ops import multitask_pica_linear

    if x.dim() == 2 and len(names) and x.shape[0] != len(names) and x.shape[0] % len(names) == 0:
        y = mixed_forward(base_layer, weight, x.reshape(len(names), -1, x.shape[-1]), names, lookup, in_features)
        return y.reshape(x.shape[0], y.shape[-1])
    if x.dim() < 2 or x.shape[0] != len(names):
        raise ValueError(f"adapter_names has {len(names)} names; x must be (batch={len(names)}, ..., in), "
                         f"got {tuple(x.shape)}")
    used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
    tensors = {n: lookup(n) for n in used}
    # One basis for all (the same storage, as adapters of equal side and rank share it): one multi-task launch.
    bases = {(t[0].data_ptr(), tuple(t[0].shape), t[0].stride(), t[0].dtype) for t in tensors.values()}
    if used and x.dim() == 3 and len(bases) == 1 and all(t[2] == "input" for t in tensors.values()) \
            and weight is not None and compute_dtype(x) == compute_dtype(weight):
        ms = [tensors[n][1] for n in used]
        if BASE_ADAPTER in names:
            ms.append(torch.zeros_like(ms[0]))
        index = {n: i for i, n in enumerate(used)}
        ids = torch.tensor([index.get(n, len(used)) for n in names], device=x.device)
        basis = tensors[used[0]][0]
        # A list, not a stack: the op stacks the M's only where it needs an (n, out, r) tensor (the custom op);
        # eager CPU inference reads them in place (a stack per layer and forward cost ~5% of a SmolLM2 forward
        # with 64 adapters).
        return multitask_pica_linear(x, weight, getattr(base_layer, "bias", None), basis, ms, ids)
    outs: list[torch.Tensor | None] = [None] * len(names)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        sub = x[rows]
        y = adapter_forward(base_layer, weight, sub, [] if name == BASE_ADAPTER else [tensors[name]], in_features)
        for j, i in enumerate(rows):
            outs[i] = y[j]
    return torch.stack(outs)
