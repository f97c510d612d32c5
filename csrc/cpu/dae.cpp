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
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <edfkern/common.h>

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

  Axis(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out), mass(in, 0.0) {
    for (int64_t o = 0; o < out; ++o) {
      linear_src<m_t>(o, in, out, i0[o], i1[o], l0[o], l1[o]);
      mass[i0[o]] += static_cast<double>(l0[o]);
      mass[i1[o]] += static_cast<double>(l1[o]);
    }
  }
};

// Mask of one image into `mask` (H*W), using `rows` (h*W) as scratch.
template <typename m_t>
struct MaskMaker {
  int64_t h, w, H, W;
  Axis<m_t> ay, ax;
  bool fixed;
  m_t thr, beta;

  MaskMaker(int64_t h_, int64_t w_, int64_t H_, int64_t W_, std::optional<double> threshold, double beta_)
      : h(h_), w(w_), H(H_), W(W_), ay(h_, H_), ax(w_, W_), fixed(threshold.has_value()),
        thr(static_cast<m_t>(threshold.value_or(0.0))), beta(static_cast<m_t>(beta_)) {}

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
    const m_t b = beta;
    if (finite && lo == hi) {  // flat map: U(cam) is the constant and so is its mean (docs/special-values.md)
      const m_t tau = fixed ? thr : lo;
      const m_t val = lo >= tau ? lo + b : m_t(1);
      for (int64_t p = 0; p < HW; ++p) mask[p] = val;
      return;
    }
    m_t tau = thr;
    if (!fixed && finite) {  // mean of U(cam) = sum_ab cam[a,b] * mass_y[a] * mass_x[b] / (H*W)
      double s = 0.0;
      for (int64_t a = 0; a < h; ++a) {
        double r = 0.0;
        for (int64_t j = 0; j < w; ++j) r += static_cast<double>(cam[a * w + j]) * ax.mass[j];
        s += r * ay.mass[a];
      }
      tau = static_cast<m_t>(s / static_cast<double>(HW));
    }
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
      for (int64_t p = 0; p < HW; ++p) mask[p] = mask[p] >= tau ? mask[p] + b : m_t(1);
      return;
    }
    // vertical pass and threshold (locals and restrict: a store to the mask must not be
    // assumed to alias beta or the rows, or the loop stays scalar)
    for (int64_t y = 0; y < H; ++y) {
      const m_t* __restrict__ r0 = rows + ay.i0[y] * W;
      const m_t* __restrict__ r1 = rows + ay.i1[y] * W;
      const m_t w0 = ay.l0[y], w1 = ay.l1[y];
      m_t* __restrict__ m = mask + y * W;
      for (int64_t x = 0; x < W; ++x) {
        const m_t u = w0 * r0[x] + w1 * r1[x];
        m[x] = u >= tau ? u + b : m_t(1);
      }
    }
  }
};

// The mask is computed in float64 when the CAM or the gradient is float64, else float32
// (edfkern::dae_mask_in_double), as the reference does.
template <typename m_t, typename F>
void for_each_image(const at::Tensor& cam_m, int64_t N, int64_t H, int64_t W, std::optional<double> threshold,
                    double beta, int64_t work_per_image, const F& body) {
  const int64_t h = cam_m.size(1), w = cam_m.size(2);
  const MaskMaker<m_t> make(h, w, H, W, threshold, beta);
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

}  // namespace

at::Tensor dae_mask(const at::Tensor& cam, double beta, std::optional<double> threshold, int64_t H, int64_t W) {
  const int64_t N = cam.size(0);
  auto out = at::empty({N, 1, H, W}, cam.options());
  if (N == 0 || H * W == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cam.scalar_type(), "edfkern_dae_mask", [&] {
    using m_t = at::opmath_type<scalar_t>;
    auto cam_m = cam.to(c10::CppTypeToScalarType<m_t>::value).contiguous();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_image<m_t>(cam_m, N, H, W, threshold, beta, H * W, [&](int64_t n, const m_t* mask) {
      scalar_t* on = o + n * H * W;
      for (int64_t p = 0; p < H * W; ++p) on[p] = static_cast<scalar_t>(mask[p]);
    });
  });
  return out;
}

namespace {
template <typename scalar_t, typename m_t>
void dae_impl(const at::Tensor& grad, const at::Tensor& cam, double beta, std::optional<double> threshold) {
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3), HW = H * W;
  auto cam_m = cam.to(c10::CppTypeToScalarType<m_t>::value).contiguous();
  scalar_t* g = grad.data_ptr<scalar_t>();
  for_each_image<m_t>(cam_m, N, H, W, threshold, beta, C * HW, [&](int64_t n, const m_t* mask) {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* gc = g + (n * C + c) * HW;
      for (int64_t p = 0; p < HW; ++p) gc[p] = static_cast<scalar_t>(static_cast<m_t>(gc[p]) * mask[p]);
    }
  });
}

struct SGDArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

