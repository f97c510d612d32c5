// DAE (docs/ops.md) on CUDA; flat CAMs and NaN / inf follow docs/special-values.md. The same
// algorithm as the CPU kernel (csrc/cpu/dae.cpp), through the same functions of <edfkern/dae.h>:
//   1. (only when tau is the per-image mean) one thread per axis sums the bilinear weights each
//      low-resolution line gets (dae_axis_mass);
//   2. one block per image: is the map flat (all values equal and finite: U(cam) is that constant)?
//      and, when tau is the mean: a flat map's value; for a finite map the separable sum of the
//      low-resolution CAM (dae_separable_mean, on one thread, in the CPU's order); for a map with
//      NaN / inf the mean of U(cam) itself (NaN or +-inf exactly when the CPU's is);
//   3. one grid-stride pass over the gradient that upsamples the CAM on the fly (4 cached loads per
//      element), thresholds (MaskRule) and applies the mask (dae_apply) or the fused SGD
//      update (SgdArgs::step). No (N, H, W) map is ever written.
#include "common.cuh"

#include <edfkern/dae.h>

namespace edfkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// The workspace: the masses of both axes (h + w doubles), then per image tau (8 bytes) and flat (1 byte).
struct Ws {
  double* mass;
  void* tau;
  unsigned char* flat;
};

Ws carve(void* ws, const DaeShape& s) {
  char* p = static_cast<char*>(ws);
  return Ws{reinterpret_cast<double*>(p), p + (s.h + s.w) * sizeof(double),
            reinterpret_cast<unsigned char*>(p + (s.h + s.w + s.N) * sizeof(double))};
}

template <typename m_t>
__global__ void mass_kernel(DaeShape s, double* __restrict__ mass) {
  if (threadIdx.x == 0) dae_axis_mass<m_t>(s.h, s.H, mass);
  if (threadIdx.x == 1) dae_axis_mass<m_t>(s.w, s.W, mass + s.h);
}

template <typename m_t>
__global__ void image_kernel(const m_t* __restrict__ cam, DaeShape s, bool need_tau, const double* __restrict__ mass,
                             m_t* __restrict__ tau, unsigned char* __restrict__ flat) {
  const int64_t n = blockIdx.x, hw = s.h * s.w, HW = s.H * s.W;
  const m_t* c = cam + n * hw;
  const m_t big = static_cast<m_t>(INFINITY);
  m_t lo = big, hi = -big;
  int bad = 0;
  for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
    const m_t v = c[p];
    bad |= !isfinite(v);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  lo = block_reduce(lo, Min{}, big);
  hi = block_reduce(hi, Max{}, -big);
  bad = block_reduce(bad, Max{}, 0);
  const bool is_flat = !bad && lo == hi;  // the same in every thread: the branches below are uniform
  if (threadIdx.x == 0) flat[n] = is_flat;
  if (!need_tau) return;
  if (is_flat || !bad) {
    if (threadIdx.x == 0) tau[n] = is_flat ? lo : dae_separable_mean(c, s.h, s.w, mass, mass + s.h, HW);
    return;
  }
  double sum = 0.0;
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x)
    sum += static_cast<double>(bilinear_at(c, s.h, s.w, s.H, s.W, p / s.W, p % s.W));
  sum = block_reduce(sum, Sum{}, 0.0);
  if (threadIdx.x == 0) tau[n] = static_cast<m_t>(sum / static_cast<double>(HW));
}

// The mask at pixel p of image n.
template <typename m_t>
__device__ __forceinline__ m_t mask_at(const m_t* cam, const m_t* tau, const unsigned char* flat, const DaeShape& s,
                                       const DaeArgs& a, int64_t n, int64_t p) {
  const m_t* c = cam + n * s.h * s.w;
  const m_t u = flat[n] ? c[0] : bilinear_at(c, s.h, s.w, s.H, s.W, p / s.W, p % s.W);
  return MaskRule<m_t>::of(a)(u, a.has_threshold ? static_cast<m_t>(a.threshold) : tau[n]);
}

template <typename T, typename m_t>
__global__ void mask_kernel(const m_t* __restrict__ cam, const m_t* __restrict__ tau,
                            const unsigned char* __restrict__ flat, DaeShape s, DaeArgs a, T* __restrict__ out) {
  const int64_t HW = s.H * s.W, total = s.N * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = cast_to<T>(mask_at(cam, tau, flat, s, a, i / HW, i % HW));
}

template <typename T, typename m_t>
__global__ void apply_kernel(T* __restrict__ grad, const m_t* __restrict__ cam, const m_t* __restrict__ tau,
                             const unsigned char* __restrict__ flat, DaeShape s, DaeArgs a) {
  const int64_t HW = s.H * s.W, total = s.N * s.C * HW;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const m_t m = mask_at(cam, tau, flat, s, a, i / (s.C * HW), i % HW);
    grad[i] = cast_to<T>(load<m_t>(grad + i) * m);
  }
}

