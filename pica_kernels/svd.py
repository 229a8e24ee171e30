"""Truncated SVD front end: the frozen PiCa basis of a weight.

``truncated_svd`` is the one place a basis is computed (PiCaLinear,
apply_pica, load_adapter all call it). Methods:

* ``"accurate"`` (default) and ``"fast"``: randomised block Krylov
  (docs/svd.md). A seeded Gaussian sketch ``Omega`` (d, b) is drawn on
  the CPU, ``b = rank + oversample``; the Krylov basis
  ``Q = orth[Omega, (AᵀA)Omega, ..., (AᵀA)^steps Omega]`` (d, (steps+1)·b) is
  built block by block with full re-orthogonalisation (block Gram-Schmidt
  twice, then CholeskyQR2 with float64 Grams; an eigh-based orthonormalisation
  that drops numerically null directions when Cholesky fails on a
  rank-deficient block); then Rayleigh-Ritz: ``C = A Q``, ``eigh(CᵀC)``
  (Gram in float64), top ``rank`` Ritz pairs. ``A`` is the weight oriented so
  that the Krylov vectors live on its short side ``d = min(out, in)``.
  When ``(steps+1)·b`` is a large fraction of ``d`` (``exact_ratio``), the
  Gram path runs instead: ``eigh(AᵀA)`` (Gram in float64) -- cheaper there and
  immune to the rank deficiency a nearly full Krylov space runs into (GQA k/v
  projections of SmolLM2 are 192 x 576). Both end with a float64
  Rayleigh-Ritz on the r-dimensional subspace found (:func:`_finish`).
* ``"exact"``: a full float64 ``torch.linalg.svd`` (the reference; slow).

The numeric core runs in the C++ extension ``pica_kernels._C`` (op
``torch.ops.pica.truncated_svd_core``; csrc/) when it was built, else in the
pure-torch implementation below, which performs the same ATen calls in the
same order. :func:`backend` says which one runs.

Determinism matters more than speed here: the basis is recomputed whenever an
adapter is loaded, and a trained ``M`` is only meaningful against the exact
basis vectors it was trained with (a rotation inside a degenerate singular
subspace changes ``ΔW``). So the sketch comes from a CPU ``torch.Generator``
(the same numbers on every device), it is shared by all layers of a batch
(a layer's basis does not depend on its position in the batch), every vector
gets a canonical sign (its largest-magnitude entry positive), and adapter files
carry a fingerprint of each basis (:func:`basis_fingerprint`) that is checked
on load. On one CPU with one thread count, the same seed gives the same bits.
"""

from __future__ import annotations

import os

import torch

from .reference import check_side

