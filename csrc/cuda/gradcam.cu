// Grad-CAM (docs/ops.md) on CUDA. Kernel 1: one block per (image, channel) reduces over h*w
// (and the S noisy passes) to the channel weight. Kernel 2: one block per image forms the map,
// ReLU, min-max normalises it (block reductions) and writes it, upsampled when asked.
#include "common.cuh"

#include <edfkern/gradcam.h>

namespace edfkern {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, typename A>
__global__ void weights_kernel(const T* __restrict__ Aall, const T* __restrict__ Gall, const T* __restrict__ Aclean,
                               CamMethod method, int64_t S, int64_t NC, int64_t hw, A* __restrict__ wts) {
  const int64_t nc = blockIdx.x;
  const int64_t slice = NC * hw, base = nc * hw;
  const T* g_last = Gall + (S - 1) * slice + base;
  const A eps = static_cast<A>(1e-8);
  if (method == CamMethod::GradCAM) {
    A s = 0;
    for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) s += load<A>(g_last + p);
    s = block_reduce(s, Sum{}, A(0));
    if (threadIdx.x == 0) wts[nc] = s / static_cast<A>(hw);
    return;
  }
  const bool smooth = method == CamMethod::Smooth;
  const T* act = smooth ? Aclean + base : Aall + (S - 1) * slice + base;
  auto moments = [&](int64_t p, A& d2, A& d3) {
    if (!smooth) {
      const A v = load<A>(g_last + p);
      d2 = v * v;
      d3 = v * v * v;
      return;
    }
    d2 = 0;
    d3 = 0;
    for (int64_t s = 0; s < S; ++s) {
      const A v = load<A>(Gall + s * slice + base + p);
      const A v2 = v * v;
      d2 += v2;
      d3 += v2 * v;
    }
    d2 = d2 / static_cast<A>(S);
    d3 = d3 / static_cast<A>(S);
  };
  A den = 0;
  for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
    A d2, d3;
    moments(p, d2, d3);
    den += load<A>(act + p) * d3;
  }
  den = block_reduce(den, Sum{}, A(0));
  A wsum = 0;
  for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
    A d2, d3;
    moments(p, d2, d3);
    const A alpha = d2 / (A(2) * d2 + den + eps);
    const A gv = load<A>(g_last + p);
    wsum += alpha * relu_nan(gv);
  }
  wsum = block_reduce(wsum, Sum{}, A(0));
  if (threadIdx.x == 0) wts[nc] = wsum;
}

template <typename T, typename A>
__global__ void map_kernel(const T* __restrict__ Alast, const A* __restrict__ wts, int64_t C, int64_t h, int64_t w,
                           int64_t H, int64_t W, bool normalize, bool resize, A* __restrict__ cam_ws,
                           A* __restrict__ out) {
  const int64_t n = blockIdx.x, hw = h * w;
  A* cam = cam_ws + n * hw;
  A lo = A(0), hi = A(0);
  bool first = true;
  for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) {
    A v = 0;
    for (int64_t c = 0; c < C; ++c) v += wts[n * C + c] * load<A>(Alast + (n * C + c) * hw + p);
    v = relu_nan(v);
    cam[p] = v;
    lo = first ? v : NanMin{}(lo, v);
    hi = first ? v : NanMax{}(hi, v);
    first = false;
  }
  if (normalize) {  // as the loop: cam - amin, then / (amax of that + eps); a NaN anywhere spreads to the map
    const A big = static_cast<A>(INFINITY);
    lo = block_reduce(first ? big : lo, NanMin{}, big);
    for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) cam[p] = cam[p] - lo;
    hi = block_reduce(first ? -big : hi - lo, NanMax{}, -big);
    const A den = hi + static_cast<A>(1e-8);
    for (int64_t p = threadIdx.x; p < hw; p += blockDim.x) cam[p] = cam[p] / den;
  }
  __syncthreads();
  A* o = out + n * H * W;
  if (!resize) {
    for (int64_t q = threadIdx.x; q < hw; q += blockDim.x) o[q] = cam[q];
    return;
  }
  for (int64_t q = threadIdx.x; q < H * W; q += blockDim.x) {
    o[q] = bilinear_at<A>(cam, h, w, H, W, q / W, q % W);
  }
}

}  // namespace

int grad_cam(const void* A, const void* G, const void* A_clean, DType dt, CamMethod method, bool normalize,
             int64_t S, int64_t N, int64_t C, int64_t h, int64_t w, int64_t H, int64_t W, bool resize, void* out,
             void* ws, CUstream_st* stream) {
  if (N == 0) return cudaSuccess;
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    using Acc = acc_of<T>;
    const T* a = static_cast<const T*>(A);
    Acc* wts = static_cast<Acc*>(ws);
    Acc* cam = wts + N * C;
    weights_kernel<T, Acc><<<static_cast<unsigned int>(N * C), kThreads, 0, stream>>>(
        a, static_cast<const T*>(G), static_cast<const T*>(A_clean), method, S, N * C, h * w, wts);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    map_kernel<T, Acc><<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(
        a + (S - 1) * N * C * h * w, wts, C, h, w, H, W, normalize, resize, cam, static_cast<Acc*>(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace edfkern