template <typename T, typename m_t, bool kMomentum>
__global__ void sgd_kernel(T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ buf,
                           const m_t* __restrict__ cam, const m_t* __restrict__ tau,
                           const unsigned char* __restrict__ flat, DaeShape s, DaeArgs a, SgdArgs sgd) {
  const int64_t HW = s.H * s.W, total = s.N * s.C * HW;
  const bool decay = sgd.weight_decay != 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const m_t gm = load<m_t>(grad + i) * mask_at(cam, tau, flat, s, a, i / (s.C * HW), i % HW);
    const m_t b = kMomentum ? load<m_t>(buf + i) : m_t(0);
    param[i] = cast_to<T>(sgd.step(gm, load<m_t>(param + i), b, kMomentum, sgd.nesterov, decay, [&](m_t v) {
      const T q = cast_to<T>(v);
      buf[i] = q;
      return load<m_t>(&q);
    }));
  }
}

// Steps 1 and 2, then launch(m_t{}, cam, tau, flat) for step 3; m_t is the mask dtype (float or double).
template <typename F>
cudaError_t with_image_stats(const void* cam, DType m, const DaeShape& s, const DaeArgs& a, void* ws,
                             cudaStream_t st, F&& launch) {
  const Ws w = carve(ws, s);
  auto go = [&](auto mt) -> cudaError_t {
    using m_t = decltype(mt);
    const m_t* c = static_cast<const m_t*>(cam);
    m_t* tau = static_cast<m_t*>(w.tau);
    if (!a.has_threshold) mass_kernel<m_t><<<1, 32, 0, st>>>(s, w.mass);
    image_kernel<m_t><<<static_cast<unsigned int>(s.N), kThreads, 0, st>>>(c, s, !a.has_threshold, w.mass, tau, w.flat);
    const cudaError_t e = cudaGetLastError();
    return e != cudaSuccess ? e : launch(mt, c, static_cast<const m_t*>(tau), static_cast<const unsigned char*>(w.flat));
  };
  return m == DType::F64 ? go(double{}) : go(float{});
}

}  // namespace

size_t dae_workspace_bytes(const DaeShape& s) {
  return static_cast<size_t>(s.h + s.w + s.N) * sizeof(double) + static_cast<size_t>(s.N);
}

int dae_mask(const void* cam, DType m, void* out, DType out_dtype, const DaeShape& s, const DaeArgs& a, void* ws,
             CUstream_st* stream) {
  if (s.N * s.H * s.W == 0) return cudaSuccess;
  return with_image_stats(cam, m, s, a, ws, stream, [&](auto mt, auto c, auto tau, auto flat) -> cudaError_t {
    using m_t = decltype(mt);
    return dispatch(out_dtype, [&](auto tt) -> cudaError_t {
      using T = decltype(tt);
      mask_kernel<T, m_t><<<blocks_for(s.N * s.H * s.W, kThreads), kThreads, 0, stream>>>(c, tau, flat, s, a,
                                                                                       static_cast<T*>(out));
      return cudaGetLastError();
    });
  });
}

int dae_apply(void* grad, DType g_dtype, const void* cam, DType m, const DaeShape& s, const DaeArgs& a, void* ws,
              CUstream_st* stream) {
  if (s.N * s.C * s.H * s.W == 0) return cudaSuccess;
  return with_image_stats(cam, m, s, a, ws, stream, [&](auto mt, auto c, auto tau, auto flat) -> cudaError_t {
    using m_t = decltype(mt);
    return dispatch(g_dtype, [&](auto tt) -> cudaError_t {
      using T = decltype(tt);
      apply_kernel<T, m_t><<<blocks_for(s.N * s.C * s.H * s.W, kThreads), kThreads, 0, stream>>>(
          static_cast<T*>(grad), c, tau, flat, s, a);
      return cudaGetLastError();
    });
  });
}

int dae_sgd_step(void* param, const void* grad, void* buf, DType g_dtype, const void* cam, DType m,
                 const DaeShape& s, const DaeArgs& a, const SgdArgs& sgd, void* ws, CUstream_st* stream) {
  if (s.N * s.C * s.H * s.W == 0) return cudaSuccess;
  return with_image_stats(cam, m, s, a, ws, stream, [&](auto mt, auto c, auto tau, auto flat) -> cudaError_t {
    using m_t = decltype(mt);
    return dispatch(g_dtype, [&](auto tt) -> cudaError_t {
      using T = decltype(tt);
      const unsigned int blocks = blocks_for(s.N * s.C * s.H * s.W, kThreads);
      T* p = static_cast<T*>(param);
      const T* g = static_cast<const T*>(grad);
      if (buf != nullptr)
        sgd_kernel<T, m_t, true><<<blocks, kThreads, 0, stream>>>(p, g, static_cast<T*>(buf), c, tau, flat, s, a, sgd);
      else
        sgd_kernel<T, m_t, false><<<blocks, kThreads, 0, stream>>>(p, g, nullptr, c, tau, flat, s, a, sgd);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace edfkern
