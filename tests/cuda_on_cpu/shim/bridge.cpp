// extern "C" entry points over the torch-free CUDA launchers (edfkern::cuda::*, csrc/include/edfkern),
// for ctypes (tests/cuda_on_cpu/shim_kernels.py); CUCPU_HAS_<FAMILY> says which .cu files are linked in. Each returns the launcher's cudaError_t value; pointers
// are CPU tensors' data standing in for device memory. Only the structs are unpacked here.
#include <cuda_runtime.h>

#include <edfkern/covariance.h>
#include <edfkern/cpd.h>
#include <edfkern/dae.h>
#include <edfkern/features.h>
#include <edfkern/gradcam.h>

using namespace edfkern;

namespace {
DType dt(int d) { return static_cast<DType>(d); }
DaeShape shape(const int64_t* s) { return DaeShape{s[0], s[1], s[2], s[3], s[4], s[5]}; }
DaeArgs args(double beta, int has_threshold, double threshold) {
  return DaeArgs{beta, has_threshold != 0, threshold};
}
}  // namespace

extern "C" {

void cucpu_reset() { cucpu::reset(); }
const char* cucpu_message() { return cucpu::last_message(); }

#ifdef CUCPU_HAS_DAE
// ---------------------------------------------------------------- dae.cu
size_t cucpu_dae_workspace_bytes(const int64_t* s) { return cuda::dae_workspace_bytes(shape(s)); }
int cucpu_dae_mask(const void* cam, int m, void* out, int out_dtype, const int64_t* s, double beta, int has_thr,
                   double thr, void* ws) {
  return cuda::dae_mask(cam, dt(m), out, dt(out_dtype), shape(s), args(beta, has_thr, thr), ws, nullptr);
}
int cucpu_dae_apply(void* grad, int g, const void* cam, int m, const int64_t* s, double beta, int has_thr, double thr,
                    void* ws) {
  return cuda::dae_apply(grad, dt(g), cam, dt(m), shape(s), args(beta, has_thr, thr), ws, nullptr);
}
int cucpu_dae_sgd_step(void* param, const void* grad, void* buf, int g, const void* cam, int m, const int64_t* s,
                       double beta, int has_thr, double thr, const double* sgd4, const int* sgd_flags3, void* ws) {
  const SgdArgs sgd{sgd4[0], sgd4[1], sgd4[2], sgd4[3], sgd_flags3[0] != 0, sgd_flags3[1] != 0, sgd_flags3[2] != 0};
  return cuda::dae_sgd_step(param, grad, buf, dt(g), cam, dt(m), shape(s), args(beta, has_thr, thr), sgd, ws,
                            nullptr);
}
#endif

#ifdef CUCPU_HAS_GRADCAM
// ---------------------------------------------------------------- gradcam.cu
int cucpu_grad_cam(const void* A, const void* G, const void* A_clean, int d, int method, int normalize, int64_t S,
                   int64_t N, int64_t C, int64_t h, int64_t w, int64_t H, int64_t W, int resize, void* out,
                   void* ws) {
  return cuda::grad_cam(A, G, A_clean, dt(d), static_cast<CamMethod>(method), normalize != 0, S, N, C, h, w, H, W,
                        resize != 0, out, ws, nullptr);
}
#endif

#ifdef CUCPU_HAS_CPD
// ---------------------------------------------------------------- cpd.cu
size_t cucpu_cpd_workspace_bytes(int64_t P) { return cuda::cpd_workspace_bytes(P); }
int cucpu_cpd_forward(const void* s, const void* t, const void* s0, int d, int64_t P, int64_t k, void* sum_l,
                      void* sum_d, void* thr, int64_t* tie, void* ws) {
  return cuda::cpd_forward(s, t, s0, dt(d), P, k, sum_l, sum_d, thr, tie, ws, nullptr);
}
int cucpu_cpd_backward(const void* go, const void* s, const void* t, int d, int64_t P, const void* thr,
                       const int64_t* tie, const void* sum_d, void* out) {
  return cuda::cpd_backward(go, s, t, dt(d), P, thr, tie, sum_d, out, nullptr);
}
int cucpu_cpd_keep_mask(const void* l, int d, int64_t P, int64_t k, bool* out, void* ws) {
  return cuda::cpd_keep_mask(l, dt(d), P, k, out, ws, nullptr);
}
#endif

#ifdef CUCPU_HAS_COVARIANCE
// ---------------------------------------------------------------- covariance.cu
int cucpu_cov_forward(const void* x, int d, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
                      int64_t C, int64_t L, void* sigma, void* mean) {
  return cuda::cov_forward(x, dt(d), perm, offsets, N, K, C, L, sigma, mean, nullptr);
}
int cucpu_cov_backward(const void* x, int d, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
                       int64_t C, int64_t L, const void* mean, const void* M, void* out) {
  return cuda::cov_backward(x, dt(d), perm, offsets, N, K, C, L, mean, M, out, nullptr);
}
#endif

#ifdef CUCPU_HAS_FEATURES
// ---------------------------------------------------------------- features.cu
int cucpu_seg_mean(const void* x, int d, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K, int64_t D,
                   void* mean) {
  return cuda::seg_mean(x, dt(d), perm, offsets, N, K, D, mean, nullptr);
}
int cucpu_cc_forward(const void* x, int d, const int64_t* perm, const int64_t* offsets, int64_t N, int64_t K,
                     int64_t D, void* mean, void* sq, double* ws) {
  return cuda::cc_forward(x, dt(d), perm, offsets, N, K, D, mean, sq, ws, nullptr);
}
int cucpu_cc_backward(const void* go, const void* x, int d, const int64_t* perm, const int64_t* offsets, int64_t N,
                      int64_t K, int64_t D, const void* mean, double coef, void* out) {
  return cuda::cc_backward(go, x, dt(d), perm, offsets, N, K, D, mean, coef, out, nullptr);
}
#endif


}  // extern "C"
