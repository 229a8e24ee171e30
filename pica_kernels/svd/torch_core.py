"""The pure-torch twin of ``pica::truncated_svd_core`` (csrc/svd.cpp).

Every function here has a line-by-line twin in csrc/svd.cpp: the same ATen calls
in the same order, so on the CPU both backends give the same bits
(tests/svd/test_svd_torch_core.py). Keep the two in step. The algorithm and the
measurements behind its choices are in docs/svd.md.
"""

from __future__ import annotations

import torch

from .presets import FULL, KRYLOV_V1, KRYLOV_V2

# Orthonormality ||VᵀV - I||_max above which a randomised result is rejected
# and recomputed by full SVD: it catches weights of rank < requested rank, whose
# extra vectors the Ritz step cannot produce. Typical values: 1e-6 (fp32), 1e-14 (fp64).
_ORTHO_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}


def canonicalize_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row of ``vectors`` (..., r, n) so its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -1, idx))
    signs[signs == 0] = 1
    return vectors * signs


def _solve_upper_right(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x (..., n, b) @ inverse(r) with r (..., b, b) upper triangular."""
    return torch.linalg.solve_triangular(r, x, upper=True, left=False)


def _cholqr(z: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One CholeskyQR pass on z (L, n, b): Gram and Cholesky in float64. Returns (q, ok)."""
    g = z.transpose(-1, -2).to(torch.float64) @ z.to(torch.float64)
    r, info = torch.linalg.cholesky_ex(g, upper=True)
    if bool((info != 0).any()):
        return z, False
    diag = r.diagonal(dim1=-2, dim2=-1)
    # A Gram condition number beyond ~1e12 leaves the float64 Cholesky factor
    # too inaccurate for the second pass to repair: use the eigh route.
    if bool((diag.amin(-1) <= 1e-6 * diag.amax(-1)).any()):
        return z, False
    q = _solve_upper_right(z, r.to(z.dtype))
    return q, bool(torch.isfinite(q).all())


def _eigh_orth(z: torch.Tensor, scale: torch.Tensor, tol: float) -> torch.Tensor:
    """Orthonormal columns spanning z's (L, n, b) directions of norm > tol·scale (L,); null ones become 0."""
    g = z.transpose(-1, -2).to(torch.float64) @ z.to(torch.float64)
    lam, e = torch.linalg.eigh(g)
    thresh = (tol * scale.to(torch.float64)) ** 2
    keep = lam > thresh.unsqueeze(-1)
    inv = torch.where(keep, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))
    return z @ (e * inv.unsqueeze(-2)).to(z.dtype)


