// DAE (docs/ops.md) on CUDA; flat CAMs and NaN / inf follow docs/special-values.md. Kernel 1 (only when tau is the per-image mean): one block per image
// averages the upsampled map in float64. Kernel 2: one grid-stride pass over the gradient that
// upsamples the CAM on the fly (4 cached loads per element), thresholds, and applies the mask
// (dae_apply) or the fused SGD update (dae_sgd_step). No (N, H, W) map is ever written.
#include "common.cuh"

#include <edfkern/dae.h>

namespace edfkern {
namespace cuda {
namespace {

// U(cam) at (y, x), as F.interpolate computes it, except that four equal finite taps give their
// value exactly: so a flat map upsamples to itself (docs/special-values.md) without a per-image flag.
template <typename m_t>
__device__ __forceinline__ m_t upsampled(const m_t* cam, const DaeArgs& a, int64_t y, int64_t x) {
  int64_t y0, y1, x0, x1;
  m_t wy0, wy1, wx0, wx1;
  linear_src<m_t>(y, a.h, a.H, y0, y1, wy0, wy1);
  linear_src<m_t>(x, a.w, a.W, x0, x1, wx0, wx1);
  const m_t c00 = cam[y0 * a.w + x0], c01 = cam[y0 * a.w + x1], c10 = cam[y1 * a.w + x0], c11 = cam[y1 * a.w + x1];
  if (c00 == c01 && c00 == c10 && c00 == c11 && isfinite(c00)) return c00;
  return wy0 * (wx0 * c00 + wx1 * c01) + wy1 * (wx0 * c10 + wx1 * c11);
}

// tau[n] = mean over H*W of U(cam_n) (NaN / +-inf exactly when U holds them, as the loop's mean);
// a flat map (all values equal and finite) is its own mean.
template <typename m_t>
__global__ void tau_kernel(const m_t* __restrict__ cam, DaeArgs a, m_t* __restrict__ tau) {
  const int64_t n = blockIdx.x;
  const m_t* c = cam + n * a.h * a.w;
  const m_t big = static_cast<m_t>(INFINITY);
  m_t lo = big, hi = -big;
  int bad = 0;
  for (int64_t p = threadIdx.x; p < a.h * a.w; p += blockDim.x) {
    const m_t v = c[p];
    bad |= !isfinite(v);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  lo = block_reduce(lo, Min{}, big);
  hi = block_reduce(hi, Max{}, -big);
  bad = block_reduce(bad, Max{}, 0);
  double s = 0.0;
  for (int64_t p = threadIdx.x; p < a.H * a.W; p += blockDim.x) s += static_cast<double>(upsampled(c, a, p / a.W, p % a.W));
  s = block_reduce(s, Sum{}, 0.0);
  if (threadIdx.x == 0) tau[n] = (!bad && lo == hi) ? lo : static_cast<m_t>(s / static_cast<double>(a.H * a.W));
}

template <typename m_t>
__device__ __forceinline__ m_t mask_at(const m_t* cam, const m_t* tau, const DaeArgs& a, int64_t n, int64_t p) {
  const m_t u = upsampled(cam + n * a.h * a.w, a, p / a.W, p % a.W);
  const m_t t = a.has_thr ? static_cast<m_t>(a.thr) : tau[n];
  return u >= t ? u + static_cast<m_t>(a.beta) : m_t(1);
}

template <typename T, typename m_t>
__global__ void mask_kernel(const m_t* __restrict__ cam, const m_t* __restrict__ tau, DaeArgs a, T* __restrict__ out) {
  const int64_t HW = a.H * a.W, total = a.N * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = cast_to<T>(mask_at(cam, tau, a, i / HW, i % HW));
}

template <typename T, typename m_t>
__global__ void apply_kernel(T* __restrict__ grad, const m_t* __restrict__ cam, const m_t* __restrict__ tau, DaeArgs a) {
  const int64_t HW = a.H * a.W, total = a.N * a.C * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const m_t m = mask_at(cam, tau, a, i / (a.C * HW), i % HW);
    grad[i] = cast_to<T>(load<m_t>(grad + i) * m);
  }
}

template <typename T, typename m_t, bool kMomentum>
__global__ void sgd_kernel(T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ buf,
                           const m_t* __restrict__ cam, const m_t* __restrict__ tau, DaeArgs a, SgdArgs s) {
  const int64_t HW = a.H * a.W, total = a.N * a.C * HW;
  const m_t lr = static_cast<m_t>(s.lr), mom = static_cast<m_t>(s.momentum);
  const m_t damp1 = static_cast<m_t>(1.0 - s.dampening), wd = static_cast<m_t>(s.weight_decay);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    m_t d = load<m_t>(grad + i) * mask_at(cam, tau, a, i / (a.C * HW), i % HW);
    if (s.maximize) d = -d;
    const m_t p = load<m_t>(param + i);
    if (s.weight_decay != 0.0) d = d + wd * p;
    if (kMomentum) {
      const m_t b = s.first_step ? d : load<m_t>(buf + i) * mom + damp1 * d;
      const T bs = cast_to<T>(b);
      buf[i] = bs;
      const m_t bv = load<m_t>(&bs);
      d = s.nesterov ? d + mom * bv : bv;
    }
    param[i] = cast_to<T>(p - lr * d);
  }
}

constexpr int kThreads = 256;

template <typename m_t>
cudaError_t taus(const void* cam, const DaeArgs& a, void* tau_ws, cudaStream_t st) {
  if (a.has_thr) return cudaSuccess;
  tau_kernel<m_t><<<static_cast<unsigned int>(a.N), kThreads, 0, st>>>(static_cast<const m_t*>(cam), a,
                                                                        static_cast<m_t*>(tau_ws));
  return cudaGetLastError();
}

}  // namespace

int dae_mask(const void* cam, DType m, void* out, DType out_dtype, const DaeArgs& a, void* tau_ws,
             CUstream_st* stream) {
  if (a.N == 0 || a.H * a.W == 0) return cudaSuccess;
  auto go = [&](auto mt) -> cudaError_t {
    using m_t = decltype(mt);
    cudaError_t e = taus<m_t>(cam, a, tau_ws, stream);
    if (e != cudaSuccess) return e;
    return dispatch(out_dtype, [&](auto tt) -> cudaError_t {
      using T = decltype(tt);
      mask_kernel<T, m_t><<<blocks_for(a.N * a.H * a.W, kThreads), kThreads, 0, stream>>>(
          static_cast<const m_t*>(cam), static_cast<const m_t*>(tau_ws), a, static_cast<T*>(out));
      return cudaGetLastError();
    });
  };
  return m == DType::F64 ? go(double{}) : go(float{});
}

int dae_apply(void* grad, DType g_dtype, const void* cam, DType m, const DaeArgs& a, void* tau_ws,
              CUstream_st* stream) {
  if (a.N * a.C * a.H * a.W == 0) return cudaSuccess;
  auto go = [&](auto mt) -> cudaError_t {
    using m_t = decltype(mt);
    cudaError_t e = taus<m_t>(cam, a, tau_ws, stream);
    if (e != cudaSuccess) return e;
    return dispatch(g_dtype, [&](auto tt) -> cudaError_t {
      using T = decltype(tt);
      apply_kernel<T, m_t><<<blocks_for(a.N * a.C * a.H * a.W, kThreads), kThreads, 0, stream>>>(
          static_cast<T*>(grad), static_cast<const m_t*>(cam), static_cast<const m_t*>(tau_ws), a);
      return cudaGetLastError();
    });
  };
  return m == DType::F64 ? go(double{}) : go(float{});
}

int dae_sgd_step(void* param, const void* grad, void* buf, DType g_dtype, const void* cam, DType m,
                 const DaeArgs& a, const SgdArgs& s, void* tau_ws, CUstream_st* stream) {
  if (a.N * a.C * a.H * a.W == 0) return cudaSuccess;
  auto go = [&](auto mt) -> cudaError_t {
    using m_t = decltype(mt);
    cudaError_t e = taus<m_t>(cam, a, tau_ws, stream);
    if (e != cudaSuccess) return e;
    return dispatch(g_dtype, [&](auto tt) -> cudaError_t {
      using T = decltype(tt);
      const unsigned int blocks = blocks_for(a.N * a.C * a.H * a.W, kThreads);
      const m_t* c = static_cast<const m_t*>(cam);
      const m_t* tau = static_cast<const m_t*>(tau_ws);
      if (buf != nullptr && s.momentum != 0.0)
        sgd_kernel<T, m_t, true><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(param), static_cast<const T*>(grad),
                                                                  static_cast<T*>(buf), c, tau, a, s);
      else
        sgd_kernel<T, m_t, false><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(param),
                                                                   static_cast<const T*>(grad), nullptr, c, tau, a, s);
      return cudaGetLastError();
    });
  };
  return m == DType::F64 ? go(double{}) : go(float{});
}

}  // namespace cuda
}  // namespace edfkern
