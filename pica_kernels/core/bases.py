"""Bases of many layers at once: one batched truncated SVD per group of equal shape, dtype and device."""

from __future__ import annotations

import torch

from ..svd import truncated_svd

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

    ``rank``: one rank, or ``{name: rank}`` per layer. Returns ``{name: basis}`` (views into the batched
    result). Shared by apply_pica and the PEFT tuner.
    """
    ranks = rank if isinstance(rank, dict) else {name: rank for name, _ in layers}
    by_shape: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, w in layers:
        if not w.is_floating_point():
            raise TypeError(
                f"layer {name!r}: weight has dtype {w.dtype}; PiCa computes bases of floating-point weights "
                f"(dequantize the layer, or exclude it)"
            )
        by_shape.setdefault((tuple(w.shape), w.dtype, w.device, ranks[name]), []).append((name, w))
    bases: dict[str, torch.Tensor] = {}
    bar = None
    if progress and len(layers) > 1 and layers[0][1].device.type != "meta":
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc=f"PiCa bases ({side} side)", unit="layer")
    for group in by_shape.values():
        step = max(1, _SVD_BATCH_ELEMENTS // group[0][1].numel())
        for i in range(0, len(group), step):
            chunk = group[i : i + step]
            stack = torch.stack([w.detach() for _, w in chunk])
            basis, _ = truncated_svd(stack, ranks[chunk[0][0]], side, method=method, seed=seed)
            for (name, _), b in zip(chunk, basis):
                bases[name] = b
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return bases


