"""Bases of many layers at once: one batched truncated SVD per group of equal shape, dtype and device.

The one place bases are computed for ``apply_pica``, ``load_adapter`` and the PEFT tuner; each batch is looked
up in the on-disk basis cache first (:mod:`pica_kernels.core.cache`, ``PICA_KERNELS_CACHE``).
"""

from __future__ import annotations

import torch

from ..svd import truncated_svd
from . import cache

# Batch of the basis SVD, in weight elements: bounds the stack of one group
# (2**27 elements = 512 MiB in the float32 working copy; the exact Gram path
# of a short side d adds only d x d float64 per layer) on a 7B model.
_SVD_BATCH_ELEMENTS = 2**27


def batched_bases(
    layers: list[tuple[str, torch.Tensor]],
    rank: int | dict[str, int],
    side: str,
    *,
    method: str,
    seed: int,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Bases of named (out, in) weights: one batched truncated SVD per group of equal shape, dtype and device.

    ``rank``: one rank, or ``{name: rank}`` per layer; the weights are floating point (the front ends check their
    targets, :func:`pica_kernels.core.base.check_float_weight`). Returns ``{name: basis}`` (views into the batched
    result). Shared by apply_pica and the PEFT tuner. Each batch comes from the basis cache when it holds it
    (keyed by the weights' content and every SVD setting; see :mod:`pica_kernels.core.cache`), else from the
    SVD, and is then stored there.
    """
    ranks = rank if isinstance(rank, dict) else {name: rank for name, _ in layers}
    by_shape: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, w in layers:
        by_shape.setdefault((tuple(w.shape), w.dtype, w.device, ranks[name]), []).append((name, w))
    bases: dict[str, torch.Tensor] = {}
    use_cache = cache.directory() is not None
    if use_cache:
        cache.max_bytes()  # a bad PICA_KERNELS_CACHE_MAX_BYTES fails here, before any SVD runs
    bar = None
    if progress and len(layers) > 1 and layers[0][1].device.type != "meta":
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc=f"PiCa bases ({side} side)", unit="layer")
    for group in by_shape.values():
        step = max(1, _SVD_BATCH_ELEMENTS // group[0][1].numel())
        for i in range(0, len(group), step):
            chunk = group[i : i + step]
            rank_i = ranks[chunk[0][0]]
            # Keyed per batch, not per layer: the SVD takes some decisions for a whole batch (cache.py).
            key = None
            if use_cache:
                key = cache.batch_key([w for _, w in chunk], rank_i, side, method=method, seed=seed)
            basis = cache.load(key, chunk[0][1].device) if key is not None else None
            if basis is None:
                stack = torch.stack([w.detach() for _, w in chunk])
                basis, _ = truncated_svd(stack, rank_i, side, method=method, seed=seed)
                if key is not None:
                    cache.store(key, basis)
            for (name, _), b in zip(chunk, basis):
                bases[name] = b
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return bases


