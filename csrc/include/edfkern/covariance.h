// CUDA launchers for local covariance (docs/ops.md). Torch-free (common.h).
// Groups in CSR form (groups.h): perm (may be null) and offsets are device int64 arrays.
#pragma once

#include <edfkern/groups.h>

struct CUstream_st;

namespace edfkern {
namespace cuda {

// x (N, C, L) in dt; sigma (K, C, C) and mean (K, C, L) in acc.
int cov_forward(const void* x, DType dt, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
                int64_t C, int64_t L, void* sigma, void* mean, CUstream_st* stream);
// grad_i = M_k (x_i - mean_k): mean (K, C, L), M (K, C, C) in acc; out (N, C, L) in dt.
int cov_backward(const void* x, DType dt, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
                 int64_t C, int64_t L, const void* mean, const void* M, void* out, CUstream_st* stream);

}  // namespace cuda
}  // namespace edfkern
