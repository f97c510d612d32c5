// DAE (docs/ops.md) on CPU: mask = U(cam) + beta where U(cam) >= tau, else 1.
// Flat CAMs and NaN / inf follow docs/special-values.md.
//
// One pass per image: the low-resolution CAM is upsampled on the fly into a per-thread
// (H, W) scratch row block (never an (N, H, W) map), tau comes from the low-resolution map
// through the separable column sums of the bilinear weights, and the mask is applied to every
// channel of the gradient (dae_) or fused with torch.optim.SGD's update (dae_sgd_step_).
// Bytes: dae_ reads and writes grad once; dae_sgd_step_ reads grad/param/buf and writes param/buf.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <edfkern/dae.h>

#include <cmath>
#include <vector>

namespace edfkern {
namespace cpu {
namespace {

// Bilinear weights of one axis, plus how much each input line contributes to the mean.
template <typename m_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<m_t> l0, l1;
  std::vector<double> mass;  // sum over outputs of the weight that lands on each input

  Axis(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out), mass(in) {
    for (int64_t o = 0; o < out; ++o) linear_src<m_t>(o, in, out, i0[o], i1[o], l0[o], l1[o]);
    dae_axis_mass<m_t>(in, out, mass.data());
  }
};

// Mask of one image into `mask` (H*W), using `rows` (h*W) as scratch.
template <typename m_t>
struct MaskMaker {
  int64_t h, w, H, W;
  Axis<m_t> ay, ax;
  bool fixed;
  m_t thr;
  MaskRule<m_t> rule;

  MaskMaker(int64_t h_, int64_t w_, int64_t H_, int64_t W_, const DaeArgs& a)
      : h(h_), w(w_), H(H_), W(W_), ay(h_, H_), ax(w_, W_), fixed(a.has_threshold),
        thr(static_cast<m_t>(a.threshold)), rule(MaskRule<m_t>::of(a)) {}

  void operator()(const m_t* cam, m_t* rows, m_t* mask) const {
    const int64_t hw = h * w, HW = H * W;
    m_t lo = cam[0], hi = cam[0];
    bool finite = true;
    for (int64_t p = 0; p < hw; ++p) {
      const m_t v = cam[p];
      finite = finite && std::isfinite(v);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    const MaskRule<m_t> mask_of = rule;
    if (finite && lo == hi) {  // flat map: U(cam) is the constant and so is its mean (docs/special-values.md)
      const m_t tau = fixed ? thr : lo;
      const m_t val = mask_of(lo, tau);
      for (int64_t p = 0; p < HW; ++p) mask[p] = val;
      return;
    }
    m_t tau = thr;
    if (!fixed && finite) tau = dae_separable_mean(cam, h, w, ay.mass.data(), ax.mass.data(), HW);
    // horizontal pass: rows[a, x] = l0 * cam[a, x0] + l1 * cam[a, x1]
    for (int64_t a = 0; a < h; ++a) {
      const m_t* c = cam + a * w;
      m_t* r = rows + a * W;
      for (int64_t x = 0; x < W; ++x) r[x] = ax.l0[x] * c[ax.i0[x]] + ax.l1[x] * c[ax.i1[x]];
    }
    if (!fixed && !finite) {
      // NaN / inf in the CAM: the mean of the upsampled map itself, which is NaN or +-inf exactly
      // when the loop's is (a zero weight on an infinite value gives NaN; unused pixels do nothing)
      for (int64_t y = 0; y < H; ++y) {
        const m_t* r0 = rows + ay.i0[y] * W;
        const m_t* r1 = rows + ay.i1[y] * W;
        for (int64_t x = 0; x < W; ++x) mask[y * W + x] = ay.l0[y] * r0[x] + ay.l1[y] * r1[x];
      }
      double s = 0.0;
      for (int64_t p = 0; p < HW; ++p) s += static_cast<double>(mask[p]);
      tau = static_cast<m_t>(s / static_cast<double>(HW));
      for (int64_t p = 0; p < HW; ++p) mask[p] = mask_of(mask[p], tau);
      return;
    }
    // vertical pass and threshold (locals and restrict: a store to the mask must not be
    // assumed to alias the rule or the rows, or the loop stays scalar)
    for (int64_t y = 0; y < H; ++y) {
      const m_t* __restrict__ r0 = rows + ay.i0[y] * W;
      const m_t* __restrict__ r1 = rows + ay.i1[y] * W;
      const m_t w0 = ay.l0[y], w1 = ay.l1[y];
      m_t* __restrict__ m = mask + y * W;
      for (int64_t x = 0; x < W; ++x) {
        const m_t u = w0 * r0[x] + w1 * r1[x];
        m[x] = mask_of(u, tau);
      }
    }
  }
};

// `cam_m` is the CAM already in the mask dtype m_t (edfkern::dae_mask_dtype, applied by the binding).
template <typename m_t, typename F>
void for_each_image(const at::Tensor& cam_m, int64_t N, int64_t H, int64_t W, const DaeArgs& a,
                    int64_t work_per_image, const F& body) {
  const int64_t h = cam_m.size(1), w = cam_m.size(2);
  const MaskMaker<m_t> make(h, w, H, W, a);
  const m_t* cam = cam_m.data_ptr<m_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_image));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    std::vector<m_t> rows(h * W), mask(H * W);
    for (int64_t n = n0; n < n1; ++n) {
      make(cam + n * h * w, rows.data(), mask.data());
      body(n, mask.data());
    }
  });
}

