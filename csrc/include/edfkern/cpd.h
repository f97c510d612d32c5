// CPD (docs/ops.md): the order-preserving float sort key shared by the CPU and CUDA radix selects,
// and the CUDA launchers (radix select on the keys, all on the device: no host synchronisation,
// stable-sort tie-break, kept sums). Torch-free (common.h).
#pragma once

#include <cstddef>
#include <cstring>

#include <edfkern/common.h>

struct CUstream_st;

namespace edfkern {

template <typename A>
struct SortKey;
template <>
struct SortKey<float> {
  using type = uint32_t;
};
template <>
struct SortKey<double> {
  using type = uint64_t;
};
template <typename A>
using sort_key_t = typename SortKey<A>::type;

// Monotone map float -> unsigned: a < b  <=>  to_key(a) < to_key(b), and -0 == +0. Every NaN (either
// sign, any payload) maps to the largest key, so NaNs sort after +inf and tie among themselves,
// as in torch.sort (docs/special-values.md); from_key of that key is a NaN.
template <typename A>
EDFKERN_HD sort_key_t<A> to_key(A v) {
  using U = sort_key_t<A>;
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  if (v != v) return ~U(0);
  if (v == A(0)) return sign;
  U u;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 4) u = __float_as_uint(v);
  else u = static_cast<U>(__double_as_longlong(v));
#else
  std::memcpy(&u, &v, sizeof(U));
#endif
  return (u & sign) ? ~u : (u | sign);
}

template <typename A>
EDFKERN_HD A from_key(sort_key_t<A> u) {
  using U = sort_key_t<A>;
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  u = (u & sign) ? (u & ~sign) : ~u;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 4) return __uint_as_float(u);
  else return __longlong_as_double(static_cast<long long>(u));
#else
  A v;
  std::memcpy(&v, &u, sizeof(U));
  return v;
#endif
}

namespace cuda {

// Bytes of device workspace for P elements (select state, one histogram, per-chunk counts).
size_t cpd_workspace_bytes(int64_t P);

// s, t, s0: (P,) in dt. Outputs are device scalars: sum_l, sum_d, thr in acc, tie int64.
int cpd_forward(const void* s, const void* t, const void* s0, DType dt, int64_t P, int64_t k, void* sum_l,
                void* sum_d, void* thr, int64_t* tie, void* ws, CUstream_st* stream);
// grad_out, thr, sum_d: device scalars in acc; out (P,) in dt.
int cpd_backward(const void* grad_out, const void* s, const void* t, DType dt, int64_t P, const void* thr,
                 const int64_t* tie, const void* sum_d, void* out, CUstream_st* stream);
// l: (P,) in dt; out: (P,) bool (1 byte each).
int cpd_keep_mask(const void* l, DType dt, int64_t P, int64_t k, bool* out, void* ws, CUstream_st* stream);

}  // namespace cuda
}  // namespace edfkern
