// Randomised block-Krylov truncated SVD, batched over layers, in ATen.
//
// Line-by-line twin of pica_kernels/svd/torch_core.py (_cholqr, _eigh_orth, _orth_block,
// _krylov, _krylov2, _gram, _full, core): the same ATen calls in the same order,
// so on the CPU the C++ and pure-torch backends give the same bits
// (tests/svd/test_svd_torch_core.py). Keep the two in step.
//
// Every op here is device-generic ATen, so the same code serves the CPU and
// CUDA dispatch keys (svd_cuda.cpp registers it for CUDA).

#include "svd.h"

#include <Python.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace pica {

SignsFn g_canonicalize_signs_cuda = nullptr;

namespace {

using at::Tensor;

Tensor mT(const Tensor& x) { return x.transpose(-1, -2); }

Tensor gram64(const Tensor& z) {
  Tensor z64 = z.to(at::kDouble);
  return at::matmul(mT(z64), z64);
}

// One CholeskyQR pass on z (L, n, b): Gram and Cholesky in float64.
std::tuple<Tensor, bool> cholqr(const Tensor& z) {
  Tensor g = gram64(z);
  auto [r, info] = at::linalg_cholesky_ex(g, /*upper=*/true, /*check_errors=*/false);
  if ((info != 0).any().item<bool>()) return {z, false};
  Tensor diag = r.diagonal(0, -2, -1);
  // A Gram condition number beyond ~1e12 leaves the float64 Cholesky factor
  // too inaccurate for the second pass to repair: use the eigh route.
  if ((diag.amin(-1) <= diag.amax(-1) * 1e-6).any().item<bool>()) return {z, false};
  Tensor q = at::linalg_solve_triangular(r.to(z.scalar_type()), z, /*upper=*/true, /*left=*/false);
  return {q, at::isfinite(q).all().item<bool>()};
}

// Orthonormal columns spanning z's directions of norm > tol*scale; null ones become 0.
Tensor eigh_orth(const Tensor& z, const Tensor& scale, double tol) {
  Tensor g = gram64(z);
  auto [lam, e] = at::linalg_eigh(g, "L");
  Tensor thresh = (scale.to(at::kDouble) * tol).pow(2);
  Tensor keep = lam > thresh.unsqueeze(-1);
  Tensor inv = at::where(keep, lam.clamp_min(std::numeric_limits<double>::min()).rsqrt(), at::zeros_like(lam));
  return at::matmul(z, (e * inv.unsqueeze(-2)).to(z.scalar_type()));
}

Tensor project_out(const Tensor& z, const c10::optional<Tensor>& q) {
  if (!q.has_value()) return z;
  return z - at::matmul(*q, at::matmul(mT(*q), z));
}

// Orthonormalise z (L, n, b) against the orthonormal q (L, n, k) and itself (BCGS2 + CholeskyQR2):
// first_projections times z -= q qᵀ z, CholeskyQR, once more, CholeskyQR. The v1 Krylov projects
// twice before the first CholeskyQR, the v2 Krylov once (see torch_core.py::_orth_block).
Tensor orth_block(Tensor z, const c10::optional<Tensor>& q, int first_projections) {
  const double eps = z.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                   : std::numeric_limits<float>::epsilon();
  Tensor scale = at::linalg_matrix_norm(z, "fro");
  for (int i = 0; i < first_projections; ++i) z = project_out(z, q);
  auto [z1, ok] = cholqr(z);
  if (ok) {
    z1 = project_out(z1, q);
    auto [z2, ok2] = cholqr(z1);
    if (ok2) return z2;
  }
  // Rank-deficient block: keep the directions well above rounding, zero the rest.
  const double tol = 1e3 * eps;
  z = eigh_orth(z, scale, tol);
  z = project_out(z, q);
  return eigh_orth(z, at::ones_like(scale), tol);
}

// Final Rayleigh-Ritz in float64 on the r-dimensional subspace (see torch_core.py::_finish).
std::tuple<Tensor, Tensor> finish(Tensor v, Tensor b, int64_t rank, bool want_short, at::ScalarType dtype) {
  auto [r, info] = at::linalg_cholesky_ex(at::matmul(mT(v), v), /*upper=*/true, /*check_errors=*/false);
  v = at::linalg_solve_triangular(r, v, /*upper=*/true, /*left=*/false);
  b = at::linalg_solve_triangular(r, b, /*upper=*/true, /*left=*/false);
  auto [lam, w] = at::linalg_eigh(at::matmul(mT(b), b), "L");
  w = w.narrow(-1, w.size(-1) - rank, rank).flip({-1});
  Tensor sigma = lam.narrow(-1, lam.size(-1) - rank, rank).flip({-1}).clamp_min(0).sqrt();
  if (want_short) return {at::matmul(v, w).to(dtype), sigma};
  Tensor inv = at::where(sigma > 0, sigma.reciprocal(), at::zeros_like(sigma));
  return {at::matmul(b, w * inv.unsqueeze(-2)).to(dtype), sigma};
}

std::tuple<Tensor, Tensor> krylov(const Tensor& a, const Tensor& sketch, int64_t rank, int64_t steps,
                                  bool want_short) {
  Tensor q0 = orth_block(sketch.to(a.scalar_type()).unsqueeze(0), c10::nullopt, 2);
  std::vector<Tensor> qs{q0.expand({a.size(0), -1, -1})};
  std::vector<Tensor> ys;
  for (int64_t j = 0; j < steps; ++j) {
    Tensor y = at::matmul(a, qs.back());
    ys.push_back(y);
    Tensor z = at::matmul(mT(a), y);
    qs.push_back(orth_block(z, at::cat(qs, -1), 2));
  }
  ys.push_back(at::matmul(a, qs.back()));
  Tensor q = at::cat(qs, -1);
  Tensor c = at::cat(ys, -1);
  Tensor c64 = c.to(at::kDouble);
  // Ritz Gram in float64, eigh in the working precision, refined by finish().
  auto [lam, e] = at::linalg_eigh(at::matmul(mT(c64), c64).to(a.scalar_type()), "L");
  e = e.narrow(-1, e.size(-1) - rank, rank).flip({-1}).to(at::kDouble);
  return finish(at::matmul(q.to(at::kDouble), e), at::matmul(c64, e), rank, want_short, a.scalar_type());
}

// v2 block Krylov: preallocated Q and Z = AᵀA Q, Ritz matrix QᵀZ (see torch_core.py::_krylov2).
std::tuple<Tensor, Tensor> krylov2(const Tensor& a, const Tensor& sketch, int64_t rank, int64_t steps,
                                   bool want_short) {
  const int64_t nb = a.size(0), d = a.size(-1), b = sketch.size(-1), k = (steps + 1) * b;
  Tensor q = at::empty({nb, d, k}, a.options());
  Tensor z = at::empty({nb, d, k}, a.options());
  q.narrow(-1, 0, b).copy_(orth_block(sketch.to(a.scalar_type()).unsqueeze(0), c10::nullopt, 1));
  for (int64_t j = 0; j <= steps; ++j) {
    Tensor zj = at::matmul(mT(a), at::matmul(a, q.narrow(-1, j * b, b)));
    z.narrow(-1, j * b, b).copy_(zj);
    if (j < steps) q.narrow(-1, (j + 1) * b, b).copy_(orth_block(zj, q.narrow(-1, 0, (j + 1) * b), 1));
  }
  Tensor t = at::matmul(mT(q), z);
  t = (t + mT(t)) * 0.5;
  auto [lam, e] = at::linalg_eigh(t, "L");
  Tensor v = at::matmul(q, e.narrow(-1, e.size(-1) - rank, rank).flip({-1}));
  return finish(v.to(at::kDouble), at::matmul(a, v).to(at::kDouble), rank, want_short, a.scalar_type());
}

std::tuple<Tensor, Tensor> gram(const Tensor& a, int64_t rank, bool want_short) {
  Tensor a64 = a.to(at::kDouble);
  // Gram in float64, eigh in the working precision (see torch_core.py::_gram for why).
  auto [lam, e] = at::linalg_eigh(at::matmul(mT(a64), a64).to(a.scalar_type()), "L");
  Tensor v = e.narrow(-1, e.size(-1) - rank, rank).flip({-1}).to(at::kDouble);
  return finish(v, at::matmul(a64, v), rank, want_short, a.scalar_type());
}

std::tuple<Tensor, Tensor> full(const Tensor& w, int64_t rank, bool side_input) {
  auto [u, s, vh] = at::linalg_svd(w.to(at::kDouble), /*full_matrices=*/false);
  Tensor vecs = side_input ? vh.narrow(-2, 0, rank) : mT(u.narrow(-1, 0, rank));
  return {vecs, s.narrow(-1, 0, rank)};
}

}  // namespace

