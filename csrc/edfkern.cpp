// edfkern._C: the native backend. One pybind11 function per kernel of the backend contract
// (edfkern/reference/__init__.py: the same names, the same arguments in the same order), which
// edfkern/native.py exposes as is. These are plain functions, not torch.library ops: the registered
// layer is edfkern:: (edfkern/ops), which checks, fakes and differentiates, and calls a backend.
//
// Each function, for CPU and CUDA tensors alike:
//   1. picks the path from the first tensor's device (on_cuda: any other device is refused);
//   2. checks every argument (csrc/checks.h): the functions are callable directly, so bad input
//      gets a Python TypeError / ValueError, never a crash;
//   3. applies the rules both kernel families share (the DAE mask dtype, the Grad-CAM method) and
//      packs the scalars into the torch-free structs of <edfkern/*.h>;
//   4. runs the CPU kernel (csrc/cpu, torch tensors in, tensors out) or the CUDA path below: device
//      guard, outputs and workspace from torch's caching allocator, and the launcher of
//      csrc/cuda/*.cu (raw pointers, sizes, a DType, the current stream), which holds the op's one
//      empty-input return and its one dtype dispatch.
// The CUDA path is compiled only with EDFKERN_WITH_CUDA; it needs no CUDA header of torch's
// (csrc/cuda/stream.cpp is the one file that does), so it also compiles against the CPU wheel
// (tests/test_native_build.py checks that).
#include <torch/extension.h>

#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "dtypes.h"
#include <edfkern/covariance.h>
#include <edfkern/cpd.h>
#include <edfkern/dae.h>
#include <edfkern/features.h>
#include <edfkern/gradcam.h>

#ifdef EDFKERN_WITH_CUDA
#include <c10/core/DeviceGuard.h>

#include "cuda/stream.h"
#define EDFKERN_CUDA_PATH(...) __VA_ARGS__
#else
#define EDFKERN_CUDA_PATH(...) throw std::logic_error("edfkern._C: no CUDA path in a CPU-only build")
#endif

