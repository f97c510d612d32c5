// Device helpers shared by the .cu files: element conversions, the dtype dispatch, block reductions
// (the accumulation rule itself is edfkern::acc_of in <edfkern/common.h>). Torch-free: see common.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include <edfkern/common.h>

namespace edfkern {
namespace cuda {

template <typename A, typename T>
__device__ __forceinline__ A load(const T* p) { return static_cast<A>(*p); }
template <>
__device__ __forceinline__ float load<float, __half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load<float, __nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ double load<double, __half>(const __half* p) { return static_cast<double>(__half2float(*p)); }
template <>
__device__ __forceinline__ double load<double, __nv_bfloat16>(const __nv_bfloat16* p) {
  return static_cast<double>(__bfloat162float(*p));
}

template <typename T, typename A>
__device__ __forceinline__ T cast_to(A v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half cast_to<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __half cast_to<__half, double>(double v) { return __double2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 cast_to<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 cast_to<__nv_bfloat16, double>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));  // double -> float -> bf16 (as rare as fp64 grads with bf16)
}

// The largest gridDim.y and gridDim.z CUDA launches: kernels with one block row per class launch
// their K classes in chunks of at most this many, starting at class k0.
constexpr int64_t kMaxGridYZ = 65535;

// Call f(T{}) with T the element type of dtype d.
template <typename F>
inline cudaError_t dispatch(DType d, F&& f) {
  switch (d) {
    case DType::F32: return f(float{});
    case DType::F64: return f(double{});
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Sum / min / max over a block (blockDim.x a multiple of 32, at most 1024). Result valid in every thread.
template <typename A, typename Op>
__device__ A block_reduce(A v, Op op, A identity) {
  __shared__ unsigned char raw[32 * sizeof(double)];
  A* sh = reinterpret_cast<A*>(raw);
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < nw ? sh[lane] : identity;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  v = sh[0];
  __syncthreads();
  return v;
}

struct Sum {
  template <typename A>
  __device__ A operator()(A a, A b) const { return a + b; }
};
struct Min {
  template <typename A>
  __device__ A operator()(A a, A b) const { return b < a ? b : a; }
};
struct Max {
  template <typename A>
  __device__ A operator()(A a, A b) const { return b > a ? b : a; }
};
// torch.amin / amax semantics: NaN wins (Min / Max above drop a NaN in b); min_nan / max_nan of common.h.
struct NanMin {
  template <typename A>
  __device__ A operator()(A a, A b) const { return min_nan(a, b); }
};
struct NanMax {
  template <typename A>
  __device__ A operator()(A a, A b) const { return max_nan(a, b); }
};

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline unsigned int blocks_for(int64_t n, int threads, int64_t cap = 65535LL * 32) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return static_cast<unsigned int>(b < cap ? b : cap);
}

}  // namespace cuda
}  // namespace edfkern
