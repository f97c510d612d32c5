// The dtype rules of <edfkern/common.h> and <edfkern/dae.h> on torch's ScalarType, for the bindings
// (csrc/edfkern.cpp) and the CPU kernels. Only the four floating dtypes map (the checks refuse others).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <edfkern/common.h>

#include <type_traits>

namespace edfkern {

inline DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK_TYPE(false, "edfkern._C: unsupported dtype ", s);
  }
}

inline at::ScalarType scalar_type_of(DType d) {
  switch (d) {
    case DType::F32: return at::kFloat;
    case DType::F64: return at::kDouble;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
  }
  TORCH_CHECK(false, "edfkern._C: unknown DType");
}

// The accumulation dtype of a floating dtype (edfkern::acc_dtype).
inline at::ScalarType acc_dtype(at::ScalarType s) { return scalar_type_of(acc_dtype(dtype_of(s))); }

// torch's own rule (at::opmath_type, which some CPU kernels use inside AT_DISPATCH) is the same one.
static_assert(std::is_same<at::opmath_type<float>, acc_of<float>>::value &&
                  std::is_same<at::opmath_type<double>, acc_of<double>>::value &&
                  std::is_same<at::opmath_type<c10::Half>, acc_of<c10::Half>>::value &&
                  std::is_same<at::opmath_type<c10::BFloat16>, acc_of<c10::BFloat16>>::value,
              "at::opmath_type and edfkern::acc_of disagree");

}  // namespace edfkern
