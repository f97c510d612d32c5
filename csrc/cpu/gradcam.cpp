// Grad-CAM (docs/ops.md) on CPU: channel weights, weighted sum, ReLU, min-max, upsample.
// Blocks of images shared out to the threads; an image's scratch is per thread, O(h*w).
//
// The channel weights and the weighted channel sum are accumulated in double: gradcam++'s alpha
// divides by 2G^2 + sum(A G^3), which nearly cancels on some channels, and a float sum there lands
// several times farther from the exact map than torch's own float32 reductions. The h*w-term sums
// run in a fixed order, kLanes partial sums (lane j takes positions j, j + kLanes, ...) then a
// fixed tree, so they vectorise (a sequential double sum cannot be reordered by the compiler) and
// give the same bits on every machine and thread count. The sums over c (the map) stay sequential.
// The map is then rounded to acc and normalised and upsampled in acc, as the reference does.
#include "kernels.h"
#include "../dtypes.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <edfkern/common.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace edfkern {
namespace cpu {
namespace {

using sum_t = double;
constexpr int64_t kLanes = 8;  // one 512-bit vector of doubles

// sum_p t[p] over hwp = nb * kLanes entries (zero beyond h*w): lanes, then a fixed tree.
inline sum_t lane_sum(const sum_t* __restrict t, int64_t nb) {
  sum_t lane[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) lane[j] = t[j];
  for (int64_t b = 1; b < nb; ++b)
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += t[b * kLanes + j];
  for (int64_t j = 0; j < 4; ++j) lane[j] += lane[j + 4];
  for (int64_t j = 0; j < 2; ++j) lane[j] += lane[j + 2];
  return lane[0] + lane[1];
}


#if defined(__AVX512F__)
// The channel loop of grad_cam_impl for float / double input and h*w = NB * kLanes, in AVX-512:
// the same operations in the same order as the portable loop (lane j of block b is position
// b * kLanes + j; lane_sum's tree is lo256 + hi256, lo128 + hi128, then the two lanes), so both
// give the same bits. csum stays in registers across the C channels of one image.
template <typename scalar_t>
inline __m512d load8(const scalar_t* p) {
  if constexpr (std::is_same<scalar_t, float>::value) return _mm512_cvtps_pd(_mm256_loadu_ps(p));
  else return _mm512_loadu_pd(p);
}

inline sum_t hsum(__m512d v) {
  const __m256d q = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
  const __m128d d = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
  return _mm_cvtsd_f64(d) + _mm_cvtsd_f64(_mm_unpackhi_pd(d, d));
}

inline __m512d relu8(__m512d v) {  // v < 0 ? 0 : v (NaN and -0 kept)
  const __m512d z = _mm512_setzero_pd();
  return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(v, z, _CMP_LT_OQ), v, z);
}

#ifndef EDFKERN_GRADCAM_PREFETCH
#define EDFKERN_GRADCAM_PREFETCH 1024
#endif
constexpr int64_t kPrefetch = EDFKERN_GRADCAM_PREFETCH;

template <typename scalar_t, int64_t NB>
void channel_loop_avx512(const scalar_t* g_all, const scalar_t* a_last, const scalar_t* act_all, int64_t slice,
                         int64_t S, int64_t n, int64_t C, CamMethod method, sum_t guard, sum_t* csum) {
  constexpr int64_t hw = NB * kLanes;
  const int64_t g_off = (S - 1) * slice;
  __m512d cs[NB];
  for (int64_t b = 0; b < NB; ++b) cs[b] = _mm512_setzero_pd();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t base = (n * C + c) * hw;
    const scalar_t* g = g_all + g_off + base;
    // S + 2 streams (S + 1 for gradcam, 2 for gradcam++) of hw elements a channel: the hardware
    // prefetchers alone leave the loads waiting on DRAM; fetch kPrefetch bytes ahead in each.
    {
      const int64_t ahead = base + kPrefetch / static_cast<int64_t>(sizeof(scalar_t));
      const int64_t ns = method == CamMethod::Smooth ? S : 1;
      for (int64_t s = S - ns; s < S; ++s)
        _mm_prefetch(reinterpret_cast<const char*>(g_all + s * slice + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(a_last + ahead), _MM_HINT_T0);
      if (method == CamMethod::Smooth) _mm_prefetch(reinterpret_cast<const char*>(act_all + ahead), _MM_HINT_T0);
    }
    sum_t wc;
    if (method == CamMethod::GradCAM) {
      __m512d l = load8(g);
      for (int64_t b = 1; b < NB; ++b) l = _mm512_add_pd(l, load8(g + b * kLanes));
      wc = hsum(l) / static_cast<sum_t>(hw);
    } else {
      __m512d d2[NB], d3[NB];
      for (int64_t b = 0; b < NB; ++b) {
        const __m512d v = load8(g_all + base + b * kLanes);
        const __m512d v2 = _mm512_mul_pd(v, v);
        d2[b] = v2;
        d3[b] = _mm512_mul_pd(v2, v);
      }
      for (int64_t s = 1; s < S; ++s) {
        const scalar_t* gs = g_all + s * slice + base;
        for (int64_t b = 0; b < NB; ++b) {
          const __m512d v = load8(gs + b * kLanes);
          const __m512d v2 = _mm512_mul_pd(v, v);
          d2[b] = _mm512_add_pd(d2[b], v2);
          d3[b] = _mm512_add_pd(d3[b], _mm512_mul_pd(v2, v));
        }
      }
      const scalar_t* act = act_all + base;
      __m512d l = _mm512_mul_pd(load8(act), d3[0]);
      for (int64_t b = 1; b < NB; ++b) l = _mm512_add_pd(l, _mm512_mul_pd(load8(act + b * kLanes), d3[b]));
      const __m512d k = _mm512_set1_pd(hsum(l) + guard);
      const __m512d two = _mm512_set1_pd(2.0);
      __m512d r = _mm512_setzero_pd();
      for (int64_t b = 0; b < NB; ++b) {
        const __m512d alpha = _mm512_div_pd(d2[b], _mm512_add_pd(_mm512_mul_pd(two, d2[b]), k));
        const __m512d tb = _mm512_mul_pd(alpha, relu8(load8(g + b * kLanes)));
        r = b == 0 ? tb : _mm512_add_pd(r, tb);
      }
      wc = hsum(r);
    }
    const __m512d wv = _mm512_set1_pd(wc);
    const scalar_t* al = a_last + base;
    for (int64_t b = 0; b < NB; ++b) cs[b] = _mm512_add_pd(cs[b], _mm512_mul_pd(wv, load8(al + b * kLanes)));
  }
  for (int64_t b = 0; b < NB; ++b) _mm512_storeu_pd(csum + b * kLanes, cs[b]);
}
#endif

// HW > 0: h*w known at compile time (the same code, fixed trip counts); HW == 0: runtime h*w.
template <typename scalar_t, int64_t HW>
void grad_cam_impl(const at::Tensor& A, const at::Tensor& G, const at::Tensor* A_clean, CamMethod method,
                   bool normalize, int64_t H, int64_t W, bool resize, at::Tensor& out) {
  using acc_t = acc_of<scalar_t>;
  const acc_t eps = static_cast<acc_t>(1e-8);
  const bool smooth = method == CamMethod::Smooth;
  const int64_t S = smooth ? A.size(0) : 1;
  const int64_t N = A.size(-4), C = A.size(-3), h = A.size(-2), w = A.size(-1);
  const int64_t hw = HW > 0 ? HW : h * w;
  const int64_t nb = (hw + kLanes - 1) / kLanes, hwp = nb * kLanes;
  const scalar_t* a_all = A.data_ptr<scalar_t>();
  const scalar_t* g_all = G.data_ptr<scalar_t>();
  const scalar_t* a_clean = A_clean ? A_clean->data_ptr<scalar_t>() : nullptr;
  const int64_t slice = N * C * hw;                            // one noisy pass
  const scalar_t* a_last = a_all + (S - 1) * slice;           // weights and map from the last pass
  const scalar_t* g_last = g_all + (S - 1) * slice;
  // alpha = D2 / (2 D2 + sum(A D3) + 1e-8) with D2, D3 the means over S is, multiplied through by
  // S, D2s / (2 D2s + sum(A D3s) + S 1e-8) with the plain sums D2s, D3s: no divide by S per element.
  const sum_t guard = static_cast<sum_t>(S) * sum_t(1e-8);
  // Any explicit size interpolates, as F.interpolate does even at the same size: there an
  // infinite value becomes NaN (inf * 1 + inf * 0), a finite one is unchanged.
  const bool up = resize;
  std::vector<int64_t> y0(H), y1(H), x0(W), x1(W);
  std::vector<acc_t> wy0(H), wy1(H), wx0(W), wx1(W);
  for (int64_t y = 0; y < H; ++y) linear_src<acc_t>(y, h, H, y0[y], y1[y], wy0[y], wy1[y]);
  for (int64_t x = 0; x < W; ++x) linear_src<acc_t>(x, w, W, x0[x], x1[x], wx0[x], wx1[x]);
  acc_t* o = out.data_ptr<acc_t>();

  // Images are independent: each worker takes blocks of kBlock images from a shared counter, so
  // a thread the OS deschedules (the machine is shared) leaves its work to the others instead of
  // holding up a static split. The result does not depend on which thread takes which block.
  constexpr int64_t kBlock = 16;
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nblocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    // d2, d3, t: hwp entries, zero beyond hw (never written there): the lane sums' padding.
    std::vector<sum_t> buf(3 * hwp + hw, sum_t(0));
    sum_t* __restrict d2 = buf.data();
    sum_t* __restrict d3 = d2 + hwp;
    sum_t* __restrict t = d3 + hwp;
    sum_t* __restrict csum = t + hwp;
    std::vector<acc_t> cam(hw), rows(h * W);
    for (int64_t blk; (blk = next.fetch_add(1, std::memory_order_relaxed)) < nblocks;) {
    for (int64_t n = blk * kBlock, n1 = std::min(N, n + kBlock); n < n1; ++n) {
#if defined(__AVX512F__)
      if constexpr (HW > 0 && HW % kLanes == 0 &&
                    (std::is_same<scalar_t, float>::value || std::is_same<scalar_t, double>::value)) {
        channel_loop_avx512<scalar_t, HW / kLanes>(g_all, a_last, smooth ? a_clean : a_last, slice, S, n, C,
                                                   method, guard, csum);
      } else
#endif
      {
        std::fill(csum, csum + hw, sum_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const int64_t base = (n * C + c) * hw;
          const scalar_t* __restrict g = g_last + base;
          const scalar_t* __restrict al = a_last + base;
          sum_t wc;
          if (method == CamMethod::GradCAM) {
            for (int64_t p = 0; p < hw; ++p) t[p] = static_cast<sum_t>(g[p]);
            wc = lane_sum(t, nb) / static_cast<sum_t>(hw);
          } else {
            const scalar_t* __restrict act = smooth ? a_clean + base : al;
            for (int64_t p = 0; p < hw; ++p) {  // D2s, D3s: sums over the S passes
              const sum_t v = static_cast<sum_t>(g_all[base + p]);
              const sum_t v2 = v * v;
              d2[p] = v2;
              d3[p] = v2 * v;
            }
            for (int64_t s = 1; s < S; ++s) {
              const scalar_t* __restrict gs = g_all + s * slice + base;
              for (int64_t p = 0; p < hw; ++p) {
                const sum_t v = static_cast<sum_t>(gs[p]);
                const sum_t v2 = v * v;
                d2[p] += v2;
                d3[p] += v2 * v;
              }
            }
            for (int64_t p = 0; p < hw; ++p) t[p] = static_cast<sum_t>(act[p]) * d3[p];
            const sum_t k = lane_sum(t, nb) + guard;
            for (int64_t p = 0; p < hw; ++p) {
              const sum_t alpha = d2[p] / (sum_t(2) * d2[p] + k);
              t[p] = alpha * relu_nan(static_cast<sum_t>(g[p]));
            }
            wc = lane_sum(t, nb);
          }
          for (int64_t p = 0; p < hw; ++p) csum[p] += wc * static_cast<sum_t>(al[p]);
        }
      }
      for (int64_t p = 0; p < hw; ++p) cam[p] = relu_nan(static_cast<acc_t>(csum[p]));
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
    // 4x4 is ResNet layer4 on 32-px inputs (CIFAR), 8x8 on 256-px ones, 7x7 on 224-px ones.
    switch (h * w) {
      case 16: grad_cam_impl<scalar_t, 16>(A, G, clean, m, normalize, H, W, size.has_value(), out); break;
      case 64: grad_cam_impl<scalar_t, 64>(A, G, clean, m, normalize, H, W, size.has_value(), out); break;
      case 49: grad_cam_impl<scalar_t, 49>(A, G, clean, m, normalize, H, W, size.has_value(), out); break;
      default: grad_cam_impl<scalar_t, 0>(A, G, clean, m, normalize, H, W, size.has_value(), out); break;
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace edfkern
