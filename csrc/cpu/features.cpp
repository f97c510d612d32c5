// Segmented reductions over flat features (docs/ops.md: CC and DM) on CPU.
// CC: tasks are (class, group of 256-column slices) pairs: the columns of one class are read once
// for the mean and once more, from cache, for sum ||x_i - mu_k||^2. With at least as many classes
// as threads a group is every column, so a task streams whole rows (slices strided over the rows
// read at under half the copy bandwidth). Per-slice partial sums are combined in a fixed order in
// float64, and the grouping changes no arithmetic, so results do not depend on the thread count.
// seg_mean (DM, and the covariance means): tasks are (class, block of whole rows) pairs, so every
// task streams contiguous rows (a column slice strided over rows ran at 65 % of the copy
// bandwidth, benchmarks/NOTES.md); the block partials are summed per class in block
// order. The blocks are fixed by the row count, not the thread count, so neither is the result.
#include "kernels.h"
#include "groups.h"
#include "../dtypes.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace edfkern {
namespace cpu {
namespace {

constexpr int64_t kCols = 256;

template <typename scalar_t>
void mean_and_sq(const at::Tensor& x, const HostGroups& g, at::Tensor& mean, double* sq_total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = x.size(1), K = g.K();
  const int64_t nchunks = (D + kCols - 1) / kCols;
  // Tasks: (class, group of consecutive slices). One group per class when there are enough
  // classes for the threads, so a task streams whole rows; the per-column arithmetic and the
  // per-slice partials are the same whatever the grouping, so the result is too.
  const int64_t groups = std::min(nchunks, std::max<int64_t>(1, (at::get_num_threads() + K - 1) / K));
  const int64_t per = (nchunks + groups - 1) / groups;  // slices per group
  const scalar_t* xp = x.data_ptr<scalar_t>();
  acc_t* mp = mean.data_ptr<acc_t>();
  std::vector<double> part(K * nchunks, 0.0);
  at::parallel_for(0, K * groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> buf(std::min(D, per * kCols));
    acc_t* __restrict__ acc = buf.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k = t / groups, s0 = (t % groups) * per, s1 = std::min(nchunks, s0 + per);
      if (s0 >= s1) continue;
      const int64_t c0 = s0 * kCols, w = std::min(D, s1 * kCols) - c0;
      const int64_t j0 = g.offsets[k], j1 = g.offsets[k + 1];
      // Four rows per step, summed in pairs: the loops vectorise over c and touch acc a quarter as often.
      std::fill(acc, acc + w, acc_t(0));
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4) {
        const scalar_t* __restrict__ r0 = xp + g.row(j) * D + c0;
        const scalar_t* __restrict__ r1 = xp + g.row(j + 1) * D + c0;
        const scalar_t* __restrict__ r2 = xp + g.row(j + 2) * D + c0;
        const scalar_t* __restrict__ r3 = xp + g.row(j + 3) * D + c0;
        for (int64_t c = 0; c < w; ++c)
          acc[c] += (static_cast<acc_t>(r0[c]) + static_cast<acc_t>(r1[c])) +
                    (static_cast<acc_t>(r2[c]) + static_cast<acc_t>(r3[c]));
      }
      for (; j < j1; ++j) {
        const scalar_t* __restrict__ r = xp + g.row(j) * D + c0;
        for (int64_t c = 0; c < w; ++c) acc[c] += static_cast<acc_t>(r[c]);
      }
      const acc_t n = static_cast<acc_t>(std::max<int64_t>(1, j1 - j0));
      acc_t* __restrict__ m = mp + k * D + c0;
      for (int64_t c = 0; c < w; ++c) m[c] = acc[c] / n;
      // Second pass over the class (from cache for a slice group, from L3 for whole rows).
      std::fill(acc, acc + w, acc_t(0));
      for (j = j0; j + 4 <= j1; j += 4) {
        const scalar_t* __restrict__ r0 = xp + g.row(j) * D + c0;
        const scalar_t* __restrict__ r1 = xp + g.row(j + 1) * D + c0;
        const scalar_t* __restrict__ r2 = xp + g.row(j + 2) * D + c0;
        const scalar_t* __restrict__ r3 = xp + g.row(j + 3) * D + c0;
        for (int64_t c = 0; c < w; ++c) {
          const acc_t v0 = static_cast<acc_t>(r0[c]) - m[c], v1 = static_cast<acc_t>(r1[c]) - m[c];
          const acc_t v2 = static_cast<acc_t>(r2[c]) - m[c], v3 = static_cast<acc_t>(r3[c]) - m[c];
          acc[c] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
        }
      }
      for (; j < j1; ++j) {
        const scalar_t* __restrict__ r = xp + g.row(j) * D + c0;
        for (int64_t c = 0; c < w; ++c) {
          const acc_t v = static_cast<acc_t>(r[c]) - m[c];
          acc[c] += v * v;
        }
      }
      for (int64_t sl = s0; sl < s1; ++sl) {  // per-slice partials in float64, as before
        double sum = 0.0;
        for (int64_t c = sl * kCols - c0; c < std::min(w, (sl + 1) * kCols - c0); ++c) sum += static_cast<double>(acc[c]);
        part[k * nchunks + sl] = sum;
      }
    }
  });
  double s = 0.0;
  for (double v : part) s += v;
  *sq_total = s;
}