namespace edfkern {
namespace {

namespace ck = checks;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Whether the call takes the CUDA path: CPU tensors run the C++ kernels, CUDA tensors the CUDA
// kernels (in builds with EDFKERN_WITH_CUDA); any other device is refused before anything is read.
bool on_cuda(const char* op, const Tensor& t) {
  if (t.device().is_cpu()) return false;
#ifdef EDFKERN_WITH_CUDA
  if (t.is_cuda()) return true;
  TORCH_CHECK_VALUE(false, "edfkern._C.", op, ": tensors must be on the CPU or a CUDA device, got ", t.device());
#else
  TORCH_CHECK_VALUE(false, "edfkern._C.", op, ": tensors must be on the CPU (this build has no CUDA kernels), got ",
                    t.device());
#endif
}

DaeArgs dae_args(double beta, std::optional<double> threshold) {
  return DaeArgs{beta, threshold.has_value(), threshold.value_or(0.0)};
}

// The CAM, contiguous, in the mask dtype (edfkern::dae_mask_dtype) of the tensor it scales.
Tensor mask_cam(const Tensor& cam, const Tensor& scaled) {
  const DType m = dae_mask_dtype(dtype_of(cam.scalar_type()), dtype_of(scaled.scalar_type()));
  return cam.to(scalar_type_of(m)).contiguous();
}

CamMethod cam_method(const std::string& method) {
  CamMethod m{};
  TORCH_CHECK_VALUE(parse_cam_method(method, m), "edfkern._C.grad_cam: method must be 'gradcam', 'gradcam++' or ",
                    "'smoothgradcam++', got '", method, "'");
  return m;
}

#ifdef EDFKERN_WITH_CUDA
// ----------------------------------------------------------------------------- the CUDA path
namespace cuda_path {

namespace kc = edfkern::cuda;

// One launch: the device guard for the tensors' device and its current stream.
struct Launch {
  const char* op;
  c10::DeviceGuard guard;
  CUstream_st* stream;
  Launch(const char* op_, const Tensor& t) : op(op_), guard(t.device()), stream(kc::current_stream()) {}
  void check(int status) const { kc::check_launch(op, status); }
};

DType dt(const Tensor& t) { return dtype_of(t.scalar_type()); }
Tensor bytes(const Tensor& like, size_t n) {
  return at::empty({static_cast<int64_t>(n)}, like.options().dtype(at::kByte));
}
const int64_t* perm_ptr(const OptTensor& perm) {
  return perm.has_value() && perm->defined() ? perm->data_ptr<int64_t>() : nullptr;
}
DaeShape dae_shape(const Tensor& x, const Tensor& cam_m) {  // x (N, C, H, W)
  return DaeShape{x.size(0), x.size(1), cam_m.size(1), cam_m.size(2), x.size(2), x.size(3)};
}

Tensor dae_mask(const Tensor& cam_m, at::ScalarType out_dtype, int64_t H, int64_t W, const DaeArgs& a) {
  const Launch l("dae_mask", cam_m);
  const DaeShape s{cam_m.size(0), 1, cam_m.size(1), cam_m.size(2), H, W};
  auto out = at::empty({s.N, 1, H, W}, cam_m.options().dtype(out_dtype));
  auto ws = bytes(cam_m, kc::dae_workspace_bytes(s));
  l.check(kc::dae_mask(cam_m.data_ptr(), dt(cam_m), out.data_ptr(), dt(out), s, a, ws.data_ptr(), l.stream));
  return out;
}

void dae_(const Tensor& grad, const Tensor& cam_m, const DaeArgs& a) {
  const Launch l("dae_", grad);
  const DaeShape s = dae_shape(grad, cam_m);
  auto ws = bytes(grad, kc::dae_workspace_bytes(s));
  l.check(kc::dae_apply(grad.data_ptr(), dt(grad), cam_m.data_ptr(), dt(cam_m), s, a, ws.data_ptr(), l.stream));
}

void dae_sgd_step_(const Tensor& param, const Tensor& grad, const Tensor& buf, const Tensor& cam_m, const DaeArgs& a,
                   const SgdArgs& sgd) {
  const Launch l("dae_sgd_step_", param);
  const DaeShape s = dae_shape(param, cam_m);
  auto ws = bytes(param, kc::dae_workspace_bytes(s));
  l.check(kc::dae_sgd_step(param.data_ptr(), grad.data_ptr(), buf.defined() ? buf.data_ptr() : nullptr, dt(param),
                           cam_m.data_ptr(), dt(cam_m), s, a, sgd, ws.data_ptr(), l.stream));
}

Tensor grad_cam(const Tensor& A, const Tensor& G, const OptTensor& A_clean, CamMethod method, bool normalize,
                std::optional<std::pair<int64_t, int64_t>> size) {
  const Launch l("grad_cam", A);
  const bool smooth = method == CamMethod::Smooth;
  const int64_t S = smooth ? A.size(0) : 1, N = A.size(-4), C = A.size(-3), h = A.size(-2), w = A.size(-1);
  const int64_t H = size ? size->first : h, W = size ? size->second : w;
  auto out = at::empty({N, H, W}, A.options().dtype(acc_dtype(A.scalar_type())));
  auto ws = at::empty({kc::grad_cam_ws_elems(N, C, h, w)}, out.options());
  l.check(kc::grad_cam(A.data_ptr(), G.data_ptr(), smooth ? A_clean->data_ptr() : nullptr, dt(A), method, normalize, S,
                       N, C, h, w, H, W, size.has_value(), out.data_ptr(), ws.data_ptr(), l.stream));
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpd_forward(const Tensor& student, const Tensor& target,
                                                       const Tensor& start, int64_t k) {
  const Launch l("cpd_forward", student);
  const int64_t P = student.numel();
  const auto opts = student.options().dtype(acc_dtype(student.scalar_type()));
  auto sum_l = at::empty({}, opts), sum_d = at::empty({}, opts), thr = at::empty({}, opts);  // no aliasing outputs
  auto tie = at::empty({}, student.options().dtype(at::kLong));
  auto ws = bytes(student, kc::cpd_workspace_bytes(P));
  l.check(kc::cpd_forward(student.data_ptr(), target.data_ptr(), start.data_ptr(), dt(student), P, k, sum_l.data_ptr(),
                          sum_d.data_ptr(), thr.data_ptr(), tie.data_ptr<int64_t>(), ws.data_ptr(), l.stream));
  return {sum_l, sum_d, thr, tie};
}

Tensor cpd_backward(const Tensor& grad_out, const Tensor& student, const Tensor& target, const Tensor& start,
                    const Tensor& thr, const Tensor& tie, const Tensor& sum_d) {
  const Launch l("cpd_backward", student);
  const auto acc = acc_dtype(student.scalar_type());
  auto go = grad_out.to(acc).contiguous(), th = thr.to(acc).contiguous(), sd = sum_d.to(acc).contiguous();
  auto ti = tie.contiguous();
  auto out = at::empty_like(student);
  l.check(kc::cpd_backward(go.data_ptr(), student.data_ptr(), target.data_ptr(), dt(student), student.numel(),
                           th.data_ptr(), ti.data_ptr<int64_t>(), sd.data_ptr(), out.data_ptr(), l.stream));
  return out;
}

Tensor cpd_keep_mask(const Tensor& lv, int64_t k) {
  const Launch l("cpd_keep_mask", lv);
  const int64_t P = lv.numel();
  auto out = at::empty({P}, lv.options().dtype(at::kBool));
  auto ws = bytes(lv, kc::cpd_workspace_bytes(P));
  l.check(kc::cpd_keep_mask(lv.data_ptr(), dt(lv), P, k, out.data_ptr<bool>(), ws.data_ptr(), l.stream));
  return out;
}

std::tuple<Tensor, Tensor> cov_forward(const Tensor& x, const OptTensor& perm, const Tensor& offsets) {
  const Launch l("cov_forward", x);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = offsets.numel() - 1;
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto sigma = at::zeros({K, C, C}, opts), mean = at::zeros({K, C, L}, opts);
  l.check(kc::cov_forward(x.data_ptr(), dt(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, C, L,
                          sigma.data_ptr(), mean.data_ptr(), l.stream));
  return {sigma, mean};
}

Tensor cov_backward(const Tensor& x, const OptTensor& perm, const Tensor& offsets, const Tensor& mean,
                    const Tensor& M) {
  const Launch l("cov_backward", x);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = offsets.numel() - 1;
  const auto acc = acc_dtype(x.scalar_type());
  auto out = at::empty_like(x);
  auto m = mean.to(acc).contiguous(), Mc = M.to(acc).contiguous();
  l.check(kc::cov_backward(x.data_ptr(), dt(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, C, L, m.data_ptr(),
                           Mc.data_ptr(), out.data_ptr(), l.stream));
  return out;
}

Tensor seg_mean(const Tensor& x, const OptTensor& perm, const Tensor& offsets) {
  const Launch l("seg_mean", x);
  const int64_t N = x.size(0), D = x.size(1), K = offsets.numel() - 1;
  auto mean = at::zeros({K, D}, x.options().dtype(acc_dtype(x.scalar_type())));
  l.check(kc::seg_mean(x.data_ptr(), dt(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, D, mean.data_ptr(),
                       l.stream));
  return mean;
}

std::tuple<Tensor, Tensor> cc_forward(const Tensor& x, const OptTensor& perm, const Tensor& offsets) {
  const Launch l("cc_forward", x);
  const int64_t N = x.size(0), D = x.size(1), K = offsets.numel() - 1;
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto mean = at::zeros({K, D}, opts), sq = at::zeros({}, opts);
  auto ws = at::empty({std::max<int64_t>(1, K * D)}, x.options().dtype(at::kDouble));
  l.check(kc::cc_forward(x.data_ptr(), dt(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, D, mean.data_ptr(),
                         sq.data_ptr(), ws.data_ptr<double>(), l.stream));
  return {sq, mean};
}

Tensor cc_backward(const Tensor& grad_out, const Tensor& x, const OptTensor& perm, const Tensor& offsets,
                   const Tensor& mean, double coef) {
  const Launch l("cc_backward", x);
  const int64_t N = x.size(0), D = x.size(1), K = offsets.numel() - 1;
  const auto acc = acc_dtype(x.scalar_type());
  auto out = at::empty_like(x);
  auto go = grad_out.to(acc).contiguous(), m = mean.to(acc).contiguous();
  l.check(kc::cc_backward(go.data_ptr(), x.data_ptr(), dt(x), perm_ptr(perm), offsets.data_ptr<int64_t>(), N, K, D,
                          m.data_ptr(), coef, out.data_ptr(), l.stream));
  return out;
}

}  // namespace cuda_path
#endif  // EDFKERN_WITH_CUDA

// ----------------------------------------------------------------------------- the functions

Tensor dae_mask(const Tensor& cam, double beta, std::optional<double> threshold, int64_t H, int64_t W) {
  const bool cuda = on_cuda("dae_mask", cam);
  ck::dae_mask_args(cam, H, W);
  const DaeArgs a = dae_args(beta, threshold);
  const Tensor cam_m = mask_cam(cam, cam);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::dae_mask(cam_m, cam.scalar_type(), H, W, a))
              : cpu::dae_mask(cam_m, cam.scalar_type(), H, W, a);
}

void dae_(const Tensor& grad, const Tensor& cam, double beta, std::optional<double> threshold) {
  const bool cuda = on_cuda("dae_", grad);
  ck::dae_args(grad, cam);
  const DaeArgs a = dae_args(beta, threshold);
  const Tensor cam_m = mask_cam(cam, grad);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::dae_(grad, cam_m, a)) : cpu::dae_(grad, cam_m, a);
}

void dae_sgd_step_(const Tensor& param, const Tensor& grad, const OptTensor& buf, const Tensor& cam, double lr,
                   double beta, std::optional<double> threshold, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const bool cuda = on_cuda("dae_sgd_step_", param);
  ck::dae_sgd_args(param, grad, buf, cam, momentum);
  const DaeArgs a = dae_args(beta, threshold);
  const SgdArgs sgd{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  const Tensor cam_m = mask_cam(cam, grad);
  const Tensor b = momentum != 0.0 ? *buf : Tensor();  // the buffer exists (checked) and is used iff momentum != 0
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::dae_sgd_step_(param, grad, b, cam_m, a, sgd))
              : cpu::dae_sgd_step_(param, grad, b, cam_m, a, sgd);
}

Tensor grad_cam(const Tensor& A, const Tensor& G, const OptTensor& A_clean, const std::string& method, bool normalize,
                const std::optional<std::vector<int64_t>>& size) {
  const bool cuda = on_cuda("grad_cam", A);
  const CamMethod m = cam_method(method);
  ck::grad_cam_args(A, G, A_clean, m == CamMethod::Smooth, size);
  std::optional<std::pair<int64_t, int64_t>> hw;
  if (size.has_value()) hw = std::make_pair((*size)[0], (*size)[1]);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::grad_cam(A, G, A_clean, m, normalize, hw))
              : cpu::grad_cam(A, G, A_clean, m, normalize, hw);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpd_forward(const Tensor& student, const Tensor& target,
                                                       const Tensor& start, int64_t k) {
  const bool cuda = on_cuda("cpd_forward", student);
  ck::cpd_vectors("cpd_forward", student, target, start);
  ck::cpd_k("cpd_forward", student.numel(), k);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::cpd_forward(student, target, start, k))
              : cpu::cpd_forward(student, target, start, k);
}

Tensor cpd_backward(const Tensor& grad_out, const Tensor& student, const Tensor& target, const Tensor& start,
                    const Tensor& thr, const Tensor& tie, const Tensor& sum_d) {
  const bool cuda = on_cuda("cpd_backward", student);
  ck::cpd_backward_args(grad_out, student, target, start, thr, tie, sum_d);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::cpd_backward(grad_out, student, target, start, thr, tie, sum_d))
              : cpu::cpd_backward(grad_out, student, target, start, thr, tie, sum_d);
}

Tensor cpd_keep_mask(const Tensor& l, int64_t k) {
  const bool cuda = on_cuda("cpd_keep_mask", l);
  ck::float_arg("cpd_keep_mask", "l", l);
  ck::cpd_k("cpd_keep_mask", l.numel(), k);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::cpd_keep_mask(l, k)) : cpu::cpd_keep_mask(l, k);
}

std::tuple<Tensor, Tensor> cov_forward(const Tensor& x, const OptTensor& perm, const Tensor& offsets) {
  const bool cuda = on_cuda("cov_forward", x);
  ck::rows_csr("cov_forward", x, 3, perm, offsets);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::cov_forward(x, perm, offsets)) : cpu::cov_forward(x, perm, offsets);
}

Tensor cov_backward(const Tensor& x, const OptTensor& perm, const Tensor& offsets, const Tensor& mean,
                    const Tensor& M) {
  const bool cuda = on_cuda("cov_backward", x);
  ck::cov_backward_args(x, perm, offsets, mean, M);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::cov_backward(x, perm, offsets, mean, M))
              : cpu::cov_backward(x, perm, offsets, mean, M);
}

