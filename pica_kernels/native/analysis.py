"""Spectral analysis of a fine-tuned weight against its pre-trained one.

Tools behind the paper's "learning patterns closer to full fine-tuning" claims,
for any pair ``(w0, w)`` of ``(out, in)`` weights (PyTorch convention, as
``nn.Linear.weight``):

- :func:`intruder_dimensions`: Shuttleworth et al. 2024 (arXiv 2410.21228): a
  singular vector among the top ``k`` of the fine-tuned weight is an *intruder*
  when its largest absolute cosine similarity with every singular vector of the
  pre-trained weight is below ``threshold``. LoRA creates them, full
  fine-tuning hardly does.
- :func:`magnitude_direction`: DoRA's (Liu et al. 2024, arXiv 2402.09353)
  decomposition ``W = m * V / ||V||``, norms per output unit (row of the
  PyTorch weight, as PEFT's DoRA): mean absolute change of the magnitude
  ``ΔM`` and mean cosine distance of the direction ``ΔD``.
- :func:`projection_errors`: how much of an update ``ΔW`` lies outside the
  top-``r`` singular subspace of ``w0`` (the subspace PiCa trains in), against
  the best rank-``r`` approximation of ``ΔW`` (Eckart–Young) and a random
  ``r``-dimensional subspace; :func:`theorem1_bound`, the paper's bound, and
  :func:`singular_vector_drift`, the ε its O(ε) term depends on.

All computations are in float64 on the CPU: these are analysis tools, not hot paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..reference import check_side

__all__ = [
    "intruder_dimensions",
    "magnitude_direction",
    "projection_errors",
    "singular_vector_drift",
    "theorem1_bound",
]


def _as_matrix(name: str, w: torch.Tensor) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out, in) tensor, got {getattr(w, 'shape', type(w))}")
    if not (w.is_floating_point()):
        raise TypeError(f"{name} must be a floating tensor, got {w.dtype}")
    return w.detach().to("cpu", torch.float64)


def _pair(w0: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_matrix("w0", w0), _as_matrix("w", w)
    if a.shape != b.shape:
        raise ValueError(f"w0 {tuple(a.shape)} and w {tuple(b.shape)} must have the same (out, in) shape")
    return a, b


def _singular_vectors(w: torch.Tensor, side: str) -> torch.Tensor:
    """Singular vectors as columns, by descending singular value: input side (in, n), output side (out, n)."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return vh.T if side == "input" else u


def intruder_dimensions(
    w0: torch.Tensor,
    w: torch.Tensor,
    *,
    k: int = 10,
    threshold: float = 0.5,
    side: str = "output",
) -> dict:
    """Intruder dimensions of ``w`` relative to ``w0``.

    Args:
        w0, w: pre-trained and fine-tuned weights, (out, in).
        k: how many of the top singular vectors of ``w`` to examine.
        threshold: ε; a vector whose best |cos| with all singular vectors of ``w0`` is below it is an intruder.
        side: "output" compares left singular vectors (columns of U, in R^out, the space Shuttleworth et
            al. analyse for a PyTorch weight); "input" compares right singular vectors (rows of Vh, in R^in,
            the side PiCa's default basis lives on).

    Returns:
        ``{"count": int, "best_cos": list[float] (k,), "k": k, "threshold": threshold, "side": side}``.
    """
    check_side(side)
    a, b = _pair(w0, w)
    n = min(a.shape)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a {tuple(a.shape)} weight, got {k}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    pre = _singular_vectors(a, side)
    fine = _singular_vectors(b, side)[:, :k]
    best = (fine.T @ pre).abs().amax(dim=1)  # (k,)
    return {
        "count": int((best < threshold).sum()),
        "best_cos": best.tolist(),
        "k": k,
        "threshold": threshold,
        "side": side,
    }


def magnitude_direction(w0: torch.Tensor, w: torch.Tensor) -> dict:
    """DoRA's magnitude and direction change of ``w`` from ``w0``, per output unit.

    ``m = ||W[i, :]||`` and ``d = W[i, :] / m`` for each row ``i`` of the (out, in) weight;
    ``ΔM = mean_i |m_i - m0_i|``, ``ΔD = mean_i (1 - cos(W[i], W0[i]))``.

    Returns ``{"delta_m": float, "delta_d": float}``.
    """
    a, b = _pair(w0, w)
    m0, m = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (m0 * m).clamp_min(torch.finfo(torch.float64).tiny)
    return {"delta_m": float((m - m0).abs().mean()), "delta_d": float((1.0 - cos).mean())}


