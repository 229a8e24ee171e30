// pica_kernels SVD extension: shared declarations of csrc/svd.cpp (CPU, always
// built) and csrc/svd_cuda.cpp (CUDA dispatch, built only with a CUDA torch and nvcc).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pica {

// The numeric core behind pica_kernels.truncated_svd (see svd.cpp; its
// pure-torch twin is pica_kernels/svd/torch_core.py::core; the path codes are
// pica_kernels/svd/presets.py's KRYLOV_V1, GRAM, FULL, KRYLOV_V2).
//   weight (L, m, n) float; sketch (d, b) float32, d = min(m, n);
//   path 0 = block Krylov (v1 presets), 1 = exact Gram + eigh, 2 = full float64 SVD,
//   3 = block Krylov v2 (v2 presets: leaner orthonormalisation, Ritz matrix QᵀAᵀAQ).
// Returns rows (L, rank, n if side_input else m) in the working dtype
// (float64 for a float64 weight, float32 otherwise) with canonical signs, and
// the singular values (L, rank) float64.
std::tuple<at::Tensor, at::Tensor> truncated_svd_core(
    const at::Tensor& weight, const at::Tensor& sketch, int64_t rank, int64_t steps, int64_t path,
    bool side_input);

// Flip each row of x (..., r, n) so its largest-magnitude entry is positive.
at::Tensor canonicalize_signs(const at::Tensor& x);

// Set by svd_cuda.cpp (CUDA builds only): a fused one-launch version of
// canonicalize_signs for contiguous CUDA float32/float64 rows.
using SignsFn = at::Tensor (*)(const at::Tensor&);
extern SignsFn g_canonicalize_signs_cuda;

}  // namespace pica