#: Versioned presets. A preset's name with its version ("accurate-v2") always
#: computes the same basis, so an adapter file that records it can be verified
#: against a recomputed basis after the defaults change; the plain names
#: ("accurate", "fast") point at the newest version (:data:`SVD_METHOD_ALIASES`).
#: Adapter files written before presets were versioned recorded the plain names:
#: those meant the v1 presets (:data:`LEGACY_SVD_METHODS`).
#:
#: v1 (the settings of pica_kernels <= 0.1 adapter files): block Krylov, block
#: r + max(16, r/4), 8 steps, Gram path when (steps+1)·block >= 0.5·d. Real LLM
#: spectra are flat near r (SmolLM2-135M up_proj: sigma_1..40 = 13.3 ... 11.3),
#: so Krylov needs many steps: on SmolLM2 up/o projections (worst of 10 layers,
#: r=16 and 32) block r+16 with 4 steps reached energy 0.9905 / cos² 0.913,
#: 6 steps 0.9995 / 0.984, 8 steps 0.99999 / 1.0000. "fast": block r+8, 3 steps.
#:
#: v2: the same block and steps, run by the leaner Krylov of :func:`_krylov2`
#: (BCGS2 with two projections instead of three, preallocated blocks, the
#: Rayleigh-Ritz matrix Qᵀ(AᵀA Q) assembled from the Krylov products on the short
#: side instead of a float64 Gram of A Q on the long side: 17% less CPU at
#: 4096², r = 256). And where 8 steps would cross the Gram switch on a large
#: weight (d >= 2048; 4096², r = 256: 9 x 320 >= 2048), "accurate" narrows the
#: block to r + 16 and takes the most steps, down to 6, that stay below it, instead
#: of falling back to an eigh of d x d: at 4096², r = 256 block 272 with 6 steps
#: (Krylov dimension 1904) reached energy 1.000000, cos² 1.00000 on the LLM-like
#: benchmark matrix (5 steps: 0.99999 / 0.9999; block 320 with 4 steps: 0.99994 /
#: 0.9994) in 1/8 of the float32 full SVD's single-thread CPU time (2.3 vs 18 s). Small weights keep the Gram path (eigh of d <= 2048
#: is cheap, and 6 steps are not enough on SmolLM2's flat spectra at r = 16).
SVD_PRESETS = {
    "accurate-v1": {"oversample": 16, "oversample_frac": 0.25, "steps": 8, "algorithm": 1},
    "fast-v1": {"oversample": 8, "oversample_frac": 0.0, "steps": 3, "algorithm": 1},
    "accurate-v2": {"oversample": 16, "oversample_frac": 0.25, "steps": 8, "algorithm": 2,
                    "wide_oversample": 16, "wide_min_steps": 6, "wide_min_d": 2048},
    "fast-v2": {"oversample": 8, "oversample_frac": 0.0, "steps": 3, "algorithm": 2},
}

#: Plain preset names -> the versioned preset they run today.
SVD_METHOD_ALIASES = {"accurate": "accurate-v2", "fast": "fast-v2"}

#: Plain preset names as recorded by adapter files written before presets were
#: versioned -> the preset that reproduces those files' bases.
LEGACY_SVD_METHODS = {"accurate": "accurate-v1", "fast": "fast-v1"}

#: Methods ``truncated_svd`` accepts (also valid ``PiCaConfig.svd_method``):
#: the plain names, every versioned preset, and "exact" (full float64 SVD; it
#: has no knobs, so it needs no version).
SVD_METHODS = ("accurate", "fast", "exact", *SVD_PRESETS)


