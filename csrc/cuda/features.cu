// Segmented reductions over flat features (docs/ops.md: CC and DM) on CUDA.
// seg_mean: one thread per (class, column). cc_forward: the same, plus a second sweep for the
// squared deviations, then a one-block deterministic reduction. cc_backward: one block per row.
#include "segmean.cuh"

#include <edfkern/features.h>

namespace edfkern {
namespace cuda {
namespace {

template <typename T, typename A>
__global__ void sq_kernel(const T* __restrict__ x, const int64_t* __restrict__ perm,
                          const int64_t* __restrict__ offsets, int64_t k0, int64_t D, const A* __restrict__ mean,
                          double* __restrict__ part) {
  const int64_t k = k0 + blockIdx.y;
  const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (e >= D) return;
  const A m = mean[k * D + e];
  A s = 0;
  for (int64_t j = offsets[k]; j < offsets[k + 1]; ++j) {
    const int64_t i = group_row(perm, j);
    const A v = load<A>(x + i * D + e) - m;
    s += v * v;
  }
  part[k * D + e] = static_cast<double>(s);
}

template <typename A>
__global__ void __launch_bounds__(1024) total_kernel(const double* __restrict__ part, int64_t n, A* out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
  s = block_reduce(s, Sum{}, 0.0);
  if (threadIdx.x == 0) *out = static_cast<A>(s);
}

template <typename T, typename A>
__global__ void cc_bwd_kernel(const A* __restrict__ go, A coef, const T* __restrict__ x,
                              const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets, int64_t K,
                              int64_t D, const A* __restrict__ mean, T* __restrict__ out) {
  const int64_t j = blockIdx.x;
  const int64_t k = group_of(offsets, K, j);
  const int64_t i = group_row(perm, j);
  const A s = coef * *go;
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x)
    out[i * D + e] = cast_to<T>((load<A>(x + i * D + e) - mean[k * D + e]) * s);
}

}  // namespace

int seg_mean(const void* x, DType dt, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K, int64_t D,
             void* mean, CUstream_st* stream) {
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    using A = acc_of<T>;
    return launch_seg_mean<T, A>(static_cast<const T*>(x), perm, offsets, K, D, static_cast<A*>(mean), stream);
  });
}

int cc_forward(const void* x, DType dt, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
               int64_t D, void* mean, void* sq, double* ws, CUstream_st* stream) {
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    using A = acc_of<T>;
    const T* xp = static_cast<const T*>(x);
    A* mp = static_cast<A*>(mean);
    cudaError_t e = launch_seg_mean<T, A>(xp, perm, offsets, K, D, mp, stream);
    if (e != cudaSuccess) return e;
    for (int64_t k0 = 0; k0 < K && D > 0; k0 += kMaxGridYZ) {
      const dim3 grid(static_cast<unsigned int>((D + 127) / 128), static_cast<unsigned int>(std::min(K - k0, kMaxGridYZ)));
      sq_kernel<T, A><<<grid, 128, 0, stream>>>(xp, perm, offsets, k0, D, mp, ws);
    }
    total_kernel<A><<<1, 1024, 0, stream>>>(ws, K * D, static_cast<A*>(sq));
    return cudaGetLastError();
  });
}

int cc_backward(const void* grad_out, const void* x, DType dt, const int64_t* perm, const int64_t* offsets,
                int64_t N, int64_t K, int64_t D, const void* mean, double coef, void* out, CUstream_st* stream) {
  if (N == 0 || D == 0) return cudaSuccess;
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    using A = acc_of<T>;
    cc_bwd_kernel<T, A><<<static_cast<unsigned int>(N), 256, 0, stream>>>(
        static_cast<const A*>(grad_out), static_cast<A>(coef), static_cast<const T*>(x), perm, offsets, K, D,
        static_cast<const A*>(mean), static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace edfkern
