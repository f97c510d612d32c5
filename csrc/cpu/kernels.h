// CPU kernels of the backend contract (edfkern/reference/__init__.py), one family per .cpp.
// Callers (edfkern/ops) have checked every argument; tensors arrive contiguous.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace edfkern {

// DAE computes its mask in float64 when the CAM or the tensor it scales is float64, else float32
// (edfkern/reference/dae.py); shared by the CPU kernels and the CUDA bindings.
inline bool dae_mask_in_double(const at::Tensor& cam, const at::Tensor& grad) {
  return cam.scalar_type() == at::kDouble || grad.scalar_type() == at::kDouble;
}

namespace cpu {

// dae.cpp
at::Tensor dae_mask(const at::Tensor& cam, double beta, std::optional<double> threshold, int64_t H, int64_t W);
void dae_(const at::Tensor& grad, const at::Tensor& cam, double beta, std::optional<double> threshold);
void dae_sgd_step_(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& buf,
                   const at::Tensor& cam, double lr, double beta, std::optional<double> threshold, double momentum,
                   double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step);

// gradcam.cpp
at::Tensor grad_cam(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& A_clean,
                    const std::string& method, bool normalize, std::optional<std::pair<int64_t, int64_t>> size);

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

// Group layout on the host: sorted row j is input row perm[j] (identity when perm is absent).
struct HostGroups {
  const int64_t* perm = nullptr;
  std::vector<int64_t> offsets;  // K+1
  int64_t K() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t row(int64_t j) const { return perm ? perm[j] : j; }
};
HostGroups host_groups(const std::optional<at::Tensor>& perm, const at::Tensor& offsets);

}  // namespace cpu
}  // namespace edfkern
