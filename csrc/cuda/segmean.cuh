// Per-class mean over rows, shared by covariance.cu and features.cu.
#pragma once

#include "common.cuh"

#include <edfkern/groups.h>

namespace edfkern {
namespace cuda {

// grid (ceil(D / blockDim.x), classes from k0): thread (k, e) sums column e of class k's rows in ascending order.
template <typename T, typename A>
__global__ void seg_mean_kernel(const T* __restrict__ x, const int64_t* __restrict__ perm,
                                const int64_t* __restrict__ offsets, int64_t k0, int64_t D, A* __restrict__ mean) {
  const int64_t k = k0 + blockIdx.y;
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= D) return;
  const int64_t j0 = offsets[k], j1 = offsets[k + 1];
  A s = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t i = group_row(perm, j);
    s += load<A>(x + i * D + e);
  }
  const int64_t n = j1 - j0;
  mean[k * D + e] = s / static_cast<A>(n > 0 ? n : 1);
}

template <typename T, typename A>
cudaError_t launch_seg_mean(const T* x, const int64_t* perm, const int64_t* offsets, int64_t K, int64_t D, A* mean,
                            cudaStream_t stream) {
  if (K == 0 || D == 0) return cudaSuccess;
  for (int64_t k0 = 0; k0 < K; k0 += kMaxGridYZ) {
    const dim3 grid(static_cast<unsigned int>((D + 127) / 128), static_cast<unsigned int>(std::min(K - k0, kMaxGridYZ)));
    seg_mean_kernel<T, A><<<grid, 128, 0, stream>>>(x, perm, offsets, k0, D, mean);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace edfkern