def versioned_method(method: str) -> str:
    """The versioned preset ``method`` runs today ("accurate" -> "accurate-v2"; "exact" stays).

    Adapter files should record this name, so that their bases can be recomputed
    (and verified against the stored fingerprints) after the plain names move on.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
    return SVD_METHOD_ALIASES.get(method, method)


def method_from_file(method: str) -> str:
    """The preset that reproduces the bases of an adapter file recording ``method``.

    Files record the versioned name (:func:`versioned_method`) and get it back as is; a plain name can only come
    from a file written before presets were versioned, and meant the v1 preset (:data:`LEGACY_SVD_METHODS`).
    """
    return LEGACY_SVD_METHODS.get(method, method)


# Use the exact Gram+eigh path when the Krylov space would span at least this
# fraction of the short side d. Measured on this 2-core CPU (benchmarks/
# results/svd_cpu.md): at k/d ~ 0.5 both paths cost about the same for
# d <= 2048, and near k/d -> 1 the Krylov blocks become rank-deficient.
_EXACT_RATIO = 0.5

# Orthonormality ||VᵀV - I||_max above which a randomised result is rejected
# and recomputed by full SVD (it never triggered on the LLM-like test spectra;
# it catches weights of rank < requested rank, whose extra vectors the Ritz
# step cannot produce). Typical values: 1e-6 (fp32), 1e-14 (fp64).
_ORTHO_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}

# Number of random probe directions in a basis fingerprint. Four is plenty:
# a drifted vector changes all four projections by O(drift) with probability 1.
_FINGERPRINT_PROBES = 4
_FINGERPRINT_SEED = 0x91CA

# --------------------------------------------------------------------------- backend

try:  # the C++ extension (csrc/), built by setup.py; absent in a pure-Python install
    from . import _C  # noqa: F401  (registers torch.ops.pica.*)

    HAS_CPP = hasattr(torch.ops.pica, "truncated_svd_core")
    _CPP_ERROR: str | None = None if HAS_CPP else "pica_kernels._C has no truncated_svd_core op"
except ImportError as e:  # not built, or built against another torch
    HAS_CPP = False
    _CPP_ERROR = f"{type(e).__name__}: {e}"


def backend() -> str:
    """Which implementation of the SVD core runs: "cpp" (pica_kernels._C) or "torch" (fallback).

    ``PICA_SVD_BACKEND=torch`` in the environment forces the fallback.
    """
    if os.environ.get("PICA_SVD_BACKEND", "").lower() == "torch":
        return "torch"
    return "cpp" if HAS_CPP else "torch"


def backend_error() -> str | None:
    """Why the C++ extension is not available (None when it is)."""
    return _CPP_ERROR


# --------------------------------------------------------------------------- checks


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
    if out_f == 0 or in_f == 0:
        raise ValueError(f"weight has an empty dimension, shape {tuple(weight.shape)}")
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


def resolve_knobs(
    method: str, rank: int, out_f: int, in_f: int, oversample: int | None = None, steps: int | None = None,
    exact_ratio: float | None = None,
) -> dict:
    """The effective settings of a call.

    Returns ``{"method": versioned preset, "path": "krylov"|"gram"|"full",
    "algorithm": 1|2 (which Krylov; 0 off the Krylov path), "block", "steps"}``.
    ``block = rank + oversample`` (capped at d = min(out, in)); ``path`` is
    "gram" when ``(steps+1)·block >= min(exact_ratio, 1)·d``. "accurate-v2" on a weight
    with d >= 2048 first tries a narrower block (r + 16) with fewer steps (>= 6)
    below that switch (see :data:`SVD_PRESETS`); explicit ``oversample`` or
    ``steps`` turn that off: explicit knobs are used as given.
    """
    method = versioned_method(method)
    if method == "exact":
        return {"method": method, "path": "full", "algorithm": 0, "block": 0, "steps": 0}
    preset = SVD_PRESETS[method]
    explicit = oversample is not None or steps is not None
    if oversample is None:
        oversample = max(preset["oversample"], int(preset["oversample_frac"] * rank + 0.5))
    steps = preset["steps"] if steps is None else steps
    ratio = _EXACT_RATIO if exact_ratio is None else exact_ratio
    for name, v in (("oversample", oversample), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not 0 <= ratio:
        raise ValueError(f"exact_ratio must be >= 0, got {ratio!r}")
    d = min(out_f, in_f)
    block = min(rank + oversample, d)
    # A Krylov space of (steps+1)·block >= d directions would exhaust the short
    # side: its last blocks are rounding noise (9 x 48 of d = 384 gave energy
    # 0.994), and the Gram path is exact there, whatever exact_ratio asks.
    if (steps + 1) * block < min(ratio * d, d):
        return {"method": method, "path": "krylov", "algorithm": preset["algorithm"], "block": block, "steps": steps}
    if not explicit and "wide_min_steps" in preset and d >= preset["wide_min_d"]:
        # Large rank on a large weight: a narrower block and fewer steps instead
        # of the d x d eigh (a Krylov step on a narrow block gains more than the
        # same Krylov dimension spent on a wider block: measured in SVD_PRESETS).
        wide = min(rank + preset["wide_oversample"], d)
        for s in range(steps, preset["wide_min_steps"] - 1, -1):
            if (s + 1) * wide < min(ratio * d, d):
                return {"method": method, "path": "krylov", "algorithm": preset["algorithm"], "block": wide,
                        "steps": s}
    return {"method": method, "path": "gram", "algorithm": 0, "block": block, "steps": steps}


def make_sketch(d: int, block: int, seed: int) -> torch.Tensor:
    """The seeded Gaussian sketch, (d, block) float32 on the CPU (the same numbers on every machine)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(d, block, generator=gen, dtype=torch.float32)