// Rows per seg_mean task: about 512 KB of input, at least 1.
int64_t mean_block_rows(int64_t D, int64_t elem) { return std::max<int64_t>(1, (int64_t(512) << 10) / (D * elem)); }

template <typename scalar_t>
void seg_mean_rows(const at::Tensor& x, const HostGroups& g, at::Tensor& mean) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = x.size(1), K = g.K();
  const int64_t R = mean_block_rows(D, x.element_size());
  std::vector<int64_t> first(K + 1, 0);  // task index of class k's first block
  for (int64_t k = 0; k < K; ++k) first[k + 1] = first[k] + (g.offsets[k + 1] - g.offsets[k] + R - 1) / R;
  const int64_t T = first[K];
  std::vector<acc_t> part(T * D);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    int64_t k = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[k + 1]) ++k;
      const int64_t j0 = g.offsets[k] + (t - first[k]) * R, j1 = std::min(g.offsets[k + 1], j0 + R);
      acc_t* __restrict__ acc = part.data() + t * D;
      std::fill(acc, acc + D, acc_t(0));
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4) {
        const scalar_t* __restrict__ r0 = xp + g.row(j) * D;
        const scalar_t* __restrict__ r1 = xp + g.row(j + 1) * D;
        const scalar_t* __restrict__ r2 = xp + g.row(j + 2) * D;
        const scalar_t* __restrict__ r3 = xp + g.row(j + 3) * D;
        for (int64_t c = 0; c < D; ++c)
          acc[c] += (static_cast<acc_t>(r0[c]) + static_cast<acc_t>(r1[c])) +
                    (static_cast<acc_t>(r2[c]) + static_cast<acc_t>(r3[c]));
      }
      for (; j < j1; ++j) {
        const scalar_t* __restrict__ r = xp + g.row(j) * D;
        for (int64_t c = 0; c < D; ++c) acc[c] += static_cast<acc_t>(r[c]);
      }
    }
  });
  acc_t* mp = mean.data_ptr<acc_t>();
  const int64_t nchunks = (D + kCols - 1) / kCols;
  // The combine is small (T * D adds): inline below about 1M partial elements, since a second
  // parallel region costs a second barrier, and on a loaded machine a barrier waits for a
  // descheduled thread (measured: 2 threads 16-24 ms against 2.8 ms on one, at load 5).
  const auto combine = [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t k = u / nchunks, c0 = (u % nchunks) * kCols, c1 = std::min(D, c0 + kCols);
      acc_t* __restrict__ m = mp + k * D;
      for (int64_t c = c0; c < c1; ++c) m[c] = acc_t(0);
      for (int64_t t = first[k]; t < first[k + 1]; ++t) {
        const acc_t* __restrict__ p = part.data() + t * D;
        for (int64_t c = c0; c < c1; ++c) m[c] += p[c];
      }
      const acc_t n = static_cast<acc_t>(std::max<int64_t>(1, g.offsets[k + 1] - g.offsets[k]));
      for (int64_t c = c0; c < c1; ++c) m[c] /= n;
    }
  };
  if (T * D < (int64_t(1) << 20)) {
    combine(0, K * nchunks);
  } else {
    at::parallel_for(0, K * nchunks, 1, combine);
  }
}

}  // namespace

at::Tensor seg_mean(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets) {
  const HostGroups g = host_groups(perm, offsets);
  const auto acc = acc_dtype(x.scalar_type());
  auto mean = at::zeros({g.K(), x.size(1)}, x.options().dtype(acc));
  if (g.K() == 0 || x.numel() == 0) return mean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edfkern_seg_mean", [&] {
    seg_mean_rows<scalar_t>(x, g, mean);
  });
  return mean;
}

std::tuple<at::Tensor, at::Tensor> cc_forward(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                              const at::Tensor& offsets) {
  const HostGroups g = host_groups(perm, offsets);
  const auto acc = acc_dtype(x.scalar_type());
  auto mean = at::zeros({g.K(), x.size(1)}, x.options().dtype(acc));
  double sq = 0.0;
  if (g.K() > 0 && x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edfkern_cc_forward", [&] {
      mean_and_sq<scalar_t>(x, g, mean, &sq);
    });
  }
  return {at::scalar_tensor(sq, x.options().dtype(acc)), mean};
}

at::Tensor cc_backward(const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& perm,
                       const at::Tensor& offsets, const at::Tensor& mean, double coef) {
  const HostGroups g = host_groups(perm, offsets);
  auto out = at::empty_like(x);
  const int64_t N = x.size(0), D = x.size(1), K = g.K();
  if (N == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edfkern_cc_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto meanc = mean.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t s = static_cast<acc_t>(coef) * grad_out.item<acc_t>();
    const acc_t* mp = meanc.data_ptr<acc_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / D), [&](int64_t j0, int64_t j1) {
      int64_t k = std::upper_bound(g.offsets.begin(), g.offsets.end(), j0) - g.offsets.begin() - 1;
      for (int64_t j = j0; j < j1; ++j) {
        while (k + 1 < K && j >= g.offsets[k + 1]) ++k;
        const int64_t i = g.row(j);
        const scalar_t* __restrict__ r = xp + i * D;
        const acc_t* __restrict__ m = mp + k * D;
        scalar_t* __restrict__ o = op + i * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>((static_cast<acc_t>(r[c]) - m[c]) * s);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace edfkern
