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
from ..ops import checks
from .base import weight_out_in
from .defaults import BASE_ADAPTER
from .merge import original_base

#: What a layer knows about one adapter at forward time: (basis, M, side).
AdapterTensors = tuple[torch.Tensor, torch.Tensor, str]


def check_input(x: torch.Tensor, in_features: int) -> None:
    """``x`` (..., in) floating point, or a ValueError/TypeError naming ``x`` (the ops' own check)."""
    checks.check_x(x, in_features)


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
    if disabled or (names is None and merged):
        check_input(x, layer.in_features)
        return (original_base(layer) if disabled and merged else base)(x, *args, **kwargs)
    weight = None if layer.quantization else weight_out_in(base)  # quantized base: its own forward + the term
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

    if not adapters or weight is None or x.dtype != weight.dtype:
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
    if weight is not None and x.dtype == weight.dtype:
        return lowrank_linear(x, weight, bias, a, b)  # checks every argument
    # x in another dtype than W (autocast), or a quantized base: the base layer decides the output dtype, the
    # term follows it.
    y = base_layer(x)
    return y + reference.lowrank_term(x.to(y.dtype), a, b)


def mixed_forward(
    base_layer: nn.Module,
    weight: torch.Tensor | None,
    x: torch.Tensor,
    names: list[str],
    lookup: Callable[[str], AdapterTensors],
    in_features: int,
) -> torch.Tensor:
    """Sequence i of ``x`` (batch, ..., in) through adapter ``names[i]`` (``BASE_ADAPTER``: base alone)."""
    from ..ops import multitask_pica_linear

    if x.dim() < 2 or x.shape[0] != len(names):
        raise ValueError(f"adapter_names has {len(names)} names; x must be (batch={len(names)}, ..., in), "
                         f"got {tuple(x.shape)}")
    used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
    tensors = {n: lookup(n) for n in used}
    # One basis for all (the same storage, as adapters of equal side and rank share it): one multi-task launch.
    bases = {(t[0].data_ptr(), tuple(t[0].shape), t[0].stride(), t[0].dtype) for t in tensors.values()}
    if used and x.dim() == 3 and len(bases) == 1 and all(t[2] == "input" for t in tensors.values()) \
            and weight is not None and x.dtype == weight.dtype:
        ms = [tensors[n][1] for n in used]
        dtype = ms[0].dtype
        for m in ms[1:]:
            dtype = torch.promote_types(dtype, m.dtype)
        if BASE_ADAPTER in names:
            ms.append(torch.zeros_like(ms[0]))
        m_stack = torch.stack([m.to(dtype) for m in ms])  # (n, out, r): a few copies of r-wide matrices
        index = {n: i for i, n in enumerate(used)}
        ids = torch.tensor([index.get(n, len(used)) for n in names], device=x.device)
        basis = tensors[used[0]][0]
        return multitask_pica_linear(x, weight, getattr(base_layer, "bias", None), basis, m_stack, ids)
    outs: list[torch.Tensor | None] = [None] * len(names)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        sub = x[rows]
        y = adapter_forward(base_layer, weight, sub, [] if name == BASE_ADAPTER else [tensors[name]], in_features)
        for j, i in enumerate(rows):
            outs[i] = y[j]
    return torch.stack(outs)
