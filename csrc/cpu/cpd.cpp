// CPD (docs/ops.md) on CPU: k-th smallest l by radix select on order-preserving float bits,
// stable-sort tie-break, kept sums. No sort and no P-sized workspace: l = (s - t)^2 is recomputed
// on every pass from the inputs (3 histogram passes of 11 bits for float, 6 for double, one
// counting pass, and a rescan of one chunk for the tie index).
// Workspace: threads * 2048 counters + one (count, sum) record per 64K-element chunk.
#include "kernels.h"

#include <edfkern/cpd.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

namespace edfkern {
namespace cpu {
namespace {

constexpr int kDigitBits = 11;
constexpr int64_t kChunk = 1 << 16;

// The k-th smallest (1-based) value of get(i), i in [0, P), by MSD radix select.
template <typename acc_t, typename Get>
sort_key_t<acc_t> radix_select(int64_t P, int64_t k, const Get& get, int64_t& count_less) {
  using U = sort_key_t<acc_t>;
  constexpr int kBits = sizeof(U) * 8;
  U prefix = 0, pmask = 0;
  int64_t remaining = k;
  count_less = 0;
  std::mutex mu;
  for (int hi = kBits; hi > 0; hi -= kDigitBits) {
    const int nbits = hi >= kDigitBits ? kDigitBits : hi;
    const int shift = hi - nbits;
    const int64_t nbins = int64_t(1) << nbits;
    const U dmask = static_cast<U>(nbins - 1);
    std::vector<int64_t> hist(nbins, 0);
    at::parallel_for(0, P, kChunk, [&](int64_t b, int64_t e) {
      std::vector<int64_t> local(nbins, 0);
      if (pmask == 0) {
        for (int64_t i = b; i < e; ++i) local[(to_key<acc_t>(get(i)) >> shift) & dmask]++;
      } else {
        for (int64_t i = b; i < e; ++i) {
          const U key = to_key<acc_t>(get(i));
          if ((key & pmask) == prefix) local[(key >> shift) & dmask]++;
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t d = 0; d < nbins; ++d) hist[d] += local[d];
    });
    int64_t d = 0, before = 0;
    for (; d < nbins; ++d) {
      if (before + hist[d] >= remaining) break;
      before += hist[d];
    }
    remaining -= before;
    count_less += before;
    prefix |= static_cast<U>(d) << shift;
    pmask |= dmask << shift;
  }
  return prefix;
}

// The stable-sort tie index: one past the r-th (1-based) index i with key(get(i)) == thr.
// Also returns per-chunk counts of equal entries through `eq_counts` (used by the caller).
template <typename acc_t, typename Get>
int64_t tie_index(int64_t P, sort_key_t<acc_t> thr, int64_t r, const Get& get,
                  const std::vector<int64_t>& eq_counts) {
  int64_t seen = 0, c = 0;
  const int64_t nchunks = static_cast<int64_t>(eq_counts.size());
  for (; c < nchunks; ++c) {
    if (seen + eq_counts[c] >= r) break;
    seen += eq_counts[c];
  }
  const int64_t e = std::min(P, (c + 1) * kChunk);
  for (int64_t i = c * kChunk; i < e; ++i) {
    if (to_key<acc_t>(get(i)) == thr && ++seen == r) return i + 1;
  }
  return P;  // unreachable for 1 <= r <= #equal
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& student,
                                                                        const at::Tensor& target,
                                                                        const at::Tensor& start, int64_t k) {
  using acc_t = acc_of<scalar_t>;
  using U = sort_key_t<acc_t>;
  const int64_t P = student.numel();
  const scalar_t* s = student.data_ptr<scalar_t>();
  const scalar_t* t = target.data_ptr<scalar_t>();
  const scalar_t* s0 = start.data_ptr<scalar_t>();
  auto get_l = [&](int64_t i) -> acc_t {
    const acc_t v = static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]);
    return v * v;
  };
  auto get_d = [&](int64_t i) -> acc_t {
    const acc_t v = static_cast<acc_t>(s0[i]) - static_cast<acc_t>(t[i]);
    return v * v;
  };
  const auto opts = student.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t nchunks = (P + kChunk - 1) / kChunk;
  // per chunk: #equal, sums of l and d over l > thr, sum of d over l == thr
  std::vector<int64_t> eq(nchunks, 0);
  std::vector<double> sl(nchunks, 0.0), sd(nchunks, 0.0), sde(nchunks, 0.0);
  double sum_l = 0.0, sum_d = 0.0, thr_v = -std::numeric_limits<double>::infinity();
  int64_t tie = 0;
  if (k == 0 || P == 0) {
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double a = 0, b = 0;
        for (int64_t i = c * kChunk, e = std::min(P, (c + 1) * kChunk); i < e; ++i) {
          a += get_l(i);
          b += get_d(i);
        }
        sl[c] = a;
        sd[c] = b;
      }
    });
    for (int64_t c = 0; c < nchunks; ++c) {
      sum_l += sl[c];
      sum_d += sd[c];
    }
  } else {
    int64_t n_less = 0;
    const U thr = radix_select<acc_t>(P, k, get_l, n_less);
    const acc_t thr_a = from_key<acc_t>(thr);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double a = 0, b = 0, be = 0;
        int64_t n = 0;
        for (int64_t i = c * kChunk, e = std::min(P, (c + 1) * kChunk); i < e; ++i) {
          const acc_t l = get_l(i);
          const U key = to_key<acc_t>(l);
          if (key > thr) {
            a += l;
            b += get_d(i);
          } else if (key == thr) {
            ++n;
            be += get_d(i);
          }
        }
        eq[c] = n;
        sl[c] = a;
        sd[c] = b;
        sde[c] = be;
      }
    });
    const int64_t r = k - n_less;  // drop the first r equal entries
    tie = tie_index<acc_t>(P, thr, r, get_l, eq);
    const int64_t tc = (tie - 1) / kChunk;  // chunk holding the last dropped index
    int64_t n_eq_kept = 0;
    double d_eq_kept = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) {
      sum_l += sl[c];
      sum_d += sd[c];
      if (c > tc) {
        n_eq_kept += eq[c];
        d_eq_kept += sde[c];
      }
    }
    for (int64_t i = tie, e = std::min(P, (tc + 1) * kChunk); i < e; ++i) {
      if (to_key<acc_t>(get_l(i)) == thr) {
        ++n_eq_kept;
        d_eq_kept += static_cast<double>(get_d(i));
      }
    }
    if (n_eq_kept > 0) sum_l += static_cast<double>(thr_a) * static_cast<double>(n_eq_kept);  // no inf * 0
    sum_d += d_eq_kept;
    thr_v = static_cast<double>(thr_a);
  }
  return {at::scalar_tensor(sum_l, opts), at::scalar_tensor(sum_d, opts), at::scalar_tensor(thr_v, opts),
          at::scalar_tensor(tie, student.options().dtype(at::kLong))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpd_forward(const at::Tensor& student,
                                                                       const at::Tensor& target,
                                                                       const at::Tensor& start, int64_t k) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "edfkern_cpd_forward", [&] {
    out = forward_impl<scalar_t>(student, target, start, k);
  });
  return out;
}

