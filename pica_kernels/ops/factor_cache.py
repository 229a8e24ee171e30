"""Copies derived from a factor (its cast to the activation dtype, its rank-padded form), kept until it changes.

A copy is rebuilt when its source is written: the key holds the source's version counter (bumped by every
in-place write: ``copy_`` under no_grad, most optimizer steps) and its geometry (storage address, shape,
strides, dtype, device). Two writers leave the version counter alone: torch's fused optimizers
(``AdamW(fused=True)``, transformers.Trainer's default ``adamw_torch_fused``; the version stays 0 across
steps) -- every ``torch.optim`` step therefore drops the copies of the parameters it stepped (one global
step hook, :func:`_forget_stepped`) -- and a write through ``.data`` (it bypasses autograd's own checks
too): call :func:`clear_all` after one. Inference tensors have no version counter, and a graph being
compiled fuses the copy: both build per call.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary


class FactorCache:
    """Derived copies of tensors, one per (source, geometry, spec), rebuilt when the source changes.

    ``builds`` counts the copies made (tests read it: a second forward with an unchanged ``M`` builds
    nothing; an optimizer step makes one build of ``M`` on the next forward).
    """

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.builds = 0
        _CACHES.add(self)

    def clear(self) -> None:
        self._entries.clear()

    def forget(self, tensors) -> None:
        """Drop the copies made of ``tensors`` (each the root of the views that were copied)."""
        if len(self._entries) == 0:
            return
        for v in tensors:
            self._entries.pop(v, None)

    def __len__(self) -> int:
        return sum(len(specs) for specs in self._entries.values())

    def get(self, v: torch.Tensor, spec: tuple, build) -> torch.Tensor:
        """``build(v)`` (detached, outside autograd and inference mode), cached for ``v`` under ``spec`` (how
        it is derived) until ``v`` is written in place."""
        if v.is_inference() or torch.compiler.is_compiling():
            self.builds += 1
            return build(v.detach())
        root = v._base if v._base is not None else v
        geometry = (v.data_ptr(), tuple(v.shape), v.stride(), v.dtype, v.device)
        key = (v._version, geometry)
        specs = self._entries.get(root)
        if specs is None:
            specs = self._entries[root] = {}
        hit = specs.get((geometry, spec))
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad(), torch.inference_mode(False):  # a plain tensor, usable outside inference mode
            derived = build(v.detach())
        self.builds += 1
        # Copies of an older version of this storage are stale (the version counter is shared by all views
        # of it): drop them, so a trained M holds one copy per spec, not one per step.
        for k in [k for k, e in specs.items() if e[0][0] != v._version]:
            del specs[k]
        specs[(geometry, spec)] = (key, derived)
        return derived


_CACHES: weakref.WeakSet[FactorCache] = weakref.WeakSet()


def clear_all() -> None:
    """Forget every derived copy (only needed after writing a factor through ``.data``)."""
    for cache in list(_CACHES):
        cache.clear()


def _forget_stepped(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any ``torch.optim`` step: drop the copies of the parameters it stepped (a fused step rewrites
    them without bumping their version counters, so the cache key cannot see it)."""
    for cache in list(_CACHES):
        for group in optimizer.param_groups:
            cache.forget(group["params"])


register_optimizer_step_post_hook(_forget_stepped)