# --------------------------------------------------------------------------- pure-torch core
# Every function below has a line-by-line twin in csrc/svd.cpp; keep them in step.


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


def _orth_block(z: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """Orthonormalise the block z (L, n, b) against the orthonormal q (L, n, k) and itself (BCGS2 + CholeskyQR2)."""
    eps = torch.finfo(z.dtype).eps
    scale = torch.linalg.matrix_norm(z)  # (L,) before projection: what "numerically null" is relative to
    z = _project_out(_project_out(z, q), q)
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
    rounding (times (σ₁/σ_r)² for the long side). Without this step the long
    side ``b/σ`` inherited the float32 eigh error amplified by σ₁/σ_r (4e-4
    on SmolLM2's 192 x 576 k_proj at r = 128). Returns (vectors (L, d or p, r)
    in dtype, sigma (L, r) float64).
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
    """Block Krylov + Rayleigh-Ritz on a (L, p, d), p >= d.

    Returns (vectors (L, d or p, rank), sigma (L, rank) float64): the top
    short-side (right) singular vectors of a if want_short, else the long-side ones.
    """
    q0 = _orth_block(sketch.to(a.dtype).unsqueeze(0), None)  # (1, d, b), broadcast over L
    qs = [q0.expand(a.shape[0], -1, -1)]
    ys = []
    for _ in range(steps):
        y = a @ qs[-1]  # (L, p, b)
        ys.append(y)
        z = a.transpose(-1, -2) @ y  # (L, d, b) = AᵀA q_j
        qs.append(_orth_block(z, torch.cat(qs, dim=-1)))
    ys.append(a @ qs[-1])
    q = torch.cat(qs, dim=-1)  # (L, d, k)
    c = torch.cat(ys, dim=-1)  # (L, p, k) = a @ q
    c64 = c.to(torch.float64)
    # Ritz Gram in float64, eigh in the working precision (see _gram), refined by _finish.
    _, e = torch.linalg.eigh((c64.transpose(-1, -2) @ c64).to(a.dtype))  # ascending
    e = e[..., -rank:].flip(-1).to(torch.float64)  # (L, k, r)
    return _finish(q.to(torch.float64) @ e, c64 @ e, rank, want_short, a.dtype)


def _orth_block2(z: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """BCGS2 of the block z (L, n, b) against the orthonormal q (L, n, k): (project, CholeskyQR) twice.

    The v2 Krylov's orthonormalisation: one projection per pass (v1's
    :func:`_orth_block` projects twice before the first CholeskyQR: 3 projections
    in all, the bulk of the orthonormalisation cost at k >> b). Same eigh
    fallback for rank-deficient blocks.
    """
    eps = torch.finfo(z.dtype).eps
    scale = torch.linalg.matrix_norm(z)  # (L,) before projection: what "numerically null" is relative to
    z = _project_out(z, q)
    z1, ok = _cholqr(z)
    if ok:
        z1 = _project_out(z1, q)
        z2, ok = _cholqr(z1)
        if ok:
            return z2
    tol = 1e3 * eps
    z = _eigh_orth(z, scale, tol)
    z = _project_out(z, q)
    return _eigh_orth(z, torch.ones_like(scale), tol)


def _krylov2(a: torch.Tensor, sketch: torch.Tensor, rank: int, steps: int, want_short: bool):
    """Block Krylov v2 + Rayleigh-Ritz on a (L, p, d), p >= d. Same returns as :func:`_krylov`.

    Q (L, d, k) and Z = AᵀA Q (L, d, k), k = (steps+1)·b, fill preallocated
    buffers block by block (no growing concatenations); the Rayleigh-Ritz
    matrix is T = QᵀZ = Qᵀ AᵀA Q (k, k), a float32 GEMM over the short side d,
    symmetrised (v1 forms the float64 Gram of A Q over the long side p: 3.5x
    the work at 4096 x 14336, plus the float64 copies). One extra AᵀA product
    for the last block pays for it. Its top ``rank`` eigenvectors give
    V = Q E (L, d, r); _finish then does the float64 Rayleigh-Ritz on V with
    B = A V.
    """
    nb, d, b = a.shape[0], a.shape[-1], sketch.shape[-1]
    k = (steps + 1) * b
    q = a.new_empty(nb, d, k)
    z = a.new_empty(nb, d, k)
    q[..., :b] = _orth_block2(sketch.to(a.dtype).unsqueeze(0), None)  # the same (d, b) block for every layer
    for j in range(steps + 1):
        zj = a.transpose(-1, -2) @ (a @ q[..., j * b:(j + 1) * b])  # (L, d, b) = AᵀA q_j
        z[..., j * b:(j + 1) * b] = zj
        if j < steps:
            q[..., (j + 1) * b:(j + 2) * b] = _orth_block2(zj, q[..., :(j + 1) * b])
    t = q.transpose(-1, -2) @ z  # (L, k, k), symmetric up to rounding
    t = (t + t.transpose(-1, -2)) * 0.5
    _, e = torch.linalg.eigh(t)  # ascending
    v = q @ e[..., -rank:].flip(-1)  # (L, d, r)
    return _finish(v.to(torch.float64), (a @ v).to(torch.float64), rank, want_short, a.dtype)


def _gram(a: torch.Tensor, rank: int, want_short: bool):
    """Gram path on a (L, p, d): eigh(aᵀa). Same returns as :func:`_krylov`."""
    a64 = a.to(torch.float64)
    # Gram in float64, eigh in the working precision: the float32 eigh costs a
    # third of the float64 one (576²: 38 vs 104 ms on the 2-core CPU), which
    # dominates this path; _finish then restores float64 orthonormality. Its
    # subspace error (eps32·σ₁²/gap(σ²) ~ 1e-5 rad on SmolLM2's flat spectra)
    # is far inside the energy/cos² bars (tests/test_svd.py::test_smollm2_accuracy).
    _, e = torch.linalg.eigh((a64.transpose(-1, -2) @ a64).to(a.dtype))
    v = e[..., -rank:].flip(-1).to(torch.float64)  # (L, d, r)
    return _finish(v, a64 @ v, rank, want_short, a.dtype)


def _full(w: torch.Tensor, rank: int, side_input: bool):
    """Full float64 SVD of w (L, m, n): rows (L, rank, n or m) and sigma (L, rank) float64."""
    u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    vecs = vh[..., :rank, :] if side_input else u[..., :, :rank].transpose(-1, -2)
    return vecs, s[..., :rank]


def _core_torch(weight: torch.Tensor, sketch: torch.Tensor, rank: int, steps: int, path: int, side_input: bool):
    """Pure-torch twin of ``pica::truncated_svd_core``.

    weight (L, m, n) float; sketch (d, b) float32, d = min(m, n) (ignored unless
    path == 0); path 0 = Krylov, 1 = Gram, 2 = full SVD. Returns rows
    (L, rank, n if side_input else m) in the working dtype (float64 for a
    float64 weight, float32 otherwise) with canonical signs, and sigma (L, rank)
    float64.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(work)
    m, n = w.shape[-2], w.shape[-1]
    short_is_input = n <= m
    a = w if short_is_input else w.transpose(-1, -2)  # (L, p, d), p >= d
    want_short = side_input == short_is_input
    if path == 2:
        vecs, sigma = _full(w, rank, side_input)
    else:
        if path == 0:
            cols, sigma = _krylov(a, sketch, rank, steps, want_short)
        elif path == 3:
            cols, sigma = _krylov2(a, sketch, rank, steps, want_short)
        else:
            cols, sigma = _gram(a, rank, want_short)
        vecs = cols.transpose(-1, -2)  # (L, rank, dim)
        gram = vecs.to(torch.float64) @ vecs.transpose(-1, -2).to(torch.float64)
        err = (gram - torch.eye(rank, dtype=torch.float64, device=gram.device)).abs().amax()
        if not bool(err <= _ORTHO_TOL[work]):
            # e.g. a weight of rank < the requested rank: the extra vectors are
            # any orthonormal completion, which only the full SVD provides.
            vecs, sigma = _full(w, rank, side_input)
    return canonicalize_signs(vecs.to(work)).contiguous(), sigma.contiguous()


def _normalise_scale(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (L, m, n) divided per layer by the power of two ``2^e`` that brings max|w| into [0.5, 1); returns (w, 2^e (L,)).

    The Gram and Ritz matrices square the weight's scale, and their eigh runs in
    float32: a float32 weight of |W| ~ 1e-25 underflowed there (1e-50) and one
    of ~1e18 overflowed on the Krylov path (AᵀA q ~ 1e36·d), each giving a wrong
    basis without an error. Singular vectors do not depend on the scale. A
    power of two makes the division exact, so every weight of ordinary scale
    gives the same bits as without it (ATen's and LAPACK's float arithmetic is
    invariant under power-of-two scaling away from under/overflow).
    """
    amax = w.abs().amax(dim=(-1, -2))  # (L,)
    _, exponent = torch.frexp(amax)  # amax = mantissa·2^exponent, mantissa in [0.5, 1); 0 for a zero layer
    # Keep 2^-e representable in w's dtype (subnormal weights are scaled up as far as that allows).
    bound = 120 if w.dtype != torch.float64 else 1000
    exponent = exponent.clamp(-bound, bound)
    scale = torch.pow(2.0, exponent.to(torch.float64))  # exact powers of two, also beyond float32's range
    inv = torch.pow(2.0, -exponent.to(torch.float64))
    if bool((exponent == 0).all()):
        return w, scale
    return w * inv.to(w.dtype).view(-1, 1, 1), scale


# --------------------------------------------------------------------------- front end


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    side: str = "input",
    *,
    method: str = "accurate",
    seed: int = 0,
    oversample: int | None = None,
    steps: int | None = None,
    exact_ratio: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular vectors of ``weight`` in the layout PiCaLinear uses.

    Args:
        weight: (out, in) or a batch (L, out, in) of equal shape; any float dtype,
            any device (the work runs there, in float32; float64 for float64).
        rank: number of singular vectors, 1 <= rank <= min(out, in).
        side: "input" returns ``Vh[:r]`` of shape (r, in) (batch: (L, r, in));
            "output" returns ``U[:, :r]`` of shape (out, r) (batch: (L, out, r)).
        method: "accurate" (default), "fast" (randomised block Krylov presets,
            see :data:`SVD_PRESETS`) or "exact" (full float64 SVD).
        seed: seed of the random sketch (CPU ``torch.Generator``).
        oversample: block size minus rank (default: the preset's).
        steps: Krylov steps, i.e. applications of AᵀA (default: the preset's).
        exact_ratio: use the exact Gram path when (steps+1)·block >= exact_ratio·min(out, in).
        backend: "cpp" or "torch" to force an implementation (default :func:`backend`).

    Returns:
        ``(basis, singular_values)``: basis as above, float32 (float64 for a
        float64 weight), with canonical signs; singular values (r,) or (L, r),
        descending, same dtype. On the meta device, empty tensors of the right
        shapes (no computation).
    """
    check_side(side)
    out_f, in_f = _check_weight(weight, rank)
    knobs = resolve_knobs(method, rank, out_f, in_f, oversample, steps, exact_ratio)
    impl = backend or globals()["backend"]()
    if impl not in ("cpp", "torch"):
        raise ValueError(f"backend must be 'cpp' or 'torch', got {impl!r}")
    if impl == "cpp" and not HAS_CPP:
        raise RuntimeError(f"the C++ SVD extension is not available: {_CPP_ERROR}")
    out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    lead = weight.shape[:-2]
    shape = (*lead, rank, in_f) if side == "input" else (*lead, out_f, rank)
    if weight.device.type == "meta":
        return (
            torch.empty(shape, dtype=out_dtype, device="meta"),
            torch.empty((*lead, rank), dtype=out_dtype, device="meta"),
        )
    w = weight.detach()
    if w.dim() == 2:
        w = w.unsqueeze(0)
    w, scale = _normalise_scale(w.to(out_dtype))
    path = {"krylov": 0 if knobs["algorithm"] == 1 else 3, "gram": 1, "full": 2}[knobs["path"]]
    if knobs["path"] == "krylov":
        sketch = make_sketch(min(out_f, in_f), knobs["block"], seed).to(w.device)
    else:
        sketch = torch.empty(0, 0, dtype=torch.float32, device=w.device)
    if impl == "cpp":
        vecs, sigma = torch.ops.pica.truncated_svd_core(w, sketch, rank, knobs["steps"], path, side == "input")
    else:
        vecs, sigma = _core_torch(w, sketch, rank, knobs["steps"], path, side == "input")
    sigma = sigma * scale.to(sigma.dtype).unsqueeze(-1)
    basis = vecs if side == "input" else vecs.transpose(-1, -2)
    basis = basis.to(out_dtype).reshape(shape).contiguous()
    return basis, sigma.to(out_dtype).reshape(*lead, rank).contiguous()


def accuracy_report(
    weight: torch.Tensor, basis: torch.Tensor, side: str = "input", singular_values: torch.Tensor | None = None,
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Accuracy of a basis of one weight against the float64 SVD (docs/svd.md), worst over a batch.

    weight (out, in) or (L, out, in); basis as :func:`truncated_svd` returns it;
    singular_values (r,) or (L, r), optional; reference: a precomputed
    ``torch.linalg.svd(weight.double(), full_matrices=False)``. Returns

    * ``energy``: ``‖W V‖²_F / Σ_{i≤r} σ_i²`` (input side; ``‖Uᵀ W‖²_F`` output side), 1 is optimal;
    * ``cos2``: mean cos² of the principal angles to the exact subspace, ``‖V_refᵀ V‖²_F / r``;
    * ``ortho``: ``‖VᵀV − I‖_max``;
    * ``sigma_rel_err``: ``max_i |σ_i − σ_ref,i| / σ_ref,1`` (nan without singular_values).
    """
    check_side(side)
    w = weight.detach().to("cpu", torch.float64)
    b = basis.detach().to("cpu", torch.float64)
    if w.dim() == 2:
        w, b = w.unsqueeze(0), b.unsqueeze(0)
    vecs = b if side == "input" else b.transpose(-1, -2)  # (L, r, n or m)
    r = vecs.shape[-2]
    u, s, vh = reference if reference is not None else torch.linalg.svd(w, full_matrices=False)
    if u.dim() == 2:
        u, s, vh = u.unsqueeze(0), s.unsqueeze(0), vh.unsqueeze(0)
    u, s, vh = u.to(torch.float64), s.to(torch.float64), vh.to(torch.float64)
    ref_vecs = vh[..., :r, :] if side == "input" else u[..., :, :r].transpose(-1, -2)
    proj = w @ vecs.transpose(-1, -2) if side == "input" else vecs @ w
    energy = proj.pow(2).sum((-1, -2)) / s[..., :r].pow(2).sum(-1)
    cos2 = (ref_vecs @ vecs.transpose(-1, -2)).pow(2).sum((-1, -2)) / r
    ortho = (vecs @ vecs.transpose(-1, -2) - torch.eye(r, dtype=torch.float64)).abs().amax((-1, -2))
    sig_err = float("nan")
    if singular_values is not None:
        sv = singular_values.detach().to("cpu", torch.float64).reshape(s.shape[0], r)
        sig_err = float(((sv - s[..., :r]).abs().amax(-1) / s[..., 0]).max())
    return {
        "energy": float(energy.min()), "cos2": float(cos2.min()), "ortho": float(ortho.max()),
        "sigma_rel_err": sig_err,
    }


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


if not HAS_CPP and os.environ.get("PICA_REQUIRE_CPP"):
    # CI / GPU scripts set this so a broken build cannot hide behind the fallback.
    raise ImportError(f"PICA_REQUIRE_CPP is set but pica_kernels._C is not available: {_CPP_ERROR}")