at::Tensor cpd_backward(const at::Tensor& grad_out, const at::Tensor& student, const at::Tensor& target,
                        const at::Tensor& start, const at::Tensor& thr, const at::Tensor& tie,
                        const at::Tensor& sum_d) {
  auto out = at::empty_like(student);
  const int64_t P = student.numel();
  const int64_t tie_i = tie.item<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "edfkern_cpd_backward", [&] {
    using acc_t = acc_of<scalar_t>;
    using U = sort_key_t<acc_t>;
    const U thr_k = to_key<acc_t>(thr.item<acc_t>());
    const acc_t scale = grad_out.item<acc_t>() / sum_d.item<acc_t>();
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, kChunk, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t v = static_cast<acc_t>(s[i]) - static_cast<acc_t>(t[i]);
        const U key = to_key<acc_t>(v * v);
        const bool dropped = key < thr_k || (key == thr_k && i < tie_i);
        // dropped: 0 * 2v, i.e. 0, or NaN where s - t is not finite, as autograd through the loop's gather
        const acc_t v2 = acc_t(2) * v;
        o[i] = static_cast<scalar_t>(dropped ? v2 * acc_t(0) : v2 * scale);
      }
    });
  });
  return out;
}

at::Tensor cpd_keep_mask(const at::Tensor& l, int64_t k) {
  const int64_t P = l.numel();
  auto out = at::ones({P}, l.options().dtype(at::kBool));
  if (k == 0 || P == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "edfkern_cpd_keep_mask", [&] {
    using acc_t = acc_of<scalar_t>;
    using U = sort_key_t<acc_t>;
    const scalar_t* lp = l.data_ptr<scalar_t>();
    auto get = [&](int64_t i) -> acc_t { return static_cast<acc_t>(lp[i]); };
    int64_t n_less = 0;
    const U thr = radix_select<acc_t>(P, k, get, n_less);
    const int64_t nchunks = (P + kChunk - 1) / kChunk;
    std::vector<int64_t> eq(nchunks, 0);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t n = 0;
        for (int64_t i = c * kChunk, e = std::min(P, (c + 1) * kChunk); i < e; ++i) n += to_key<acc_t>(get(i)) == thr;
        eq[c] = n;
      }
    });
    const int64_t tie = tie_index<acc_t>(P, thr, k - n_less, get, eq);
    bool* o = out.data_ptr<bool>();
    at::parallel_for(0, P, kChunk, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const U key = to_key<acc_t>(get(i));
        o[i] = !(key < thr || (key == thr && i < tie));
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace edfkern
