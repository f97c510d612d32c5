// edfkern._C: every schema of the backend kernel contract (edfkern/reference/__init__.py) in one
// place, the CPU implementations, and a small pybind11 module. CUDA implementations are registered
// by cuda_bindings.cpp, compiled only when the extension is built with CUDA (EDFKERN_WITH_CUDA).
#include <torch/library.h>

#include <pybind11/pybind11.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace {

namespace ck = edfkern::checks;
namespace cpu = edfkern::cpu;

// Every wrapper checks its arguments (csrc/checks.h) before the kernel touches memory: these ops are
// callable directly as torch.ops.edfkern_native.*, not only through edfkern's checked public API.

at::Tensor dae_mask_cpu(const at::Tensor& cam, double beta, std::optional<double> threshold, int64_t H, int64_t W) {
  ck::dae_mask_args(cam, H, W);
  return cpu::dae_mask(cam, beta, threshold, H, W);
}

void dae_cpu(at::Tensor& grad, const at::Tensor& cam, double beta, std::optional<double> threshold) {
  ck::dae_args(grad, cam);
  cpu::dae_(grad, cam, beta, threshold);
}

void dae_sgd_step_cpu(at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& buf,
                      const at::Tensor& cam, double lr, double beta, std::optional<double> threshold,
                      double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                      bool first_step) {
  ck::dae_sgd_args(param, grad, buf, cam, momentum);
  cpu::dae_sgd_step_(param, grad, buf, cam, lr, beta, threshold, momentum, dampening, weight_decay, nesterov, maximize,
                     first_step);
}

at::Tensor grad_cam_cpu(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& A_clean,
                        c10::string_view method, bool normalize, at::OptionalIntArrayRef size) {
  const std::string m(method.data(), method.size());
  TORCH_CHECK(m == "gradcam" || m == "gradcam++" || m == "smoothgradcam++",
              "edfkern_native.grad_cam: unknown method '", m, "'");
  ck::grad_cam_args(A, G, A_clean, m == "smoothgradcam++", size);
  std::optional<std::pair<int64_t, int64_t>> hw;
  if (size.has_value()) hw = std::make_pair((*size)[0], (*size)[1]);
  return cpu::grad_cam(A, G, A_clean, m, normalize, hw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpd_forward_cpu(const at::Tensor& student,
                                                                           const at::Tensor& target,
                                                                           const at::Tensor& start, int64_t k) {
  ck::cpd_vectors("cpd_forward", student, target, start);
  ck::cpd_k("cpd_forward", student.numel(), k);
  return cpu::cpd_forward(student, target, start, k);
}

at::Tensor cpd_backward_cpu(const at::Tensor& grad_out, const at::Tensor& student, const at::Tensor& target,
                            const at::Tensor& start, const at::Tensor& thr, const at::Tensor& tie,
                            const at::Tensor& sum_d) {
  ck::cpd_backward_args(grad_out, student, target, start, thr, tie, sum_d);
  return cpu::cpd_backward(grad_out, student, target, start, thr, tie, sum_d);
}

at::Tensor cpd_keep_mask_cpu(const at::Tensor& l, int64_t k) {
  ck::float_arg("cpd_keep_mask", "l", l);
  ck::cpd_k("cpd_keep_mask", l.numel(), k);
  return cpu::cpd_keep_mask(l, k);
}

std::tuple<at::Tensor, at::Tensor> cov_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                                   const at::Tensor& offsets) {
  ck::rows_csr("cov_forward", x, 3, perm, offsets);
  return cpu::cov_forward(x, perm, offsets);
}

at::Tensor cov_backward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets,
                            const at::Tensor& mean, const at::Tensor& M) {
  ck::cov_backward_args(x, perm, offsets, mean, M);
  return cpu::cov_backward(x, perm, offsets, mean, M);
}

at::Tensor seg_mean_cpu(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets) {
  ck::rows_csr("seg_mean", x, 2, perm, offsets);
  return cpu::seg_mean(x, perm, offsets);
}

std::tuple<at::Tensor, at::Tensor> cc_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                                  const at::Tensor& offsets) {
  ck::rows_csr("cc_forward", x, 2, perm, offsets);
  return cpu::cc_forward(x, perm, offsets);
}

at::Tensor cc_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& perm,
                           const at::Tensor& offsets, const at::Tensor& mean, double coef) {
  ck::cc_backward_args(grad_out, x, perm, offsets, mean);
  return cpu::cc_backward(grad_out, x, perm, offsets, mean, coef);
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
  m.impl("dae_mask", &dae_mask_cpu);
  m.impl("dae_", &dae_cpu);
  m.impl("dae_sgd_step_", &dae_sgd_step_cpu);
  m.impl("grad_cam", &grad_cam_cpu);
  m.impl("cpd_forward", &cpd_forward_cpu);
  m.impl("cpd_backward", &cpd_backward_cpu);
  m.impl("cpd_keep_mask", &cpd_keep_mask_cpu);
  m.impl("cov_forward", &cov_forward_cpu);
  m.impl("cov_backward", &cov_backward_cpu);
  m.impl("seg_mean", &seg_mean_cpu);
  m.impl("cc_forward", &cc_forward_cpu);
  m.impl("cc_backward", &cc_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "edfkern native kernels; the ops live under torch.ops.edfkern_native";
#ifdef EDFKERN_WITH_CUDA
  m.def("with_cuda", [] { return true; }, "whether the CUDA kernels were compiled in");
#else
  m.def("with_cuda", [] { return false; }, "whether the CUDA kernels were compiled in");
#endif
}