Tensor seg_mean(const Tensor& x, const OptTensor& perm, const Tensor& offsets) {
  const bool cuda = on_cuda("seg_mean", x);
  ck::rows_csr("seg_mean", x, 2, perm, offsets);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::seg_mean(x, perm, offsets)) : cpu::seg_mean(x, perm, offsets);
}

std::tuple<Tensor, Tensor> cc_forward(const Tensor& x, const OptTensor& perm, const Tensor& offsets) {
  const bool cuda = on_cuda("cc_forward", x);
  ck::rows_csr("cc_forward", x, 2, perm, offsets);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::cc_forward(x, perm, offsets)) : cpu::cc_forward(x, perm, offsets);
}

Tensor cc_backward(const Tensor& grad_out, const Tensor& x, const OptTensor& perm, const Tensor& offsets,
                   const Tensor& mean, double coef) {
  const bool cuda = on_cuda("cc_backward", x);
  ck::cc_backward_args(grad_out, x, perm, offsets, mean);
  return cuda ? EDFKERN_CUDA_PATH(cuda_path::cc_backward(grad_out, x, perm, offsets, mean, coef))
              : cpu::cc_backward(grad_out, x, perm, offsets, mean, coef);
}

}  // namespace
}  // namespace edfkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using py::arg;
  // The module is edfkern._C however it was built (a just-in-time build's file is edfkern_C.so, as a
  // module name cannot hold a dot), so its functions' __module__ say edfkern._C too.
  m.attr("__name__") = "edfkern._C";
  m.doc() = "edfkern native kernels: the backend contract of edfkern/reference/__init__.py on CPU (and CUDA)";