// Calls f(m_t{}) with m_t the element type of the CAM in the mask dtype (float or double).
template <typename F>
void with_mask_type(const at::Tensor& cam_m, const F& f) {
  if (cam_m.scalar_type() == at::kDouble) f(double{});
  else f(float{});
}

template <typename scalar_t, typename m_t>
void dae_impl(const at::Tensor& grad, const at::Tensor& cam_m, const DaeArgs& a) {
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3), HW = H * W;
  scalar_t* g = grad.data_ptr<scalar_t>();
  for_each_image<m_t>(cam_m, N, H, W, a, C * HW, [&](int64_t n, const m_t* mask) {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* gc = g + (n * C + c) * HW;
      for (int64_t p = 0; p < HW; ++p) gc[p] = static_cast<scalar_t>(static_cast<m_t>(gc[p]) * mask[p]);
    }
  });
}

// SgdArgs::step over one channel of one image, in m_t; the buffer is stored in scalar_t. The
// switches are template parameters so that every inner loop is branch-free and vectorises; `s` is
// a copy, so no store through pc / bc can alias its fields.
template <typename scalar_t, typename m_t, bool kMomentum, bool kNesterov, bool kWD>
void sgd_loop(scalar_t* __restrict__ pc, const scalar_t* __restrict__ gc, scalar_t* __restrict__ bc,
              const m_t* __restrict__ mask, int64_t HW, const SgdArgs s) {
  for (int64_t i = 0; i < HW; ++i) {
    const m_t b = kMomentum ? static_cast<m_t>(bc[i]) : m_t(0);
    pc[i] = static_cast<scalar_t>(s.step(static_cast<m_t>(gc[i]) * mask[i], static_cast<m_t>(pc[i]), b, kMomentum,
                                         kNesterov, kWD, [&](m_t v) {
                                           const scalar_t q = static_cast<scalar_t>(v);
                                           bc[i] = q;
                                           return static_cast<m_t>(q);
                                         }));
  }
}

template <typename scalar_t, typename m_t, bool kMomentum, bool kNesterov, bool kWD>
void sgd_impl(const at::Tensor& param, const at::Tensor& grad, scalar_t* buf, const at::Tensor& cam_m,
              const DaeArgs& a, const SgdArgs& s) {
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3), HW = H * W;
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  for_each_image<m_t>(cam_m, N, H, W, a, 3 * C * HW, [&](int64_t n, const m_t* mask) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t base = (n * C + c) * HW;
      sgd_loop<scalar_t, m_t, kMomentum, kNesterov, kWD>(p + base, g + base, kMomentum ? buf + base : nullptr, mask,
                                                         HW, s);
    }
  });
}

template <typename scalar_t, typename m_t>
void sgd_dispatch(const at::Tensor& param, const at::Tensor& grad, scalar_t* buf, const at::Tensor& cam_m,
                  const DaeArgs& a, const SgdArgs& s) {
  const bool wd = s.weight_decay != 0.0;
  if (buf == nullptr) {
    if (wd) sgd_impl<scalar_t, m_t, false, false, true>(param, grad, buf, cam_m, a, s);
    else sgd_impl<scalar_t, m_t, false, false, false>(param, grad, buf, cam_m, a, s);
  } else if (s.nesterov) {
    if (wd) sgd_impl<scalar_t, m_t, true, true, true>(param, grad, buf, cam_m, a, s);
    else sgd_impl<scalar_t, m_t, true, true, false>(param, grad, buf, cam_m, a, s);
  } else {
    if (wd) sgd_impl<scalar_t, m_t, true, false, true>(param, grad, buf, cam_m, a, s);
    else sgd_impl<scalar_t, m_t, true, false, false>(param, grad, buf, cam_m, a, s);
  }
}

}  // namespace

at::Tensor dae_mask(const at::Tensor& cam_m, at::ScalarType out_dtype, int64_t H, int64_t W, const DaeArgs& a) {
  const int64_t N = cam_m.size(0);
  auto out = at::empty({N, 1, H, W}, cam_m.options().dtype(out_dtype));
  if (N == 0 || H * W == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "edfkern_dae_mask", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    with_mask_type(cam_m, [&](auto mt) {
      using m_t = decltype(mt);
      for_each_image<m_t>(cam_m, N, H, W, a, H * W, [&](int64_t n, const m_t* mask) {
        scalar_t* on = o + n * H * W;
        for (int64_t p = 0; p < H * W; ++p) on[p] = static_cast<scalar_t>(mask[p]);
      });
    });
  });
  return out;
}

void dae_(const at::Tensor& grad, const at::Tensor& cam_m, const DaeArgs& a) {
  if (grad.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "edfkern_dae_", [&] {
    with_mask_type(cam_m, [&](auto mt) { dae_impl<scalar_t, decltype(mt)>(grad, cam_m, a); });
  });
}

void dae_sgd_step_(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& buf, const at::Tensor& cam_m,
                   const DaeArgs& a, const SgdArgs& s) {
  if (param.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "edfkern_dae_sgd_step_", [&] {
    scalar_t* b = buf.defined() ? buf.data_ptr<scalar_t>() : nullptr;
    with_mask_type(cam_m, [&](auto mt) { sgd_dispatch<scalar_t, decltype(mt)>(param, grad, b, cam_m, a, s); });
  });
}

}  // namespace cpu
}  // namespace edfkern
