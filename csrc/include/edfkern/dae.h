// CUDA launchers for DAE (docs/ops.md). Plain C++: raw pointers, sizes and a stream.
// `cam` is (N, h, w) already in the mask dtype `m` (F32, or F64 when cam or grad is float64);
// `tau_ws` is a workspace of N elements of the mask dtype (per-image thresholds).
// Every launcher returns a cudaError_t value (0 = success).
#pragma once

#include <edfkern/common.h>

struct CUstream_st;

namespace edfkern {
namespace cuda {

struct DaeArgs {
  int64_t N, C, h, w, H, W;
  bool has_thr;   // false: tau = per-image mean of the upsampled map
  double thr, beta;
};

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

// out (N, 1, H, W) in out_dtype = mask.
int dae_mask(const void* cam, DType m, void* out, DType out_dtype, const DaeArgs& a, void* tau_ws,
             CUstream_st* stream);
// grad (N, C, H, W) in g_dtype: grad *= mask.
int dae_apply(void* grad, DType g_dtype, const void* cam, DType m, const DaeArgs& a, void* tau_ws,
              CUstream_st* stream);
// torch.optim.SGD's update on d = grad * mask; buf may be null (momentum == 0).
int dae_sgd_step(void* param, const void* grad, void* buf, DType g_dtype, const void* cam, DType m,
                 const DaeArgs& a, const SgdArgs& s, void* tau_ws, CUstream_st* stream);

}  // namespace cuda
}  // namespace edfkern
