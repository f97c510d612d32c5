// Grad-CAM (docs/ops.md) on CPU: channel weights, weighted sum, ReLU, min-max, upsample.
// One task per image; everything for that image stays in a per-thread scratch of O(C + h*w).
#include "kernels.h"
#include "../dtypes.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <edfkern/common.h>

#include <algorithm>
#include <vector>

namespace edfkern {
namespace cpu {
namespace {

template <typename scalar_t>
void grad_cam_impl(const at::Tensor& A, const at::Tensor& G, const at::Tensor* A_clean, CamMethod method,
                   bool normalize, int64_t H, int64_t W, bool resize, at::Tensor& out) {
  using acc_t = acc_of<scalar_t>;
  // The channel weights and the weighted channel sum are accumulated in double: gradcam++'s alpha
  // divides by 2G^2 + sum(A G^3), which nearly cancels on some channels, and a sequential float sum
  // there lands several times farther from the exact map than torch's own float32 reductions.
  // The map is then rounded to acc and normalised and upsampled in acc, as the reference does.
  using sum_t = double;
  const acc_t eps = static_cast<acc_t>(1e-8);
  const bool smooth = method == CamMethod::Smooth;
  const int64_t S = smooth ? A.size(0) : 1;
  const int64_t N = A.size(-4), C = A.size(-3), h = A.size(-2), w = A.size(-1), hw = h * w;
  const scalar_t* a_all = A.data_ptr<scalar_t>();
  const scalar_t* g_all = G.data_ptr<scalar_t>();
  const scalar_t* a_clean = A_clean ? A_clean->data_ptr<scalar_t>() : nullptr;
  const int64_t slice = N * C * hw;                            // one noisy pass
  const scalar_t* a_last = a_all + (S - 1) * slice;           // weights and map from the last pass
  const scalar_t* g_last = g_all + (S - 1) * slice;
  // Any explicit size interpolates, as F.interpolate does even at the same size: there an
  // infinite value becomes NaN (inf * 1 + inf * 0), a finite one is unchanged.
  const bool up = resize;
  std::vector<int64_t> y0(H), y1(H), x0(W), x1(W);
  std::vector<acc_t> wy0(H), wy1(H), wx0(W), wx1(W);
  for (int64_t y = 0; y < H; ++y) linear_src<acc_t>(y, h, H, y0[y], y1[y], wy0[y], wy1[y]);
  for (int64_t x = 0; x < W; ++x) linear_src<acc_t>(x, w, W, x0[x], x1[x], wx0[x], wx1[x]);
  acc_t* o = out.data_ptr<acc_t>();

  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<sum_t> wts(C), csum(hw), d2(hw), d3(hw);
    std::vector<acc_t> cam(hw), rows(h * W);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t base = (n * C + c) * hw;
        const scalar_t* g = g_last + base;
        sum_t wc = 0;
        if (method == CamMethod::GradCAM) {
          for (int64_t p = 0; p < hw; ++p) wc += static_cast<sum_t>(g[p]);
          wc = wc / static_cast<sum_t>(hw);
        } else {
          const scalar_t* act = smooth ? a_clean + base : a_last + base;
          if (smooth) {  // D2, D3: moments over the S passes
            std::fill(d2.begin(), d2.end(), sum_t(0));
            std::fill(d3.begin(), d3.end(), sum_t(0));
            for (int64_t s = 0; s < S; ++s) {
              const scalar_t* gs = g_all + s * slice + base;
              for (int64_t p = 0; p < hw; ++p) {
                const sum_t v = static_cast<sum_t>(gs[p]);
                const sum_t v2 = v * v;
                d2[p] += v2;
                d3[p] += v2 * v;
              }
            }
            for (int64_t p = 0; p < hw; ++p) {
              d2[p] = d2[p] / static_cast<sum_t>(S);
              d3[p] = d3[p] / static_cast<sum_t>(S);
            }
          } else {
            for (int64_t p = 0; p < hw; ++p) {
              const sum_t v = static_cast<sum_t>(g[p]);
              d2[p] = v * v;
              d3[p] = v * v * v;
            }
          }
          sum_t denom = 0;
          for (int64_t p = 0; p < hw; ++p) denom += static_cast<sum_t>(act[p]) * d3[p];
          for (int64_t p = 0; p < hw; ++p) {
            const sum_t alpha = d2[p] / (sum_t(2) * d2[p] + denom + sum_t(1e-8));
            const sum_t gv = static_cast<sum_t>(g[p]);
            wc += alpha * relu_nan(gv);
          }
        }
        wts[c] = wc;
      }
      std::fill(csum.begin(), csum.end(), sum_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* act = a_last + (n * C + c) * hw;
        const sum_t wc = wts[c];
        for (int64_t p = 0; p < hw; ++p) csum[p] += wc * static_cast<sum_t>(act[p]);
      }
      for (int64_t p = 0; p < hw; ++p) cam[p] = static_cast<acc_t>(csum[p]);
      for (int64_t p = 0; p < hw; ++p) cam[p] = relu_nan(cam[p]);
      if (normalize) {
        acc_t lo = cam[0];
        for (int64_t p = 1; p < hw; ++p) lo = min_nan(lo, cam[p]);
        acc_t hi = cam[0] - lo;
        for (int64_t p = 0; p < hw; ++p) {
          cam[p] = cam[p] - lo;
          hi = max_nan(hi, cam[p]);
        }
        const acc_t den = hi + eps;
        for (int64_t p = 0; p < hw; ++p) cam[p] = cam[p] / den;
      }
      acc_t* on = o + n * H * W;
      if (!up) {
        std::copy(cam.begin(), cam.end(), on);
        continue;
      }
      for (int64_t a = 0; a < h; ++a)
        for (int64_t x = 0; x < W; ++x)
          rows[a * W + x] = wx0[x] * cam[a * w + x0[x]] + wx1[x] * cam[a * w + x1[x]];
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x)
          on[y * W + x] = wy0[y] * rows[y0[y] * W + x] + wy1[y] * rows[y1[y] * W + x];
    }
  });
}

}  // namespace

at::Tensor grad_cam(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& A_clean,
                    CamMethod m, bool normalize, std::optional<std::pair<int64_t, int64_t>> size) {
  const int64_t N = A.size(-4), h = A.size(-2), w = A.size(-1);
  const int64_t H = size ? size->first : h, W = size ? size->second : w;
  auto out = at::empty({N, H, W}, A.options().dtype(acc_dtype(A.scalar_type())));
  if (N == 0) return out;
  const at::Tensor* clean = (m == CamMethod::Smooth) ? &A_clean.value() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "edfkern_grad_cam", [&] {
    grad_cam_impl<scalar_t>(A, G, clean, m, normalize, H, W, size.has_value(), out);
  });
  return out;
}

}  // namespace cpu
}  // namespace edfkern
