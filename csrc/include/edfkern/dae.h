// DAE (docs/ops.md): the arguments, the mask dtype, the threshold and mask rules and the SGD update,
// shared by the CPU kernels (csrc/cpu/dae.cpp) and the CUDA kernels (csrc/cuda/dae.cu), and the
// CUDA launchers. Torch-free (common.h).
#pragma once

#include <cstddef>

#include <edfkern/common.h>

struct CUstream_st;

namespace edfkern {

// The mask's arguments (what the user passes to every DAE op).
struct DaeArgs {
  double beta;
  bool has_threshold;  // false: tau = per-image mean of the upsampled map
  double threshold;
};

// torch.optim.SGD's single-tensor update (dae_sgd_step_), applied to d = grad * mask.
struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;

  // One element, in the mask dtype m_t: gm = grad * mask, p the parameter, b the momentum buffer
  // (read only with use_momentum); returns the new parameter. store(v) writes the new buffer value in
  // the buffer's dtype and returns the value stored, which feeds nesterov and the update, as in torch.
  // The switches are arguments so that the CPU loops can pass compile-time constants (branch-free,
  // vectorised); CUDA passes the runtime values. use_momentum: momentum != 0 (a buffer exists);
  // use_decay: weight_decay != 0.
  template <typename m_t, typename Store>
  EDFKERN_HD m_t step(m_t gm, m_t p, m_t b, bool use_momentum, bool use_nesterov, bool use_decay,
                      Store&& store) const {
    m_t d = (maximize ? m_t(-1) : m_t(1)) * gm;  // exact negation
    if (use_decay) d = d + static_cast<m_t>(weight_decay) * p;
    if (use_momentum) {
      const m_t mom = static_cast<m_t>(momentum);
      const m_t bs = store(first_step ? d : b * mom + static_cast<m_t>(1.0 - dampening) * d);
      d = use_nesterov ? d + mom * bs : bs;
    }
    return p - static_cast<m_t>(lr) * d;
  }
};

// The mask is computed in float64 when the CAM or the tensor it scales is float64, else in float32
// (edfkern/reference/dae.py). dae_mask scales nothing: its `scaled` is the CAM itself.
constexpr DType dae_mask_dtype(DType cam, DType scaled) {
  return cam == DType::F64 || scaled == DType::F64 ? DType::F64 : DType::F32;
}

// The mask rule, in the mask dtype m_t: an upsampled CAM pixel u against its image's threshold tau
// gives u + beta where u >= tau, else 1. Built once per call from the user's arguments
// (MaskRule<m_t>::of(a)); the CPU loops keep a copy in a local, so its fields are loop invariants.
template <typename m_t>
struct MaskRule {
  m_t beta;
  EDFKERN_HD static MaskRule of(const DaeArgs& a) { return MaskRule{static_cast<m_t>(a.beta)}; }
  EDFKERN_HD m_t operator()(m_t u, m_t tau) const { return u >= tau ? u + beta : m_t(1); }
};

// The weight each of the `in` inputs of one axis gets in the bilinear upsampling to `out` outputs,
// summed over the outputs (mass[i] += l0 at i0, l1 at i1; mass starts at zero). With the masses of
// both axes the per-image mean of U(cam) needs only the low-resolution map (dae_separable_mean).
template <typename m_t>
EDFKERN_HD void dae_axis_mass(int64_t in, int64_t out, double* mass) {
  for (int64_t i = 0; i < in; ++i) mass[i] = 0.0;
  for (int64_t o = 0; o < out; ++o) {
    int64_t i0, i1;
    m_t l0, l1;
    linear_src<m_t>(o, in, out, i0, i1, l0, l1);
    mass[i0] += static_cast<double>(l0);
    mass[i1] += static_cast<double>(l1);
  }
}

// tau of a finite map: the mean of U(cam) over the (H, W) pixels,
//   sum_ab cam[a, b] * mass_y[a] * mass_x[b] / (H * W), summed in double, row by row.
template <typename m_t>
EDFKERN_HD m_t dae_separable_mean(const m_t* cam, int64_t h, int64_t w, const double* mass_y, const double* mass_x,
                                  int64_t HW) {
  double s = 0.0;
  for (int64_t a = 0; a < h; ++a) {
    double r = 0.0;
    for (int64_t j = 0; j < w; ++j) r += static_cast<double>(cam[a * w + j]) * mass_x[j];
    s += r * mass_y[a];
  }
  return static_cast<m_t>(s / static_cast<double>(HW));
}

// Sizes of one DAE call: N images of C channels at (H, W), CAMs at (h, w).
struct DaeShape {
  int64_t N, C, h, w, H, W;
};

namespace cuda {

// Launchers (every one returns a cudaError_t value, 0 = success). `cam` is (N, h, w) already in the
// mask dtype `m` (dae_mask_dtype); `ws` is a device workspace of dae_workspace_bytes(shape) bytes.
size_t dae_workspace_bytes(const DaeShape& s);
// out (N, 1, H, W) in out_dtype.
int dae_mask(const void* cam, DType m, void* out, DType out_dtype, const DaeShape& s, const DaeArgs& a, void* ws,
             CUstream_st* stream);
// grad (N, C, H, W) in g_dtype: grad *= mask.
int dae_apply(void* grad, DType g_dtype, const void* cam, DType m, const DaeShape& s, const DaeArgs& a, void* ws,
              CUstream_st* stream);
// param, grad, buf (N, C, H, W) in g_dtype: SGD's update on d = grad * mask; buf is null without momentum.
int dae_sgd_step(void* param, const void* grad, void* buf, DType g_dtype, const void* cam, DType m,
                 const DaeShape& s, const DaeArgs& a, const SgdArgs& sgd, void* ws, CUstream_st* stream);

}  // namespace cuda
}  // namespace edfkern
