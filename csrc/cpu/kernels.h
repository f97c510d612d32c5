// CPU kernels of the backend contract (edfkern/reference/__init__.py), one family per .cpp.
// The bindings (csrc/edfkern.cpp) have checked every argument; tensors arrive contiguous on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <edfkern/dae.h>
#include <edfkern/gradcam.h>

#include <optional>
#include <tuple>
#include <utility>

namespace edfkern {
namespace cpu {

// dae.cpp; cam_m is the CAM in the mask dtype (edfkern::dae_mask_dtype); buf is undefined without momentum.
at::Tensor dae_mask(const at::Tensor& cam_m, at::ScalarType out_dtype, int64_t H, int64_t W, const DaeArgs& a);
void dae_(const at::Tensor& grad, const at::Tensor& cam_m, const DaeArgs& a);
void dae_sgd_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& buf, const at::Tensor& cam_m,
                   const DaeArgs& a, const SgdArgs& s);

// gradcam.cpp
at::Tensor grad_cam(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& A_clean,
                    CamMethod method, bool normalize, std::optional<std::pair<int64_t, int64_t>> size);

// cpd.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpd_forward(const at::Tensor& student,
                                                                       const at::Tensor& target,
                                                                       const at::Tensor& start, int64_t k);
at::Tensor cpd_backward(const at::Tensor& grad_out, const at::Tensor& student, const at::Tensor& target,
                        const at::Tensor& start, const at::Tensor& thr, const at::Tensor& tie,
                        const at::Tensor& sum_d);
at::Tensor cpd_keep_mask(const at::Tensor& l, int64_t k);

// covariance.cpp
std::tuple<at::Tensor, at::Tensor> cov_forward(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                               const at::Tensor& offsets);
at::Tensor cov_backward(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets,
                        const at::Tensor& mean, const at::Tensor& M);

// features.cpp
at::Tensor seg_mean(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets);
std::tuple<at::Tensor, at::Tensor> cc_forward(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                              const at::Tensor& offsets);
at::Tensor cc_backward(const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& perm,
                       const at::Tensor& offsets, const at::Tensor& mean, double coef);

}  // namespace cpu
}  // namespace edfkern
