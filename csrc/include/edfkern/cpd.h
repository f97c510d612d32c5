// CUDA launchers for CPD (docs/ops.md): radix select on order-preserving float bits, all on
// the device (no host synchronisation), stable-sort tie-break, kept sums. Plain C++.
#pragma once

#include <cstddef>

#include <edfkern/common.h>

struct CUstream_st;

namespace edfkern {
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