def _project_out(z: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    if q is None:
        return z
    return z - q @ (q.transpose(-1, -2) @ z)


def _orth_block(z: torch.Tensor, q: torch.Tensor | None, first_projections: int) -> torch.Tensor:
    """Orthonormalise the block z (L, n, b) against the orthonormal q (L, n, k) and itself (BCGS2 + CholeskyQR2).

    ``first_projections`` times ``z -= q qᵀ z``, CholeskyQR, once more, CholeskyQR.
    The v1 Krylov projects twice before the first CholeskyQR, the v2 Krylov once
    (the projections are the bulk of the cost at k >> b); the versions keep their
    own count so that their bases stay bit for bit what they were.
    """
    eps = torch.finfo(z.dtype).eps
    scale = torch.linalg.matrix_norm(z)  # (L,) before projection: what "numerically null" is relative to
    for _ in range(first_projections):
        z = _project_out(z, q)
    z1, ok = _cholqr(z)
    if ok:
        z1 = _project_out(z1, q)
        z2, ok = _cholqr(z1)
        if ok:
            return z2
    # Rank-deficient block (the Krylov space exhausted the weight's range):
    # keep the directions well above rounding, zero the rest. Zero columns are
    # harmless in the Rayleigh-Ritz step.
    tol = 1e3 * eps
    z = _eigh_orth(z, scale, tol)
    z = _project_out(z, q)
    return _eigh_orth(z, torch.ones_like(scale), tol)


def _finish(v: torch.Tensor, b: torch.Tensor, rank: int, want_short: bool, dtype: torch.dtype):
    """Final Rayleigh-Ritz in float64 on the r-dimensional subspace found.

    v (L, d, r) float64: approximate top short-side vectors (from a float32
    eigh: orthonormal only to ~1e-5, worse in clusters); b = A v (L, p, r)
    float64. Re-orthonormalise v (one CholeskyQR, applied to b too), then
    eigh(bᵀb) in float64 rotates the pair into singular vectors: the short
    side ``v W`` and the long side ``b W / σ`` are orthonormal to float64
    rounding (times (σ₁/σ_r)² for the long side); without it the long side
    inherits the float32 eigh error amplified by σ₁/σ_r. Returns (vectors
    (L, d or p, r) in dtype, sigma (L, r) float64).
    """
    r, _ = torch.linalg.cholesky_ex(v.transpose(-1, -2) @ v, upper=True)
    v = _solve_upper_right(v, r)
    b = _solve_upper_right(b, r)
    lam, w = torch.linalg.eigh(b.transpose(-1, -2) @ b)
    w = w[..., -rank:].flip(-1)
    sigma = lam[..., -rank:].flip(-1).clamp_min(0).sqrt()
    if want_short:
        return (v @ w).to(dtype), sigma
    inv = torch.where(sigma > 0, sigma.reciprocal(), torch.zeros_like(sigma))
    return (b @ (w * inv.unsqueeze(-2))).to(dtype), sigma


def _krylov(a: torch.Tensor, sketch: torch.Tensor, rank: int, steps: int, want_short: bool):
    """Block Krylov v1 + Rayleigh-Ritz on a (L, p, d), p >= d.

    Returns (vectors (L, d or p, rank), sigma (L, rank) float64): the top
    short-side (right) singular vectors of a if want_short, else the long-side ones.
    """
    q0 = _orth_block(sketch.to(a.dtype).unsqueeze(0), None, 2)  # (1, d, b), broadcast over L
    qs = [q0.expand(a.shape[0], -1, -1)]
    ys = []
    for _ in range(steps):
        y = a @ qs[-1]  # (L, p, b)
        ys.append(y)
        z = a.transpose(-1, -2) @ y  # (L, d, b) = AᵀA q_j
        qs.append(_orth_block(z, torch.cat(qs, dim=-1), 2))
    ys.append(a @ qs[-1])
    q = torch.cat(qs, dim=-1)  # (L, d, k)
    c = torch.cat(ys, dim=-1)  # (L, p, k) = a @ q
    c64 = c.to(torch.float64)
    # Ritz Gram in float64, eigh in the working precision (see _gram), refined by _finish.
    _, e = torch.linalg.eigh((c64.transpose(-1, -2) @ c64).to(a.dtype))  # ascending
    e = e[..., -rank:].flip(-1).to(torch.float64)  # (L, k, r)
    return _finish(q.to(torch.float64) @ e, c64 @ e, rank, want_short, a.dtype)


def _krylov2(a: torch.Tensor, sketch: torch.Tensor, rank: int, steps: int, want_short: bool):
    """Block Krylov v2 + Rayleigh-Ritz on a (L, p, d), p >= d. Same returns as :func:`_krylov`.

    Q (L, d, k) and Z = AᵀA Q (L, d, k), k = (steps+1)·b, fill preallocated
    buffers block by block (no growing concatenations); the Rayleigh-Ritz
    matrix is T = QᵀZ = Qᵀ AᵀA Q (k, k), a float32 GEMM over the short side d,
    symmetrised (v1 forms the float64 Gram of A Q over the long side p). One
    extra AᵀA product for the last block pays for it. Its top ``rank``
    eigenvectors give V = Q E (L, d, r); _finish then does the float64
    Rayleigh-Ritz on V with B = A V.
    """
    nb, d, b = a.shape[0], a.shape[-1], sketch.shape[-1]
    k = (steps + 1) * b
    q = a.new_empty(nb, d, k)
    z = a.new_empty(nb, d, k)
    q[..., :b] = _orth_block(sketch.to(a.dtype).unsqueeze(0), None, 1)  # the same (d, b) block for every layer
    for j in range(steps + 1):
        zj = a.transpose(-1, -2) @ (a @ q[..., j * b:(j + 1) * b])  # (L, d, b) = AᵀA q_j
        z[..., j * b:(j + 1) * b] = zj
        if j < steps:
            q[..., (j + 1) * b:(j + 2) * b] = _orth_block(zj, q[..., :(j + 1) * b], 1)
    t = q.transpose(-1, -2) @ z  # (L, k, k), symmetric up to rounding
    t = (t + t.transpose(-1, -2)) * 0.5
    _, e = torch.linalg.eigh(t)  # ascending
    v = q @ e[..., -rank:].flip(-1)  # (L, d, r)
    return _finish(v.to(torch.float64), (a @ v).to(torch.float64), rank, want_short, a.dtype)


def _gram(a: torch.Tensor, rank: int, want_short: bool):
    """Gram path on a (L, p, d): eigh(aᵀa). Same returns as :func:`_krylov`."""
    a64 = a.to(torch.float64)
    # Gram in float64, eigh in the working precision: the float32 eigh, which
    # dominates this path, costs a third of the float64 one; _finish then
    # restores float64 orthonormality, and the subspace error left is far inside
    # the accuracy bars (docs/svd.md).
    _, e = torch.linalg.eigh((a64.transpose(-1, -2) @ a64).to(a.dtype))
    v = e[..., -rank:].flip(-1).to(torch.float64)  # (L, d, r)
    return _finish(v, a64 @ v, rank, want_short, a.dtype)


def _full(w: torch.Tensor, rank: int, side_input: bool):
    """Full float64 SVD of w (L, m, n): rows (L, rank, n or m) and sigma (L, rank) float64."""
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    vecs = vh[..., :rank, :] if side_input else u[..., :, :rank].transpose(-1, -2)
    return vecs, s[..., :rank]


def core(weight: torch.Tensor, sketch: torch.Tensor, rank: int, steps: int, path: int, side_input: bool):
    """Pure-torch twin of ``pica::truncated_svd_core``; the caller passes checked values.

    weight (L, m, n) float; sketch (d, b) float32, d = min(m, n) (used on the
    Krylov paths only); ``path``: :data:`~pica_kernels.svd.presets.KRYLOV_V1` (0),
    :data:`~pica_kernels.svd.presets.GRAM` (1), :data:`~pica_kernels.svd.presets.FULL`
    (2, full SVD) or :data:`~pica_kernels.svd.presets.KRYLOV_V2` (3). Returns rows
    (L, rank, n if side_input else m) in the working dtype (float64 for a float64
    weight, float32 otherwise) with canonical signs, and sigma (L, rank) float64.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(work)
    m, n = w.shape[-2], w.shape[-1]
    short_is_input = n <= m
    a = w if short_is_input else w.transpose(-1, -2)  # (L, p, d), p >= d
    want_short = side_input == short_is_input
    if path == FULL:
        vecs, sigma = _full(w, rank, side_input)
    else:
        if path == KRYLOV_V1:
            cols, sigma = _krylov(a, sketch, rank, steps, want_short)
        elif path == KRYLOV_V2:
            cols, sigma = _krylov2(a, sketch, rank, steps, want_short)
        else:  # GRAM
            cols, sigma = _gram(a, rank, want_short)
        vecs = cols.transpose(-1, -2)  # (L, rank, dim)
        gram = vecs.to(torch.float64) @ vecs.transpose(-1, -2).to(torch.float64)
        err = (gram - torch.eye(rank, dtype=torch.float64, device=gram.device)).abs().amax()
        if not bool(err <= _ORTHO_TOL[work]):
            # e.g. a weight of rank < the requested rank: the extra vectors are
            # any orthonormal completion, which only the full SVD provides.
            vecs, sigma = _full(w, rank, side_input)
    return canonicalize_signs(vecs.to(work)).contiguous(), sigma.contiguous()