Tensor canonicalize_signs(const Tensor& x) {
  if (x.is_cuda() && g_canonicalize_signs_cuda != nullptr && x.is_contiguous() &&
      (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble)) {
    return g_canonicalize_signs_cuda(x);
  }
  Tensor idx = x.abs().argmax(-1, /*keepdim=*/true);
  Tensor signs = at::sign(at::gather(x, -1, idx));
  signs = at::where(signs == 0, at::ones_like(signs), signs);
  return x * signs;
}

std::tuple<Tensor, Tensor> truncated_svd_core(const Tensor& weight, const Tensor& sketch, int64_t rank,
                                              int64_t steps, int64_t path, bool side_input) {
  TORCH_CHECK(weight.dim() == 3, "pica::truncated_svd_core: weight must be (L, m, n), got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "pica::truncated_svd_core: weight must be floating point");
  const int64_t m = weight.size(1), n = weight.size(2), d = std::min(m, n);
  TORCH_CHECK(rank > 0 && rank <= d, "pica::truncated_svd_core: rank must be in [1, ", d, "], got ", rank);
  TORCH_CHECK(path >= 0 && path <= 3, "pica::truncated_svd_core: path must be 0, 1, 2 or 3, got ", path);
  TORCH_CHECK(steps >= 0, "pica::truncated_svd_core: steps must be >= 0");
  if (path == 0 || path == 3) {
    TORCH_CHECK(sketch.dim() == 2 && sketch.size(0) == d && sketch.size(1) >= rank,
                "pica::truncated_svd_core: sketch must be (min(m, n), >= rank), got ", sketch.sizes());
    TORCH_CHECK(sketch.device() == weight.device(), "pica::truncated_svd_core: sketch and weight on different devices");
  }
  const auto work = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor w = weight.to(work);
  const bool short_is_input = n <= m;
  Tensor a = short_is_input ? w : mT(w);
  const bool want_short = side_input == short_is_input;
  Tensor vecs, sigma;
  if (path == 2) {
    std::tie(vecs, sigma) = full(w, rank, side_input);
  } else {
    Tensor cols;
    if (path == 0) {
      std::tie(cols, sigma) = krylov(a, sketch, rank, steps, want_short);
    } else if (path == 3) {
      std::tie(cols, sigma) = krylov2(a, sketch, rank, steps, want_short);
    } else {
      std::tie(cols, sigma) = gram(a, rank, want_short);
    }
    vecs = mT(cols);
    Tensor g = at::matmul(vecs.to(at::kDouble), mT(vecs).to(at::kDouble));
    Tensor err = (g - at::eye(rank, g.options())).abs().amax();
    const double tol = work == at::kDouble ? 1e-8 : 1e-3;  // _ORTHO_TOL in torch_core.py
    if (!(err <= tol).item<bool>()) std::tie(vecs, sigma) = full(w, rank, side_input);
  }
  return {canonicalize_signs(vecs.to(work).contiguous()).contiguous(), sigma.contiguous()};
}

}  // namespace pica

// Schemas are declared once, here; svd_cuda.cpp only adds a CUDA kernel.
TORCH_LIBRARY(pica, m) {
  m.def("truncated_svd_core(Tensor weight, Tensor sketch, int rank, int steps, int path, bool side_input)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pica, CPU, m) { m.impl("truncated_svd_core", &pica::truncated_svd_core); }

// `import pica_kernels._C` loads this library (running the registrations above);
// the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
