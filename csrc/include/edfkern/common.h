// Plain C++ helpers shared by the CPU kernels and the CUDA kernels (no torch headers).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EDFKERN_HD __host__ __device__ __forceinline__
#else
#define EDFKERN_HD inline
#endif

namespace edfkern {

// Element dtypes the launchers take (tensors arrive as raw pointers).
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Bilinear source index for one output coordinate, exactly as PyTorch's
// upsample_bilinear2d with align_corners=False and no scale factor:
//   src = (in/out) * (dst + 0.5) - 0.5, clamped at 0; i0 = min(floor(src), in-1);
//   i1 = i0 + (i0 < in-1); l1 = clamp(src - i0, 0, 1); l0 = 1 - l1.
template <typename acc_t>
EDFKERN_HD void linear_src(int64_t dst, int64_t in, int64_t out, int64_t& i0, int64_t& i1, acc_t& l0, acc_t& l1) {
  if (in == out) {
    i0 = dst;
    i1 = dst;
    l0 = acc_t(1);
    l1 = acc_t(0);
    return;
  }
  const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
  acc_t src = scale * (static_cast<acc_t>(dst) + acc_t(0.5)) - acc_t(0.5);
  if (src < acc_t(0)) src = acc_t(0);
  int64_t f = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  i0 = f < in - 1 ? f : in - 1;
  i1 = i0 + (i0 < in - 1 ? 1 : 0);
  acc_t l = src - static_cast<acc_t>(i0);
  l = l < acc_t(0) ? acc_t(0) : (l > acc_t(1) ? acc_t(1) : l);
  l1 = l;
  l0 = acc_t(1) - l;
}

}  // namespace edfkern
