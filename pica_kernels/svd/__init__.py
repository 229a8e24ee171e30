"""Truncated SVD: the frozen PiCa basis of a weight.

``truncated_svd`` is the one place a basis is computed (PiCaLinear,
apply_pica, load_adapter all call it). Methods (:mod:`.presets`):

* ``"accurate"`` (default) and ``"fast"``: randomised block Krylov. A seeded
  Gaussian sketch ``Omega`` (d, b) is drawn on the CPU, ``b = rank +
  oversample``; the Krylov basis ``Q = orth[Omega, (AᵀA)Omega, ...,
  (AᵀA)^steps Omega]`` (d, (steps+1)·b) is built block by block with full
  re-orthogonalisation (block Gram-Schmidt, CholeskyQR2 with float64 Grams; an
  eigh-based orthonormalisation that drops numerically null directions when
  Cholesky fails on a rank-deficient block); then Rayleigh-Ritz and the top
  ``rank`` Ritz pairs. ``A`` is the weight oriented so that the Krylov vectors
  live on its short side ``d = min(out, in)``. When ``(steps+1)·b`` is a large
  fraction of ``d`` (``exact_ratio``), the Gram path ``eigh(AᵀA)`` runs instead:
  cheaper there and immune to the rank deficiency a nearly full Krylov space
  runs into (GQA k/v projections). Both end with a float64 Rayleigh-Ritz on the
  r-dimensional subspace found.
* ``"exact"``: a full float64 ``torch.linalg.svd`` (the reference; slow).

The numeric core runs in the C++ extension ``pica_kernels._C`` (op
``torch.ops.pica.truncated_svd_core``; csrc/) when it was built, else in its
pure-torch twin (:mod:`.torch_core`), which performs the same ATen calls in the
same order. :func:`backend` says which one runs (:mod:`.extension`).

Determinism matters more than speed here: the basis is recomputed whenever an
adapter is loaded, and a trained ``M`` is only meaningful against the exact
basis vectors it was trained with (a rotation inside a degenerate singular
subspace changes ``ΔW``). So the sketch comes from a CPU ``torch.Generator``
(the same numbers on every device), it is shared by all layers of a batch
(a layer's basis does not depend on its position in the batch), every vector
gets a canonical sign (its largest-magnitude entry positive), and adapter files
carry a fingerprint of each basis (:func:`basis_fingerprint`) that is checked
on load. On one CPU with one thread count, the same seed gives the same bits.
Algorithm, presets and measurements: docs/svd.md.
"""

from __future__ import annotations

import torch

from ..reference import check_side
from . import extension, torch_core
from .extension import HAS_CPP, backend, backend_error
from .presets import (
    LEGACY_SVD_METHODS,
    SVD_METHOD_ALIASES,
    SVD_METHODS,
    SVD_PRESETS,
    Plan,
    Preset,
    method_from_file,
    preset,
    resolve_knobs,
    versioned_method,
)

__all__ = [
    "HAS_CPP", "LEGACY_SVD_METHODS", "SVD_METHODS", "SVD_METHOD_ALIASES", "SVD_PRESETS", "Plan", "Preset",
    "backend", "backend_error", "basis_fingerprint", "make_sketch", "method_from_file", "preset", "resolve_knobs",
    "truncated_svd", "versioned_method",
]

# Number of random probe directions in a basis fingerprint. Four is plenty:
# a drifted vector changes all four projections by O(drift) with probability 1.
_FINGERPRINT_PROBES = 4
_FINGERPRINT_SEED = 0x91CA


def _check_weight(weight: torch.Tensor, rank: int) -> tuple[int, int]:
    """The one check of ``weight`` and ``rank``; returns (out, in)."""
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


def make_sketch(d: int, block: int, seed: int) -> torch.Tensor:
    """The seeded Gaussian sketch, (d, block) float32 on the CPU (the same numbers on every machine)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(d, block, generator=gen, dtype=torch.float32)


def _normalise_scale(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (L, m, n) divided per layer by the power of two ``2^e`` that brings max|w| into [0.5, 1); returns (w, 2^e (L,)).

    The Gram and Ritz matrices square the weight's scale, and their eigh runs in
    float32: a tiny weight underflows there and a huge one overflows, each
    giving a wrong basis without an error (docs/svd.md, "Scale"). Singular
    vectors do not depend on the scale. A power of two makes the division exact,
    so every weight of ordinary scale gives the same bits as without it (ATen's
    and LAPACK's float arithmetic is invariant under power-of-two scaling away
    from under/overflow).
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


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    side: str = "input",
    *,
    method: str | Preset = "accurate",
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
            see :data:`SVD_PRESETS`), a versioned preset ("accurate-v1"),
            "exact" (full float64 SVD), or a :class:`Preset` already resolved
            by :func:`preset`.
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
    plan = resolve_knobs(method, rank, out_f, in_f, oversample, steps, exact_ratio)
    impl = backend or extension.backend()  # the argument shadows the module's backend()
    if impl not in extension.BACKENDS:
        raise ValueError(f"backend must be 'cpp' or 'torch', got {impl!r}")
    if impl == "cpp" and not HAS_CPP:
        raise RuntimeError(f"the C++ SVD extension is not available: {backend_error()}")
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
    if plan.path == "krylov":
        sketch = make_sketch(min(out_f, in_f), plan.block, seed).to(w.device)
    else:
        sketch = torch.empty(0, 0, dtype=torch.float32, device=w.device)
    core = torch.ops.pica.truncated_svd_core if impl == "cpp" else torch_core.core
    vecs, sigma = core(w, sketch, rank, plan.steps, plan.code, side == "input")
    sigma = sigma * scale.to(sigma.dtype).unsqueeze(-1)
    basis = vecs if side == "input" else vecs.transpose(-1, -2)
    basis = basis.to(out_dtype).reshape(shape).contiguous()
    return basis, sigma.to(out_dtype).reshape(*lead, rank).contiguous()


def basis_fingerprint(basis: torch.Tensor, side: str) -> torch.Tensor:
    """Projection of each basis vector on fixed random probes: (r, 4) float64 on CPU.

    basis: (r, in) for side="input", (out, r) for side="output" (a checked side:
    the adapter's). Two bases give fingerprints within ~their elementwise
    difference of each other; a basis of another weight, another rank order or
    flipped signs gives O(1) differences.
    """
    vectors = basis if side == "input" else basis.T
    vectors = vectors.detach().to("cpu", torch.float64)
    gen = torch.Generator().manual_seed(_FINGERPRINT_SEED)
    probes = torch.randn(vectors.shape[-1], _FINGERPRINT_PROBES, generator=gen, dtype=torch.float64)
    return vectors @ probes