// torch.optim.SGD's single-tensor update on d = grad * mask, in m_t; the buffer is stored in
// scalar_t and the stored value feeds nesterov / the parameter update. The mode switches are
// template parameters so that every inner loop is branch-free and vectorises.
template <typename scalar_t, typename m_t, bool kMomentum, bool kNesterov, bool kWD>
void sgd_loop(scalar_t* __restrict__ pc, const scalar_t* __restrict__ gc, scalar_t* __restrict__ bc,
              const m_t* __restrict__ mask, int64_t HW, m_t sign, m_t lr, m_t mom, m_t damp1, m_t wd, bool first) {
  for (int64_t i = 0; i < HW; ++i) {
    m_t d = sign * (static_cast<m_t>(gc[i]) * mask[i]);  // sign = -1 for maximize (exact)
    const m_t pv = static_cast<m_t>(pc[i]);
    if (kWD) d = d + wd * pv;
    if (kMomentum) {
      const m_t b = first ? d : static_cast<m_t>(bc[i]) * mom + damp1 * d;
      const scalar_t bq = static_cast<scalar_t>(b);
      bc[i] = bq;
      const m_t bs = static_cast<m_t>(bq);
      d = kNesterov ? d + mom * bs : bs;
    }
    pc[i] = static_cast<scalar_t>(pv - lr * d);
  }
}

template <typename scalar_t, typename m_t, bool kMomentum, bool kNesterov, bool kWD>
void sgd_impl(const at::Tensor& param, const at::Tensor& grad, scalar_t* buf, const at::Tensor& cam, double beta,
              std::optional<double> threshold, const SGDArgs& a) {
  const int64_t N = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3), HW = H * W;
  auto cam_m = cam.to(c10::CppTypeToScalarType<m_t>::value).contiguous();
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const m_t lr = static_cast<m_t>(a.lr), mom = static_cast<m_t>(a.momentum);
  const m_t damp1 = static_cast<m_t>(1.0 - a.dampening), wd = static_cast<m_t>(a.weight_decay);
  const m_t sign = a.maximize ? m_t(-1) : m_t(1);
  const bool first = a.first_step;
  for_each_image<m_t>(cam_m, N, H, W, threshold, beta, 3 * C * HW, [&](int64_t n, const m_t* mask) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t base = (n * C + c) * HW;
      sgd_loop<scalar_t, m_t, kMomentum, kNesterov, kWD>(p + base, g + base, kMomentum ? buf + base : nullptr, mask,
                                                         HW, sign, lr, mom, damp1, wd, first);
    }
  });
}

template <typename scalar_t, typename m_t>
void sgd_dispatch(const at::Tensor& param, const at::Tensor& grad, scalar_t* buf, const at::Tensor& cam,
                  double beta, std::optional<double> threshold, const SGDArgs& a) {
  const bool wd = a.weight_decay != 0.0;
  if (buf == nullptr) {
    if (wd) sgd_impl<scalar_t, m_t, false, false, true>(param, grad, buf, cam, beta, threshold, a);
    else sgd_impl<scalar_t, m_t, false, false, false>(param, grad, buf, cam, beta, threshold, a);
  } else if (a.nesterov) {
    if (wd) sgd_impl<scalar_t, m_t, true, true, true>(param, grad, buf, cam, beta, threshold, a);
    else sgd_impl<scalar_t, m_t, true, true, false>(param, grad, buf, cam, beta, threshold, a);
  } else {
    if (wd) sgd_impl<scalar_t, m_t, true, false, true>(param, grad, buf, cam, beta, threshold, a);
    else sgd_impl<scalar_t, m_t, true, false, false>(param, grad, buf, cam, beta, threshold, a);
  }
}
}  // namespace

void dae_(const at::Tensor& grad, const at::Tensor& cam, double beta, std::optional<double> threshold) {
  if (grad.numel() == 0) return;
  const bool dbl = edfkern::dae_mask_in_double(cam, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "edfkern_dae_", [&] {
    if (dbl) dae_impl<scalar_t, double>(grad, cam, beta, threshold);
    else dae_impl<scalar_t, float>(grad, cam, beta, threshold);
  });
}

void dae_sgd_step_(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& buf,
                   const at::Tensor& cam, double lr, double beta, std::optional<double> threshold, double momentum,
                   double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  if (param.numel() == 0) return;
  const SGDArgs a{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  const bool dbl = edfkern::dae_mask_in_double(cam, grad);
  const bool has_buf = momentum != 0.0 && buf.has_value();
  TORCH_CHECK(momentum == 0.0 || has_buf, "edfkern_native.dae_sgd_step_: momentum != 0 needs a momentum buffer");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "edfkern_dae_sgd_step_", [&] {
    scalar_t* b = has_buf ? buf->data_ptr<scalar_t>() : nullptr;
    if (dbl) sgd_dispatch<scalar_t, double>(param, grad, b, cam, beta, threshold, a);
    else sgd_dispatch<scalar_t, float>(param, grad, b, cam, beta, threshold, a);
  });
}

}  // namespace cpu
}  // namespace edfkern
