"""The adapted forward and the mixed-task forward, called by both front ends (no math here: the ops do it).

``adapter_forward`` runs ``y = x@W.T + Σ_i (x@B_i.T)@A_i.T + b`` for the active
adapters as ONE :func:`pica_kernels.ops.lowrank_linear` call (the factors of
several adapters concatenated along r), so the fused kernels and their fp32
``dM`` accumulation serve every front end. ``mixed_forward`` serves one
adapter per sequence: input-side adapters sharing one basis run as one
:func:`pica_kernels.ops.multitask_pica_linear` launch, other mixes per group of
sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import reference
from .defaults import BASE_ADAPTER

#: What a layer knows about one adapter at forward time: (basis, M, side).
AdapterTensors = tuple[torch.Tensor, torch.Tensor, str]


def check_input(x: torch.Tensor, in_features: int) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., in={in_features}), got {tuple(x.shape)}")


def adapter_forward(
    base_layer: nn.Module, weight: torch.Tensor, x: torch.Tensor, adapters: list[AdapterTensors]
) -> torch.Tensor:
    """``base_layer(x)`` plus the low-rank terms of ``adapters``. weight: the base weight (out, in), or None for a
    base the ops cannot read (a quantized layer: its own forward runs, the term is added); x (..., in)."""
    from ..ops import lowrank_linear

    bias = getattr(base_layer, "bias", None)
    if bias is not None and bias.dtype != x.dtype and x.dtype == weight.dtype:
        raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}; cast the layer (module.to(dtype))")
    if not adapters:
        return base_layer(x)
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
        return lowrank_linear(x, weight, bias, a, b)
    # x in another dtype than W (autocast): the base layer decides the output dtype, the term follows it.
    y = base_layer(x)
    xs = x.to(y.dtype)
    return y + torch.nn.functional.linear(torch.nn.functional.linear(xs, b.to(y.dtype)), a.to(y.dtype))


def mixed_forward(
    base_layer: nn.Module,
    weight: torch.Tensor,
    x: torch.Tensor,
    names: list[str],
    lookup: Callable[[str], AdapterTensors],
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
        y = base_layer(sub) if name == BASE_ADAPTER else adapter_forward(base_layer, weight, sub, [tensors[name]])
        for j, i in enumerate(rows):
            outs[i] = y[j]
    return torch.stack(outs)
