// edfkern._C: every schema of the backend kernel contract (edfkern/reference/__init__.py) in one
// place, the CPU implementations, and a small pybind11 module. CUDA implementations are registered
// by cuda_bindings.cpp, compiled only when the extension is built with CUDA (EDFKERN_WITH_CUDA).
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include "cpu/kernels.h"

namespace {

using edfkern::cpu::cpd_backward;
using edfkern::cpu::cpd_forward;
using edfkern::cpu::cpd_keep_mask;

at::Tensor grad_cam_cpu(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& A_clean,
                        c10::string_view method, bool normalize, at::OptionalIntArrayRef size) {
  std::optional<std::pair<int64_t, int64_t>> hw;
  if (size.has_value()) {
    TORCH_CHECK(size->size() == 2, "edfkern_native.grad_cam: size must be (H, W)");
    hw = std::make_pair((*size)[0], (*size)[1]);
  }
  return edfkern::cpu::grad_cam(A, G, A_clean, std::string(method.data(), method.size()), normalize, hw);
}

void dae_cpu(at::Tensor& grad, const at::Tensor& cam, double beta, std::optional<double> threshold) {
  edfkern::cpu::dae_(grad, cam, beta, threshold);
}

void dae_sgd_step_cpu(at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& buf,
                      const at::Tensor& cam, double lr, double beta, std::optional<double> threshold,
                      double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                      bool first_step) {
  edfkern::cpu::dae_sgd_step_(param, grad, buf, cam, lr, beta, threshold, momentum, dampening, weight_decay,
                              nesterov, maximize, first_step);
}

}  // namespace

TORCH_LIBRARY(edfkern_native, m) {
  m.def("dae_mask(Tensor cam, float beta, float? threshold, int H, int W) -> Tensor");
  m.def("dae_(Tensor(a!) grad, Tensor cam, float beta, float? threshold) -> ()");
  m.def(
      "dae_sgd_step_(Tensor(a!) param, Tensor grad, Tensor(b!)? buf, Tensor cam, float lr, float beta, "
      "float? threshold, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step) -> ()");
  m.def("grad_cam(Tensor A, Tensor G, Tensor? A_clean, str method, bool normalize, int[]? size) -> Tensor");
  m.def("cpd_forward(Tensor student, Tensor target, Tensor start, int k) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cpd_backward(Tensor grad_out, Tensor student, Tensor target, Tensor start, Tensor thr, Tensor tie, "
      "Tensor sum_d) -> Tensor");
  m.def("cpd_keep_mask(Tensor l, int k) -> Tensor");
  m.def("cov_forward(Tensor x, Tensor? perm, Tensor offsets) -> (Tensor, Tensor)");
  m.def("cov_backward(Tensor x, Tensor? perm, Tensor offsets, Tensor mean, Tensor M) -> Tensor");
  m.def("seg_mean(Tensor x, Tensor? perm, Tensor offsets) -> Tensor");
  m.def("cc_forward(Tensor x, Tensor? perm, Tensor offsets) -> (Tensor, Tensor)");
  m.def("cc_backward(Tensor grad_out, Tensor x, Tensor? perm, Tensor offsets, Tensor mean, float coef) -> Tensor");
}

TORCH_LIBRARY_IMPL(edfkern_native, CPU, m) {
  m.impl("dae_mask", &edfkern::cpu::dae_mask);
  m.impl("dae_", &dae_cpu);
  m.impl("dae_sgd_step_", &dae_sgd_step_cpu);
  m.impl("grad_cam", &grad_cam_cpu);
  m.impl("cpd_forward", &cpd_forward);
  m.impl("cpd_backward", &cpd_backward);
  m.impl("cpd_keep_mask", &cpd_keep_mask);
  m.impl("cov_forward", &edfkern::cpu::cov_forward);
  m.impl("cov_backward", &edfkern::cpu::cov_backward);
  m.impl("seg_mean", &edfkern::cpu::seg_mean);
  m.impl("cc_forward", &edfkern::cpu::cc_forward);
  m.impl("cc_backward", &edfkern::cpu::cc_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "edfkern native kernels; the ops live under torch.ops.edfkern_native";
#ifdef EDFKERN_WITH_CUDA
  m.def("with_cuda", [] { return true; }, "whether the CUDA kernels were compiled in");
#else
  m.def("with_cuda", [] { return false; }, "whether the CUDA kernels were compiled in");
#endif
}
