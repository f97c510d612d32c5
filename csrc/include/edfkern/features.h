// CUDA launchers for segmented reductions over flat features (docs/ops.md: CC and DM). Torch-free (common.h).
// Groups in CSR form (groups.h): perm (may be null) and offsets are device int64 arrays.
#pragma once

#include <edfkern/groups.h>

struct CUstream_st;

namespace edfkern {
namespace cuda {

// mean (K, D) in acc.
int seg_mean(const void* x, DType dt, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K, int64_t D,
             void* mean, CUstream_st* stream);
// sq: device scalar in acc, sum_i ||x_i - mu_k||^2; ws: K*D doubles.
int cc_forward(const void* x, DType dt, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
               int64_t D, void* mean, void* sq, double* ws, CUstream_st* stream);
// out (N, D) in dt = coef * grad_out * (x_i - mu_k); grad_out: device scalar in acc.
int cc_backward(const void* grad_out, const void* x, DType dt, const int64_t* perm, const int64_t* offsets,
                int64_t N, int64_t K, int64_t D, const void* mean, double coef, void* out, CUstream_st* stream);

}  // namespace cuda
}  // namespace edfkern
