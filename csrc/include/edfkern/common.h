// Types and rules shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
//
// The torch-free rule: everything under csrc/include/edfkern and every csrc/cuda/*.cu file is
// plain C++/CUDA with no torch, ATen or c10 header. nvcc compiles the .cu files, and the torch
// CPU wheel (what CI and the GPU-less build machines have) lacks the generated CUDA headers that
// torch's CUDA side needs; so tensors cross into CUDA code as raw pointers, sizes, a DType and a
// stream, and the launchers take the plain structs declared in these headers. The torch side of
// a CUDA call (checks, allocation, device guard) lives in csrc/edfkern.cpp; only
// csrc/cuda/stream.cpp includes c10/cuda headers.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define EDFKERN_HD __host__ __device__ __forceinline__
#else
#define EDFKERN_HD inline
#endif

namespace edfkern {

// Element dtypes the CUDA launchers take (tensors arrive as raw pointers).
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// The accumulation rule: float64 inputs compute in double; float32, float16 and bfloat16 in float.
// acc_of<T> is the rule on element types (host: double / c10::Half / ...; device: double / __half / ...),
// acc_dtype the same rule on DType values (torch's ScalarType goes through it: csrc/dtypes.h).
template <typename T>
using acc_of = std::conditional_t<std::is_same<T, double>::value, double, float>;
constexpr DType acc_dtype(DType d) { return d == DType::F64 ? DType::F64 : DType::F32; }

// torch.relu / amin / amax semantics: a NaN stays NaN (x > 0 ? x : 0 and a plain min / max would drop it).
template <typename T>
EDFKERN_HD T relu_nan(T v) { return v < T(0) ? T(0) : v; }
template <typename T>
EDFKERN_HD T min_nan(T a, T b) { return (a != a || b != b) ? a + b : (b < a ? b : a); }
template <typename T>
EDFKERN_HD T max_nan(T a, T b) { return (a != a || b != b) ? a + b : (b > a ? b : a); }

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

// U(map) at output pixel (y, x): the (h, w) map bilinearly upsampled to (H, W), rows first, in the
// order the CPU kernels' separable passes use (horizontal, then vertical).
template <typename acc_t>
EDFKERN_HD acc_t bilinear_at(const acc_t* map, int64_t h, int64_t w, int64_t H, int64_t W, int64_t y, int64_t x) {
  int64_t y0, y1, x0, x1;
  acc_t wy0, wy1, wx0, wx1;
  linear_src<acc_t>(y, h, H, y0, y1, wy0, wy1);
  linear_src<acc_t>(x, w, W, x0, x1, wx0, wx1);
  return wy0 * (wx0 * map[y0 * w + x0] + wx1 * map[y0 * w + x1]) + wy1 * (wx0 * map[y1 * w + x0] + wx1 * map[y1 * w + x1]);
}

}  // namespace edfkern