#ifdef EDFKERN_WITH_CUDA
  m.def("with_cuda", [] { return true; }, "whether the CUDA kernels were compiled in");
#else
  m.def("with_cuda", [] { return false; }, "whether the CUDA kernels were compiled in");
#endif
  // The kernels run without the GIL, as torch's own ops do. bool arguments take bools only.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  using namespace edfkern;
  m.def("dae_mask", &dae_mask, nogil, arg("cam"), arg("beta"), arg("threshold"), arg("H"), arg("W"),
        "cam (N, h, w) -> the DAE mask (N, 1, H, W) in cam's dtype; threshold None: each image's mean of U(cam)");
  m.def("dae_", &dae_, nogil, arg("grad"), arg("cam"), arg("beta"), arg("threshold"),
        "grad (N, C, H, W) *= the DAE mask of cam (N, h, w), in place");
  m.def("dae_sgd_step_", &dae_sgd_step_, nogil, arg("param"), arg("grad"), arg("buf"), arg("cam"), arg("lr"),
        arg("beta"), arg("threshold"), arg("momentum"), arg("dampening"), arg("weight_decay"),
        arg("nesterov").noconvert(), arg("maximize").noconvert(), arg("first_step").noconvert(),
        "torch.optim.SGD's step on param (N, C, H, W) with d = grad * the DAE mask of cam (N, h, w), in place "
        "(param and buf, which is None exactly when momentum == 0)");
  m.def("grad_cam", &grad_cam, nogil, arg("A"), arg("G"), arg("A_clean"), arg("method"), arg("normalize").noconvert(),
        arg("size"),
        "A, G (N, C, h, w), or (S, N, C, h, w) with A_clean (N, C, h, w) for smoothgradcam++ -> CAMs (N, h, w) or "
        "(N, H, W) for size (H, W), in acc");
  m.def("cpd_forward", &cpd_forward, nogil, arg("student"), arg("target"), arg("start"), arg("k"),
        "student, target, start (P,) -> (sum_l, sum_d, thr, tie): 0-d, sums and thr in acc, tie int64");
  m.def("cpd_backward", &cpd_backward, nogil, arg("grad_out"), arg("student"), arg("target"), arg("start"), arg("thr"),
        arg("tie"), arg("sum_d"), "-> the gradient (P,) of CPD's loss in student's dtype");
  m.def("cpd_keep_mask", &cpd_keep_mask, nogil, arg("l"), arg("k"),
        "l (P,) -> bool (P,): False at the k smallest values (stable-sort ties)");
  m.def("cov_forward", &cov_forward, nogil, arg("x"), arg("perm"), arg("offsets"),
        "x (N, C, L) -> (sigma (K, C, C), mean (K, C, L)) in acc");
  m.def("cov_backward", &cov_backward, nogil, arg("x"), arg("perm"), arg("offsets"), arg("mean"), arg("M"),
        "x (N, C, L), mean (K, C, L), M (K, C, C) -> M_k (x_i - mean_k), (N, C, L) in x's dtype");
  m.def("seg_mean", &seg_mean, nogil, arg("x"), arg("perm"), arg("offsets"), "x (N, D) -> class means (K, D) in acc");
  m.def("cc_forward", &cc_forward, nogil, arg("x"), arg("perm"), arg("offsets"),
        "x (N, D) -> (sum_i ||x_i - mu_k||^2 0-d, mean (K, D)) in acc");
  m.def("cc_backward", &cc_backward, nogil, arg("grad_out"), arg("x"), arg("perm"), arg("offsets"), arg("mean"),
        arg("coef"), "-> coef * grad_out * (x_i - mu_k), (N, D) in x's dtype");
}
