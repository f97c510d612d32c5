// CUDA implementations of the edfkern_native schemas (declared in edfkern.cpp). Compiled only when
// the extension is built with CUDA. Each wrapper: device guard, outputs and workspace from the
// caching allocator, early return on empty input, launch on the current stream, check the launch.
// Every wrapper checks its arguments first (csrc/checks.h): the ops are callable directly.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"
#include <edfkern/covariance.h>
#include <edfkern/cpd.h>
#include <edfkern/dae.h>
#include <edfkern/features.h>
#include <edfkern/gradcam.h>

namespace {

using edfkern::DType;
namespace kc = edfkern::cuda;
namespace ck = edfkern::checks;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "edfkern_native: unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

CUstream_st* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "edfkern_native.", what, ": CUDA error: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

const int64_t* perm_ptr(const std::optional<at::Tensor>& perm) {
  return perm.has_value() && perm->defined() ? perm->data_ptr<int64_t>() : nullptr;
}

// ----------------------------------------------------------------------------- DAE

kc::DaeArgs dae_args(int64_t N, int64_t C, const at::Tensor& cam, int64_t H, int64_t W, std::optional<double> thr,
                     double beta) {
  return kc::DaeArgs{N, C, cam.size(1), cam.size(2), H, W, thr.has_value(), thr.value_or(0.0), beta};
}

at::Tensor dae_mask_cuda(const at::Tensor& cam, double beta, std::optional<double> threshold, int64_t H, int64_t W) {
  const c10::cuda::CUDAGuard guard(cam.device());
  ck::dae_mask_args(cam, H, W);
  const int64_t N = cam.size(0);
  auto out = at::empty({N, 1, H, W}, cam.options());
  if (out.numel() == 0) return out;
  auto cam_m = cam.to(acc_of(cam)).contiguous();
  auto tau = at::empty({N}, cam_m.options());
  check(kc::dae_mask(cam_m.data_ptr(), dtype_of(cam_m), out.data_ptr(), dtype_of(out),
                     dae_args(N, 1, cam, H, W, threshold, beta), tau.data_ptr(), stream()),
        "dae_mask");
  return out;
}

void dae_cuda(at::Tensor& grad, const at::Tensor& cam, double beta, std::optional<double> threshold) {
  const c10::cuda::CUDAGuard guard(grad.device());
  ck::dae_args(grad, cam);
  if (grad.numel() == 0) return;
  TORCH_CHECK(grad.is_contiguous(), "edfkern_native.dae_: grad must be contiguous");
  auto cam_m = cam.to(edfkern::dae_mask_in_double(cam, grad) ? at::kDouble : at::kFloat).contiguous();
  auto tau = at::empty({grad.size(0)}, cam_m.options());
  check(kc::dae_apply(grad.data_ptr(), dtype_of(grad), cam_m.data_ptr(), dtype_of(cam_m),
                      dae_args(grad.size(0), grad.size(1), cam, grad.size(2), grad.size(3), threshold, beta),
                      tau.data_ptr(), stream()),
        "dae_");
}

void dae_sgd_step_cuda(at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& buf,
                       const at::Tensor& cam, double lr, double beta, std::optional<double> threshold,
                       double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                       bool first_step) {
  const c10::cuda::CUDAGuard guard(param.device());
  ck::dae_sgd_args(param, grad, buf, cam, momentum);
  if (param.numel() == 0) return;
  TORCH_CHECK(param.is_contiguous(), "edfkern_native.dae_sgd_step_: param must be contiguous");
  const bool has_buf = momentum != 0.0 && buf.has_value() && buf->defined();
  TORCH_CHECK(momentum == 0.0 || has_buf, "edfkern_native.dae_sgd_step_: momentum != 0 needs a momentum buffer");
  auto g = grad.contiguous();
  auto cam_m = cam.to(edfkern::dae_mask_in_double(cam, grad) ? at::kDouble : at::kFloat).contiguous();
  auto tau = at::empty({param.size(0)}, cam_m.options());
  const kc::SgdArgs s{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  check(kc::dae_sgd_step(param.data_ptr(), g.data_ptr(), has_buf ? buf->data_ptr() : nullptr, dtype_of(param),
                         cam_m.data_ptr(), dtype_of(cam_m),
                         dae_args(param.size(0), param.size(1), cam, param.size(2), param.size(3), threshold, beta),
                         s, tau.data_ptr(), stream()),
        "dae_sgd_step_");
}

// ----------------------------------------------------------------------------- Grad-CAM

at::Tensor grad_cam_cuda(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& A_clean,
                         c10::string_view method, bool normalize, at::OptionalIntArrayRef size) {
  const c10::cuda::CUDAGuard guard(A.device());
  kc::CamMethod m;
  if (method == "gradcam") m = kc::CamMethod::GradCAM;
  else if (method == "gradcam++") m = kc::CamMethod::GradCAMpp;
  else if (method == "smoothgradcam++") m = kc::CamMethod::Smooth;
  else TORCH_CHECK(false, "edfkern_native.grad_cam: unknown method ", std::string(method.data(), method.size()));
  const bool smooth = m == kc::CamMethod::Smooth;
  TORCH_CHECK(!smooth || (A_clean.has_value() && A_clean->defined()), "smoothgradcam++ needs clean activations");
  ck::grad_cam_args(A, G, A_clean, smooth, size);
  const int64_t S = smooth ? A.size(0) : 1, N = A.size(-4), C = A.size(-3), h = A.size(-2), w = A.size(-1);
  const int64_t H = size.has_value() ? (*size)[0] : h, W = size.has_value() ? (*size)[1] : w;
  auto a = A.contiguous(), g = G.contiguous();
  auto out = at::empty({N, H, W}, A.options().dtype(acc_of(A)));
  if (N == 0) return out;
  auto ws = at::empty({kc::grad_cam_ws_elems(N, C, h, w)}, out.options());
  at::Tensor clean = smooth ? A_clean->contiguous() : at::Tensor();
  check(kc::grad_cam(a.data_ptr(), g.data_ptr(), smooth ? clean.data_ptr() : nullptr, dtype_of(a), m, normalize, S,
                     N, C, h, w, H, W, out.data_ptr(), ws.data_ptr(), stream(), size.has_value() ? 1 : 0),
        "grad_cam");
  return out;
}

// ----------------------------------------------------------------------------- CPD

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpd_forward_cuda(const at::Tensor& student,
                                                                            const at::Tensor& target,
                                                                            const at::Tensor& start, int64_t k) {
  const c10::cuda::CUDAGuard guard(student.device());
  ck::cpd_vectors("cpd_forward", student, target, start);
  ck::cpd_k("cpd_forward", student.numel(), k);
  const int64_t P = student.numel();
  const auto opts = student.options().dtype(acc_of(student));
  auto sum_l = at::empty({}, opts), sum_d = at::empty({}, opts), thr = at::empty({}, opts);  // no aliasing outputs
  auto tie = at::empty({}, student.options().dtype(at::kLong));
  auto ws = at::empty({static_cast<int64_t>(kc::cpd_workspace_bytes(P))}, student.options().dtype(at::kByte));
  check(kc::cpd_forward(student.data_ptr(), target.data_ptr(), start.data_ptr(), dtype_of(student), P, k,
                        sum_l.data_ptr(), sum_d.data_ptr(), thr.data_ptr(), tie.data_ptr<int64_t>(), ws.data_ptr(),
                        stream()),
        "cpd_forward");
  return {sum_l, sum_d, thr, tie};
}

at::Tensor cpd_backward_cuda(const at::Tensor& grad_out, const at::Tensor& student, const at::Tensor& target,
                             const at::Tensor& start, const at::Tensor& thr, const at::Tensor& tie,
                             const at::Tensor& sum_d) {
  const c10::cuda::CUDAGuard guard(student.device());
  ck::cpd_backward_args(grad_out, student, target, start, thr, tie, sum_d);
  const auto acc = acc_of(student);
  auto go = grad_out.to(acc).contiguous();
  auto th = thr.to(acc).contiguous();
  auto sd = sum_d.to(acc).contiguous();
  auto ti = tie.to(at::kLong).contiguous();
  auto out = at::empty_like(student);
  check(kc::cpd_backward(go.data_ptr(), student.data_ptr(), target.data_ptr(), dtype_of(student), student.numel(),
                         th.data_ptr(), ti.data_ptr<int64_t>(), sd.data_ptr(), out.data_ptr(), stream()),
        "cpd_backward");
  return out;
}

at::Tensor cpd_keep_mask_cuda(const at::Tensor& l, int64_t k) {
  const c10::cuda::CUDAGuard guard(l.device());
  ck::float_arg("cpd_keep_mask", "l", l);
  ck::cpd_k("cpd_keep_mask", l.numel(), k);
  const int64_t P = l.numel();
  auto out = at::empty({P}, l.options().dtype(at::kBool));
  auto ws = at::empty({static_cast<int64_t>(kc::cpd_workspace_bytes(P))}, l.options().dtype(at::kByte));
  check(kc::cpd_keep_mask(l.data_ptr(), dtype_of(l), P, k, out.data_ptr<bool>(), ws.data_ptr(), stream()),
        "cpd_keep_mask");
  return out;
}

// ----------------------------------------------------------------------------- covariance

std::tuple<at::Tensor, at::Tensor> cov_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                                    const at::Tensor& offsets) {
  const c10::cuda::CUDAGuard guard(x.device());
  ck::rows_csr("cov_forward", x, 3, perm, offsets);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = offsets.numel() - 1;
  auto sigma = at::zeros({K, C, C}, x.options().dtype(acc_of(x)));
  auto mean = at::zeros({K, C, L}, x.options().dtype(acc_of(x)));
  check(kc::cov_forward(x.data_ptr(), dtype_of(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, C, L,
                        sigma.data_ptr(), mean.data_ptr(), stream()),
        "cov_forward");
  return {sigma, mean};
}

at::Tensor cov_backward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets,
                             const at::Tensor& mean, const at::Tensor& M) {
  const c10::cuda::CUDAGuard guard(x.device());
  ck::cov_backward_args(x, perm, offsets, mean, M);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = offsets.numel() - 1;
  auto out = at::empty_like(x);
  auto m = mean.to(acc_of(x)).contiguous();
  auto Mc = M.to(acc_of(x)).contiguous();
  check(kc::cov_backward(x.data_ptr(), dtype_of(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, C, L,
                         m.data_ptr(), Mc.data_ptr(), out.data_ptr(), stream()),
        "cov_backward");
  return out;
}

// ----------------------------------------------------------------------------- flat features

at::Tensor seg_mean_cuda(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets) {
  const c10::cuda::CUDAGuard guard(x.device());
  ck::rows_csr("seg_mean", x, 2, perm, offsets);
  const int64_t N = x.size(0), D = x.size(1), K = offsets.numel() - 1;
  auto mean = at::zeros({K, D}, x.options().dtype(acc_of(x)));
  check(kc::seg_mean(x.data_ptr(), dtype_of(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, D,
                     mean.data_ptr(), stream()),
        "seg_mean");
  return mean;
}

std::tuple<at::Tensor, at::Tensor> cc_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                                   const at::Tensor& offsets) {
  const c10::cuda::CUDAGuard guard(x.device());
  ck::rows_csr("cc_forward", x, 2, perm, offsets);
  const int64_t N = x.size(0), D = x.size(1), K = offsets.numel() - 1;
  auto mean = at::zeros({K, D}, x.options().dtype(acc_of(x)));
  auto sq = at::zeros({}, x.options().dtype(acc_of(x)));
  auto ws = at::empty({std::max<int64_t>(1, K * D)}, x.options().dtype(at::kDouble));
  check(kc::cc_forward(x.data_ptr(), dtype_of(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, D,
                       mean.data_ptr(), sq.data_ptr(), ws.data_ptr<double>(), stream()),
        "cc_forward");
  return {sq, mean};
}

at::Tensor cc_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& perm,
                            const at::Tensor& offsets, const at::Tensor& mean, double coef) {
  const c10::cuda::CUDAGuard guard(x.device());
  ck::cc_backward_args(grad_out, x, perm, offsets, mean);
  const int64_t N = x.size(0), D = x.size(1), K = offsets.numel() - 1;
  auto out = at::empty_like(x);
  auto go = grad_out.to(acc_of(x)).contiguous();
  auto m = mean.to(acc_of(x)).contiguous();
  check(kc::cc_backward(go.data_ptr(), x.data_ptr(), dtype_of(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K,
                        D, m.data_ptr(), coef, out.data_ptr(), stream()),
        "cc_backward");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(edfkern_native, CUDA, m) {
  m.impl("dae_mask", &dae_mask_cuda);
  m.impl("dae_", &dae_cuda);
  m.impl("dae_sgd_step_", &dae_sgd_step_cuda);
  m.impl("grad_cam", &grad_cam_cuda);
  m.impl("cpd_forward", &cpd_forward_cuda);
  m.impl("cpd_backward", &cpd_backward_cuda);
  m.impl("cpd_keep_mask", &cpd_keep_mask_cuda);
  m.impl("cov_forward", &cov_forward_cuda);
  m.impl("cov_backward", &cov_backward_cuda);
  m.impl("seg_mean", &seg_mean_cuda);
  m.impl("cc_forward", &cc_forward_cuda);
  m.impl("cc_backward", &cc_backward_cuda);
}