def _projector_residual(delta: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """``ΔW`` minus its projection onto span(basis columns), on ``side``."""
    if side == "input":  # rows of ΔW projected onto span(basis) ⊂ R^in
        return delta - (delta @ basis) @ basis.T
    return delta - basis @ (basis.T @ delta)


def projection_errors(
    w0: torch.Tensor,
    delta: torch.Tensor,
    ranks: Sequence[int],
    *,
    side: str = "input",
    seed: int = 0,
) -> dict:
    """Fraction of ``||ΔW||_F²`` outside a rank-``r`` subspace, for each ``r`` in ``ranks``.

    Args:
        w0: pre-trained weight (out, in).
        delta: update ``ΔW = W - W0`` (out, in).
        ranks: subspace dimensions to evaluate.
        side: "input" projects the rows of ΔW onto the top-r right singular vectors of ``w0``
            (PiCa's default basis ``P = Vh[:r]``: ``ΔW P.T P``; the paper's ``U_r U_r^T ΔW`` with its
            (in, out) weights); "output" projects the columns onto the top-r left singular vectors
            (``U_r U_r.T ΔW`` of the PyTorch weight).
        seed: seed of the random-subspace baseline.

    Returns a dict of lists aligned with ``ranks``, each ``||ΔW - proj(ΔW)||_F² / ||ΔW||_F²``:
        ``"pretrained"``: the top-r subspace of ``w0`` (what PiCa can express, Theorem 1's left side);
        ``"bound"``: :func:`theorem1_bound` / ``||ΔW||²`` (the best any rank-r subspace can do);
        ``"random"``: a random r-dimensional subspace on the same side; plus ``"ranks"`` and
        ``"delta_fro2"`` (``||ΔW||_F²``).
    """
    check_side(side)
    a, d = _pair(w0, delta)
    n = min(a.shape)
    ranks = [int(r) for r in ranks]
    bad = [r for r in ranks if not 1 <= r <= n]
    if bad:
        raise ValueError(f"ranks must be in [1, {n}] for a {tuple(a.shape)} weight, got {bad}")
    total = float(d.pow(2).sum())
    if total == 0.0:
        raise ValueError("delta is zero: there is no update to project")
    pre = _singular_vectors(a, side)
    tails = _tail_energies(d)
    gen = torch.Generator().manual_seed(seed)
    dim = a.shape[1] if side == "input" else a.shape[0]
    out = {"ranks": ranks, "delta_fro2": total, "pretrained": [], "bound": [], "random": []}
    for r in ranks:
        out["pretrained"].append(float(_projector_residual(d, pre[:, :r], side).pow(2).sum()) / total)
        out["bound"].append(float(tails[r]) / total)
        q, _ = torch.linalg.qr(torch.randn(dim, r, generator=gen, dtype=torch.float64))
        out["random"].append(float(_projector_residual(d, q, side).pow(2).sum()) / total)
    return out


def theorem1_bound(delta: torch.Tensor, rank: int) -> float:
    """Main term of the paper's Theorem 1: ``sum_{i > r} σ_i(ΔW)²``.

    Theorem 1 (PiCa, arXiv 2505.20211): if the fine-tuned weight keeps the pre-trained singular vectors up to
    a small rotation, ``W* = (U(I + E_P)) Σ* (V(I + E_Q))^T`` with ``|E_ij| < ε``, then
    ``||ΔW - U_r U_r^T ΔW||_F² <= sum_{i > r} σ_i(ΔW)² + O(ε)``: projecting onto the pre-trained top-r
    subspace is as good as the best rank-r approximation of ΔW (Eckart–Young), up to O(ε). This returns the
    first term (the O(ε) term has no explicit constant); :func:`singular_vector_drift` measures ε.
    """
    d = _as_matrix("delta", delta)
    if not 0 <= rank <= min(d.shape):
        raise ValueError(f"rank must be in [0, {min(d.shape)}], got {rank}")
    return float(_tail_energies(d)[rank])


def _tail_energies(d: torch.Tensor) -> torch.Tensor:
    """``t[r] = sum_{i >= r} σ_i(d)²`` for r = 0..n (t[n] = 0), float64."""
    s2 = torch.linalg.svdvals(d).pow(2)
    return torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])


def singular_vector_drift(w0: torch.Tensor, w: torch.Tensor, rank: int) -> dict:
    """ε of Theorem 1 on the top-``rank`` block: ``max |E_ij|`` of ``E = U0_r^T U_r - I`` on each side.

    Singular vectors are defined up to sign; each fine-tuned vector's sign is aligned to its pre-trained
    counterpart before subtracting the identity. Returns ``{"eps_output": float, "eps_input": float}``
    (``U`` columns and ``Vh`` rows of the PyTorch weights respectively).
    """
    a, b = _pair(w0, w)
    if not 1 <= rank <= min(a.shape):
        raise ValueError(f"rank must be in [1, {min(a.shape)}], got {rank}")
    u0, _, vh0 = torch.linalg.svd(a, full_matrices=False)
    u1, _, vh1 = torch.linalg.svd(b, full_matrices=False)
    out = {}
    for side, x0, x1 in (("output", u0[:, :rank], u1[:, :rank]), ("input", vh0[:rank].T, vh1[:rank].T)):
        g = x0.T @ x1  # (r, r)
        sign = torch.where(torch.diagonal(g) < 0, -1.0, 1.0).to(g.dtype)
        e = g * sign[None, :] - torch.eye(rank, dtype=g.dtype)
        out[f"eps_{side}"] = float(e.abs().max())
    return out
