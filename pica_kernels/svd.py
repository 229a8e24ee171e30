"""Truncated SVD front end: the frozen PiCa basis of a weight.

``truncated_svd`` is the one place a basis is computed (PiCaLinear,
apply_pica, load_adapter all call it). Today it runs an exact float64
``torch.linalg.svd``; the randomised C++/CUDA extension (csrc/) will slot in
behind the same name and arguments.

Determinism matters more than speed here: the basis is recomputed whenever an
adapter is loaded, and a trained ``M`` is only meaningful against the exact
basis vectors it was trained with (a rotation inside a degenerate singular
subspace changes ``ΔW``). So every vector gets a canonical sign (its
largest-magnitude entry positive) and adapter files carry a fingerprint of
each basis (:func:`basis_fingerprint`) that is checked on load.
"""

from __future__ import annotations

import torch

from .reference import check_side

#: Methods ``truncated_svd`` accepts. "exact" is a full float64 SVD.
SVD_METHODS = ("exact",)

# Number of random probe directions in a basis fingerprint. Four is plenty:
# a drifted vector changes all four projections by O(drift) with probability 1.
_FINGERPRINT_PROBES = 4
_FINGERPRINT_SEED = 0x91CA


def _check_weight(weight: torch.Tensor, rank: int) -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 3):
        raise ValueError(f"weight must be (out, in) or a batch (L, out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() == 3 and weight.shape[0] == 0:
        raise ValueError("weight is an empty batch (L = 0): nothing to decompose")
    out_f, in_f = weight.shape[-2:]
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 < rank <= min(out_f, in_f):
        raise ValueError(
            f"rank must be in [1, min(out, in)] = [1, {min(out_f, in_f)}] for a weight of shape "
            f"(out={out_f}, in={in_f}), got rank={rank}"
        )
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf; its singular vectors are undefined")
    return out_f, in_f


def canonicalize_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row of ``vectors`` (..., r, n) so its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -1, idx))
    signs[signs == 0] = 1
    return vectors * signs


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    side: str = "input",
    *,
    method: str = "exact",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular vectors of ``weight`` in the layout PiCaLinear uses.

    Args:
        weight: (out, in) or a batch (L, out, in) of equal shape; any float dtype.
        rank: number of singular vectors, 1 <= rank <= min(out, in).
        side: "input" returns ``Vh[:r]`` of shape (r, in) (batch: (L, r, in));
            "output" returns ``U[:, :r]`` of shape (out, r) (batch: (L, out, r)).
        method: one of :data:`SVD_METHODS`.
        seed: seed of the random sketch (unused by "exact"; kept so adapter
            files record it and randomised methods stay reproducible).

    Returns:
        ``(basis, singular_values)``: basis as above, float32 (float64 for a
        float64 weight), with canonical signs; singular values (r,) or (L, r),
        descending, same dtype. On the meta device, empty tensors of the right
        shapes (no computation).
    """
    check_side(side)
    if method not in SVD_METHODS:
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
    out_f, in_f = _check_weight(weight, rank)
    out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    lead = weight.shape[:-2]
    shape = (*lead, rank, in_f) if side == "input" else (*lead, out_f, rank)
    if weight.device.type == "meta":
        return (
            torch.empty(shape, dtype=out_dtype, device="meta"),
            torch.empty((*lead, rank), dtype=out_dtype, device="meta"),
        )
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    if side == "input":
        basis = canonicalize_signs(vh[..., :rank, :])
    else:
        basis = canonicalize_signs(u[..., :, :rank].transpose(-1, -2)).transpose(-1, -2)
    return basis.to(out_dtype).contiguous(), s[..., :rank].to(out_dtype).contiguous()


def basis_fingerprint(basis: torch.Tensor, side: str) -> torch.Tensor:
    """Projection of each basis vector on fixed random probes: (r, 4) float64 on CPU.

    basis: (r, in) for side="input", (out, r) for side="output". Two bases give
    fingerprints within ~their elementwise difference of each other; a basis of
    another weight, another rank order or flipped signs gives O(1) differences.
    """
    check_side(side)
    vectors = basis if side == "input" else basis.T
    vectors = vectors.detach().to("cpu", torch.float64)
    gen = torch.Generator().manual_seed(_FINGERPRINT_SEED)
    probes = torch.randn(vectors.shape[-1], _FINGERPRINT_PROBES, generator=gen, dtype=torch.float64)
    return vectors @ probes
