"""Rank padding: every Triton launch sees a rank that is a multiple of 16.

The JIT specialises an integer argument divisible by 16 (``tt.divisibility``), and
the kernel compiled without that hint is a different, worse one (sm_90, the fused
forward GEMM: 122 registers at r = 16, 176 at r = 8, 254 at r = 24). Zero
rows / columns in the factors are exact (``t @ 0 = 0``, ``0 @ B = 0``), so the
launchers run rank ``r`` as ``rp = padded_rank(r)``:

* the factors ``A`` (out, r) and ``B`` (r, in) get ``rp - r`` zero columns / rows.
  The copy is made ONCE per change of the factor, not per call (:data:`PAD_CACHE`, a
  :class:`~pica_kernels.ops.factor_cache.FactorCache`: keyed by the tensor's identity and
  version counter). A frozen basis is padded once, on its first launch; a trainable
  ``M`` at most once per optimizer step, however many layers share it.
* ``t = x @ B.T`` is computed into a (T, rp) buffer and handed on as its (T, r) view
  (no copy); the backward reads the view's row back at width rp where the storage has
  room (:func:`widen_cols`: extra columns only feed output columns that are dropped).
  The ops' custom ops return ``t`` in this layout whichever branch ran (their reference
  branch copies its t into it): a fake kernel must promise one layout, and
  ``torch.compile`` reuses a compiled graph across backend choices.
* gradients are sliced back to the true shape (``dM`` (out, r) or (r, in)): the zero
  rows / columns never leave the launchers.

Inference tensors are padded per call. The reference math (:mod:`pica_kernels.reference`)
and the eager CPU path (:mod:`pica_kernels.ops.eager`) are never padded.
"""

from __future__ import annotations

import torch

from ..factor_cache import FactorCache

#: Ranks are padded to a multiple of this: the JIT's divisibility hint.
RANK_ALIGN = 16


def padded_rank(rank: int, align: int | None = None) -> int:
    """``rank`` rounded up to a multiple of ``align`` (default :data:`RANK_ALIGN`)."""
    align = RANK_ALIGN if align is None else align
    return -(-rank // align) * align


#: The process-wide cache of padded factors.
PAD_CACHE = FactorCache()


def _pad_dim(v: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    shape = list(v.shape)
    shape[dim] = width
    out = v.new_zeros(shape)
    out.narrow(dim, 0, v.shape[dim]).copy_(v)
    return out


def pad_rank_dim(v: torch.Tensor, dim: int, align: int | None = None) -> torch.Tensor:
    """``v`` with its rank dimension ``dim`` zero-padded to :func:`padded_rank` (``v`` itself when aligned)."""
    rank = v.shape[dim]
    width = padded_rank(rank, align)
    if width == rank:
        return v
    dim = dim % v.dim()
    return PAD_CACHE.get(v, ("dim", dim, width), lambda s: _pad_dim(s, dim, width))


def slot_offsets(ranks, align: int | None = None) -> list[int]:
    """Start of each rank's slot when every rank is padded: ``[0, rp_0, rp_0 + rp_1, ...]`` (n + 1 entries)."""
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + padded_rank(r, align))
    return offs


def _pad_slots(v: torch.Tensor, ranks: tuple[int, ...], dim: int, align: int | None) -> torch.Tensor:
    offs = slot_offsets(ranks, align)
    shape = list(v.shape)
    shape[dim] = offs[-1]
    out = v.new_zeros(shape)
    lo = 0
    for r, start in zip(ranks, offs):
        out.narrow(dim, start, r).copy_(v.narrow(dim, lo, r))
        lo += r
    return out


def pad_rank_slots(v: torch.Tensor, ranks, dim: int = 0, align: int | None = None) -> torch.Tensor:
    """Concatenated factors (``sum r_i`` along ``dim``, e.g. grouped ``B_cat``) with each block of ``r_i``
    padded to its own slot of ``padded_rank(r_i)`` (:func:`slot_offsets`); ``v`` itself when all are aligned."""
    ranks = tuple(int(r) for r in ranks)
    if all(padded_rank(r, align) == r for r in ranks):
        return v
    dim = dim % v.dim()
    offs = tuple(slot_offsets(ranks, align))
    return PAD_CACHE.get(v, ("slots", dim, ranks, offs), lambda s: _pad_slots(s, ranks, dim, align))


def padded_view(shape: tuple[int, ...], rank: int, alloc, align: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A buffer whose last dimension is ``padded_rank(rank)`` wide, from ``alloc(shape_padded)``, and its
    view at width ``rank``: ``(buffer, view)``."""
    width = padded_rank(rank, align)
    buf = alloc((*shape, width))
    return buf, (buf if width == rank else buf[..., :rank])


def slot_slices(ranks, align: int | None = None) -> list[tuple[int, int]]:
    """(lo, hi) of each rank's r_i columns in a slot-padded t (:func:`slot_offsets`)."""
    return [(lo, lo + r) for lo, r in zip(slot_offsets(ranks, align), ranks)]


def pad_cols_like_kernel(t: torch.Tensor, align: int | None = None) -> torch.Tensor:
    """``t`` (..., r) copied into the layout the kernels give it: the (..., r) view of a zero-padded
    (..., padded_rank(r)) buffer (the custom ops' reference branches return this, so the ops' output
    strides match their fake kernels' whichever branch ran); ``t`` itself when r is a multiple of 16."""
    rank = t.shape[-1]
    width = padded_rank(rank, align)
    if width == rank:
        return t
    buf = t.new_zeros((*t.shape[:-1], width))
    buf[..., :rank].copy_(t)
    return buf[..., :rank]


def pad_slots_like_kernel(t: torch.Tensor, ranks, align: int | None = None) -> torch.Tensor:
    """Grouped ``t`` (T, sum r_i) laid out in padded slots (T, sum padded_rank(r_i)), zeros between."""
    ranks = tuple(int(r) for r in ranks)
    if all(padded_rank(r, align) == r for r in ranks):
        return t
    return _pad_slots(t, ranks, t.dim() - 1, align)


def widen_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (rows, r) read as (rows, width >= r) over the same storage, or ``t`` itself where the row stride
    or the storage leaves no room.

    Only for a launch where column j of ``t`` feeds output column j alone (``dA = dy.T @ t``): the columns
    beyond r -- the zero padding of the kernels' t, or a neighbour's slot in the grouped t -- only make
    output columns that are dropped. Never for operands whose extra entries would be multiplied into kept
    outputs (a NaN there would spread).
    """
    rows, rank = t.shape
    if width <= rank or rows == 0 or t.stride(1) != 1 or t.stride(0) < width:
        return t
    last = t.storage_offset() + (rows - 1) * t.stride(0) + width
    if last * t.element_size() > t.untyped_storage().nbytes():
        return t
    return t.as_strided((rows, width), (t.stride(0), 1))
