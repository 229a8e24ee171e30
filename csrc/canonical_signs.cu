// Fused canonical-sign kernel: flip each row of x (rows, n) so its
// largest-magnitude entry is positive (ties: the first index, as torch.argmax).
//
// ATen needs five launches for this (abs, argmax, gather, sign/where, mul) and
// runs it once per basis; on a GPU with hundreds of layers per model those
// launches dominate the tail of truncated_svd, so one launch (one block per row)
// replaces them. Includes only <cuda_runtime.h>: it compiles with a bare nvcc
// (tests/csrc/test_nvcc.py), and the ATen glue lives in svd_cuda.cpp.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void canonical_signs_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* yr = y + row * n;
  // Each thread scans a strided slice in increasing index order, so a strict
  // ">" keeps the first maximum; the reduction breaks ties by the smaller index.
  T best = T(-1);
  int64_t best_i = n;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const T v = xr[i] < T(0) ? -xr[i] : xr[i];
    if (v > best) {
      best = v;
      best_i = i;
    }
  }
  __shared__ T s_val[kThreads];
  __shared__ int64_t s_idx[kThreads];
  s_val[threadIdx.x] = best;
  s_idx[threadIdx.x] = best_i;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const T v = s_val[threadIdx.x + s];
      const int64_t i = s_idx[threadIdx.x + s];
      if (v > s_val[threadIdx.x] || (v == s_val[threadIdx.x] && i < s_idx[threadIdx.x])) {
        s_val[threadIdx.x] = v;
        s_idx[threadIdx.x] = i;
      }
    }
    __syncthreads();
  }
  // sign(x[argmax]) with sign(0) := +1, exactly as the ATen path (x * ±1 is exact).
  const T sign = xr[s_idx[0]] < T(0) ? T(-1) : T(1);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) yr[i] = xr[i] * sign;
}

template <typename T>
cudaError_t launch(const T* x, T* y, int64_t rows, int64_t n, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  canonical_signs_kernel<T><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t pica_canonical_signs_f32(const float* x, float* y, int64_t rows, int64_t n,
                                                cudaStream_t stream) {
  return launch<float>(x, y, rows, n, stream);
}

extern "C" cudaError_t pica_canonical_signs_f64(const double* x, double* y, int64_t rows, int64_t n,
                                                cudaStream_t stream) {
  return launch<double>(x, y, rows, n, stream);
}
