// CUDA dispatch of pica::truncated_svd_core (built only with a CUDA torch and
// nvcc; see setup.py). The numeric core is the device-generic ATen code of
// svd.cpp (cuBLAS GEMMs, cuSOLVER Cholesky/eigh/SVD through ATen); this file
// registers it for the CUDA key and plugs in the fused sign kernel of
// canonical_signs.cu.

#include "svd.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdlib>

extern "C" cudaError_t pica_canonical_signs_f32(const float* x, float* y, int64_t rows, int64_t n,
                                                cudaStream_t stream);
extern "C" cudaError_t pica_canonical_signs_f64(const double* x, double* y, int64_t rows, int64_t n,
                                                cudaStream_t stream);

namespace pica {
namespace {

at::Tensor canonicalize_signs_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() >= 1, "canonicalize_signs_cuda: contiguous CUDA rows");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (x.scalar_type() == at::kFloat) {
    err = pica_canonical_signs_f32(x.data_ptr<float>(), y.data_ptr<float>(), rows, n, stream);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kDouble, "canonicalize_signs_cuda: float32 or float64");
    err = pica_canonical_signs_f64(x.data_ptr<double>(), y.data_ptr<double>(), rows, n, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "canonical_signs kernel: ", cudaGetErrorString(err));
  return y;
}

// Installs the kernel when the library is loaded (PICA_SIGNS_ATEN=1 keeps the
// ATen path, e.g. to compare the two on a GPU).
struct RegisterSigns {
  RegisterSigns() {
    if (std::getenv("PICA_SIGNS_ATEN") == nullptr) g_canonicalize_signs_cuda = &canonicalize_signs_cuda;
  }
} register_signs;

}  // namespace
}  // namespace pica

TORCH_LIBRARY_IMPL(pica, CUDA, m) { m.impl("truncated_svd_core", &pica::truncated_svd_core); }
