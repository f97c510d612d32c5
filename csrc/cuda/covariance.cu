// Local covariance (docs/ops.md) on CUDA.
// Forward: per-class means, then Sigma_k = Y_k Y_k^T / n_k as a tiled GEMM whose reduction runs over
// (row, l) pairs of class k, with Y_k = x_i - mean_k formed on the fly while loading the tiles.
// Full IEEE fp32 FMAs (no TF32), fp64 for fp64. Backward: one block per row, grad = M_k (x_i - mean_k).
// No per-sample (C, C) product and no centred copy of x is ever stored.
#include "segmean.cuh"

#include <edfkern/covariance.h>

namespace edfkern {
namespace cuda {
namespace {

constexpr int kTile = 16;

// grid (ceil(C/16), ceil(C/16), classes from k0), block (16, 16): sigma[k, a0+ty, b0+tx].
template <typename T, typename A>
__global__ void gram_kernel(const T* __restrict__ x, const int64_t* __restrict__ perm,
                            const int64_t* __restrict__ offsets, int64_t k0, int64_t C, int64_t L,
                            const A* __restrict__ mean, A* __restrict__ sigma) {
  __shared__ A As[kTile][kTile + 1];
  __shared__ A Bs[kTile][kTile + 1];
  const int64_t k = k0 + blockIdx.z;
  const int64_t a0 = blockIdx.y * kTile, b0 = blockIdx.x * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j0 = offsets[k], n = offsets[k + 1] - j0, R = n * L;
  const A* mk = mean + k * C * L;
  A acc = 0;
  for (int64_t r0 = 0; r0 < R; r0 += kTile) {
    const int64_t r = r0 + tx;
    A va = 0, vb = 0;
    if (r < R) {
      const int64_t j = r / L, l = r % L;
      const int64_t i = group_row(perm, j0 + j);
      const T* xr = x + i * C * L;
      const int64_t a = a0 + ty, b = b0 + ty;
      if (a < C) va = load<A>(xr + a * L + l) - mk[a * L + l];
      if (b < C) vb = load<A>(xr + b * L + l) - mk[b * L + l];
    }
    As[ty][tx] = va;
    Bs[ty][tx] = vb;
    __syncthreads();
    A part = 0;  // a tile's 16 products first, then the running sum: error ~ (16 + R / 16) ulps, not R
#pragma unroll
    for (int q = 0; q < kTile; ++q) part += As[ty][q] * Bs[tx][q];
    acc += part;
    __syncthreads();
  }
  const int64_t a = a0 + ty, b = b0 + tx;
  if (a < C && b < C) sigma[(k * C + a) * C + b] = n > 0 ? acc / static_cast<A>(n) : A(0);
}

// One block per sorted row j: out[i, a, l] = sum_b M_k[a, b] (x[i, b, l] - mean_k[b, l]).
template <typename T, typename A>
__global__ void cov_bwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ perm,
                               const int64_t* __restrict__ offsets, int64_t K, int64_t C, int64_t L,
                               const A* __restrict__ mean, const A* __restrict__ M, T* __restrict__ out) {
  const int64_t j = blockIdx.x;
  const int64_t k = group_of(offsets, K, j);
  const int64_t i = group_row(perm, j);
  const T* xr = x + i * C * L;
  const A* mk = mean + k * C * L;
  const A* Mk = M + k * C * C;
  for (int64_t e = threadIdx.x; e < C * L; e += blockDim.x) {
    const int64_t a = e / L, l = e % L;
    A s = 0;
    for (int64_t b = 0; b < C; ++b) s += Mk[a * C + b] * (load<A>(xr + b * L + l) - mk[b * L + l]);
    out[i * C * L + e] = cast_to<T>(s);
  }
}

}  // namespace

int cov_forward(const void* x, DType dt, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
                int64_t C, int64_t L, void* sigma, void* mean, CUstream_st* stream) {
  if (K == 0 || C == 0) return cudaSuccess;
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    using A = acc_of<T>;
    const T* xp = static_cast<const T*>(x);
    cudaError_t e = launch_seg_mean<T, A>(xp, perm, offsets, K, C * L, static_cast<A*>(mean), stream);
    if (e != cudaSuccess) return e;
    const unsigned int t = static_cast<unsigned int>((C + kTile - 1) / kTile);
    for (int64_t k0 = 0; k0 < K; k0 += kMaxGridYZ) {
      const dim3 grid(t, t, static_cast<unsigned int>(std::min(K - k0, kMaxGridYZ)));
      gram_kernel<T, A><<<grid, dim3(kTile, kTile), 0, stream>>>(xp, perm, offsets, k0, C, L,
                                                                 static_cast<const A*>(mean), static_cast<A*>(sigma));
    }
    return cudaGetLastError();
  });
}

int cov_backward(const void* x, DType dt, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
                 int64_t C, int64_t L, const void* mean, const void* M, void* out, CUstream_st* stream) {
  if (N == 0 || C * L == 0) return cudaSuccess;
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    using A = acc_of<T>;
    cov_bwd_kernel<T, A><<<static_cast<unsigned int>(N), 256, 0, stream>>>(
        static_cast<const T*>(x), perm, offsets, K, C, L, static_cast<const A*>(mean), static_cast<const A*>(M),
        static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace edfkern
