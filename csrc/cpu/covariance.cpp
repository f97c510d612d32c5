// Local covariance (docs/ops.md, IID) on CPU.
//
// Forward, per class k: mean_k (C, L) in acc, then Sigma_k = Y_k Y_k^T / n_k where Y_k = [x_i - mean_k]
// is (C, n_k * L). Y_k is never formed whole: blocks of B rows are centred into one (C, B*L) acc
// buffer and accumulated with a BLAS GEMM (IEEE fp32 on CPU; fp64 for fp64). No per-sample (C, C)
// product exists anywhere. Backward, per block: G = M_k Y_b (one GEMM), scattered back to the rows.
// Workspace: outputs (K*C*C + K*C*L) plus two (C, B*L) blocks, B*L ~ 4096 columns.
// FLOPs: 2*N*C*C*L forward (GEMM), 2*N*C*C*L backward; bytes: x read twice forward, twice backward.
//
// Fast path (AVX-512 builds, fp32 accumulation, L a multiple of 16; FLOPs about 1.1*N*C*(C+1)*L
// forward, one triangle plus tile waste, 2*N*C*C*L backward): own micro-kernels in x's own
// layout, where one zmm register holds 16 positions l of one channel. MKL runs its AVX2 code on
// AMD CPUs, at well under half of what their AVX-512 FMA units do (benchmarks/NOTES.md).
// Forward: the lower triangle only of each Gram, as lane-parallel dot products
// acc[c1][c2] += y[c1, l:l+16] * y[c2, l:l+16] over tiles of 4 x 6 channel pairs, the rows centred
// chunk by chunk into an L2-sized fp32 buffer; the 16 lanes are summed once per class and the
// upper triangle mirrored. Backward: out_i[c, :] = sum_d M[c, d] y_i[d, :] over tiles of 8
// channels x 3 rows, stored straight into the output rows (no (C, B*L) block, no scatter pass).
#include "kernels.h"
#include "groups.h"
#include "../dtypes.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define EDFKERN_COV_AVX512 1
#endif

namespace edfkern {
namespace cpu {

namespace {

// A fresh tensor like x (contiguous). With EDFKERN_HUGEPAGES=1 a large one is backed by transparent
// huge pages where the kernel offers them on request (THP "madvise" mode): first-touching 82 MB of
// 4 KB pages costs about 40 ms of page faults on one core, with 2 MB pages about 6 ms. Opt-in only:
// where THP defrag is "madvise" (common), a fault in such a region may stall in direct compaction,
// and a bench run after other work measured CM forward+backward at 44-145 ms (median 58) with huge
// pages against a steady 49-51 ms without (benchmarks/NOTES.md). The same trade-off as
// THP_MEM_ALLOC_ENABLE=1 for PyTorch's own allocator.
at::Tensor empty_output_like(const at::Tensor& x) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(x.numel()) * x.element_size();
  static const bool on = [] {
    const char* e = std::getenv("EDFKERN_HUGEPAGES");
    return e != nullptr && e[0] != '\0' && e[0] != '0';
  }();
  if (bytes >= 2 * kHuge && on) {
    void* p = nullptr;
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    if (posix_memalign(&p, kHuge, rounded) == 0) {
      madvise(p, rounded, MADV_HUGEPAGE);  // advice only: a refusal leaves ordinary pages
      return at::from_blob(p, x.sizes(), [](void* q) { std::free(q); }, x.options());
    }
  }
#endif
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

// Rows of a block: B such that the (C, B*L) buffer has about 4096 columns and at most 1M elements.
int64_t block_rows(int64_t C, int64_t L) {
  int64_t b = std::max<int64_t>(1, 4096 / L);
  b = std::min<int64_t>(b, std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, C * L)));
  return b;
}

// Centre rows j0..j0+nb-1 of class k into Y (C, ld): Y[c, b*L + l] = x[row, c, l] - mean[c, l].
template <typename scalar_t, typename acc_t>
void centre_block(const scalar_t* x, const HostGroups& g, const acc_t* mean_k, int64_t j0, int64_t nb, int64_t C,
                  int64_t L, int64_t ld, acc_t* Y) {
  at::parallel_for(0, nb, std::max<int64_t>(1, 8192 / (C * L)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* xr = x + g.row(j0 + b) * C * L;
      for (int64_t c = 0; c < C; ++c) {
        acc_t* y = Y + c * ld + b * L;
        const scalar_t* xc = xr + c * L;
        const acc_t* mc = mean_k + c * L;
        for (int64_t l = 0; l < L; ++l) y[l] = static_cast<acc_t>(xc[l]) - mc[l];
      }
    }
  });
}

// Classes run in parallel, one class per task, each with its own (C, B*L) block(s) and
// single-threaded GEMMs (BLAS called inside the parallel region does not fork again). With fewer
// classes than threads, classes run one after another and each GEMM uses every thread instead.
template <typename F>
void over_classes(int64_t K, const F& body) {
  if (K >= at::get_num_threads() && K > 1) {
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) body(k);
    });
  } else {
    for (int64_t k = 0; k < K; ++k) body(k);
  }
}

#ifdef EDFKERN_COV_AVX512
// ---------------------------------------------------------------------------------- fast path
constexpr int64_t kTR = 4, kTS = 6;   // forward tile: 4 x 6 channel pairs, 24 zmm accumulators
constexpr int64_t kBR = 8, kBI = 3;   // backward tile: 8 output channels x 3 rows
constexpr int64_t kChunkBytes = 256 << 10;  // centred rows per chunk: about a quarter of L2

// A 64-byte aligned float buffer kept per thread across calls (zmm loads must not split cache
// lines, and freshly mapped pages would cost a fault each).
class Scratch {
 public:
  ~Scratch() { std::free(p_); }
  float* zeros(size_t n) {
    if (n > n_) {
      std::free(p_);
      p_ = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
      if (!p_) throw std::bad_alloc();
      n_ = n;
    }
    std::memset(p_, 0, n * sizeof(float));
    return p_;
  }

 private:
  float* p_ = nullptr;
  size_t n_ = 0;
};

bool use_fast_path(const at::Tensor& x, bool acc_is_float) {
  return acc_is_float && x.size(2) % 16 == 0 && x.size(1) > 0;
}

// Rows j0..j0+nb-1 (sorted positions) of x centred into Y (nb, Cp, L) fp32; rows c >= C stay zero.
template <typename scalar_t>
void centre_rows(const scalar_t* x, const HostGroups& g, const float* mean_k, int64_t j0, int64_t nb, int64_t C,
                 int64_t Cp, int64_t L, float* Y) {
  for (int64_t b = 0; b < nb; ++b) {
    const scalar_t* xr = x + g.row(j0 + b) * C * L;
    float* y = Y + b * Cp * L;
    for (int64_t e = 0; e < C * L; ++e) y[e] = static_cast<float>(xr[e]) - mean_k[e];
  }
}

// The forward tiles of the lower triangle: (c1 base, c2 base) with c2 base <= c1 base + kTR - 1.
std::vector<std::pair<int64_t, int64_t>> gram_tiles(int64_t C) {
  std::vector<std::pair<int64_t, int64_t>> t;
  for (int64_t a = 0; a < C; a += kTR)
    for (int64_t b = 0; b < std::min(a + kTR, C); b += kTS) t.emplace_back(a, b);
  return t;
}

// acc (24 x 16 lanes, in memory) += sum over nb rows and L/16 lane groups of y[a+r] * y[b+s].
inline void gram_tile(const float* Y, int64_t nb, int64_t rs, int64_t L, int64_t a, int64_t b, float* acc) {
  __m512 s[kTR][kTS];
  for (int r = 0; r < kTR; ++r)
    for (int q = 0; q < kTS; ++q) s[r][q] = _mm512_loadu_ps(acc + (r * kTS + q) * 16);
  for (int64_t i = 0; i < nb; ++i) {
    for (int64_t l = 0; l < L; l += 16) {
      const float* p = Y + i * rs + l;
      const __m512 x0 = _mm512_loadu_ps(p + (a + 0) * L), x1 = _mm512_loadu_ps(p + (a + 1) * L);
      const __m512 x2 = _mm512_loadu_ps(p + (a + 2) * L), x3 = _mm512_loadu_ps(p + (a + 3) * L);
      for (int q = 0; q < kTS; ++q) {
        const __m512 y = _mm512_loadu_ps(p + (b + q) * L);
        s[0][q] = _mm512_fmadd_ps(x0, y, s[0][q]);
        s[1][q] = _mm512_fmadd_ps(x1, y, s[1][q]);
        s[2][q] = _mm512_fmadd_ps(x2, y, s[2][q]);
        s[3][q] = _mm512_fmadd_ps(x3, y, s[3][q]);
      }
    }
  }
  for (int r = 0; r < kTR; ++r)
    for (int q = 0; q < kTS; ++q) _mm512_storeu_ps(acc + (r * kTS + q) * 16, s[r][q]);
}

template <typename scalar_t>
void cov_forward_fast(const at::Tensor& x, const HostGroups& g, at::Tensor& sigma, const at::Tensor& mean) {
  const int64_t C = x.size(1), L = x.size(2), K = g.K();
  // Channel rows padded with zeros so every tile reads inside the buffer.
  const int64_t Cp = std::max((C + kTR - 1) / kTR * kTR, (C + kTS - 1) / kTS * kTS);
  const int64_t rs = Cp * L;
  const int64_t nb_max = std::max<int64_t>(1, kChunkBytes / (rs * 4));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const float* mp = mean.data_ptr<float>();
  float* sp = sigma.data_ptr<float>();
  const auto tiles = gram_tiles(C);
  const int64_t T = static_cast<int64_t>(tiles.size());
  over_classes(K, [&](int64_t k) {
    const int64_t j0 = g.offsets[k], n = g.offsets[k + 1] - j0;
    if (n == 0) return;  // sigma is zero-initialised
    const int64_t nbk = std::min(nb_max, n);
    // (Plain pointers: the inner parallel_for's workers must use this thread's buffers.)
    thread_local Scratch tls_Y, tls_acc;
    float* const Y = tls_Y.zeros(nbk * rs);
    float* const acc = tls_acc.zeros(T * kTR * kTS * 16);
    for (int64_t jb = 0; jb < n; jb += nbk) {
      const int64_t nb = std::min(nbk, n - jb);
      at::parallel_for(0, nb, 8, [&](int64_t b0, int64_t b1) {
        centre_rows<scalar_t>(xp, g, mp + k * C * L, j0 + jb + b0, b1 - b0, C, Cp, L, Y + b0 * rs);
      });
      at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          gram_tile(Y, nb, rs, L, tiles[t].first, tiles[t].second, acc + t * kTR * kTS * 16);
      });
    }
    float* sk = sp + k * C * C;  // the sums, then / n (as the GEMM path does), then the mirror
    for (int64_t t = 0; t < T; ++t) {
      const auto [a, b] = tiles[t];
      for (int64_t r = 0; r < kTR && a + r < C; ++r)
        for (int64_t q = 0; q < kTS && b + q <= a + r && b + q < C; ++q)
          sk[(a + r) * C + b + q] = _mm512_reduce_add_ps(_mm512_loadu_ps(acc + (t * kTR * kTS + r * kTS + q) * 16));
    }
    const float fn = static_cast<float>(n);
    for (int64_t c1 = 0; c1 < C; ++c1) {
      for (int64_t c2 = 0; c2 <= c1; ++c2) sk[c1 * C + c2] /= fn;
      for (int64_t c2 = 0; c2 < c1; ++c2) sk[c2 * C + c1] = sk[c1 * C + c2];
    }
  });
}

// out rows (kBI of them, NI <= kBI) = M_k (rows of Y), for lane group l: acc[r][i] over d.
template <int NI, typename scalar_t>
inline void bwd_tile(const float* Mk, int64_t C, const float* Y, int64_t rs, int64_t L, int64_t c0, int64_t l,
                     scalar_t* const* orow) {
  __m512 s[kBR][NI];
  for (int r = 0; r < kBR; ++r)
    for (int i = 0; i < NI; ++i) s[r][i] = _mm512_setzero_ps();
  const float* m = Mk + c0 * C;
  for (int64_t d = 0; d < C; ++d) {
    __m512 y[NI];
    for (int i = 0; i < NI; ++i) y[i] = _mm512_loadu_ps(Y + i * rs + d * L + l);
    for (int r = 0; r < kBR; ++r) {
      const __m512 w = _mm512_set1_ps(m[r * C + d]);
      for (int i = 0; i < NI; ++i) s[r][i] = _mm512_fmadd_ps(w, y[i], s[r][i]);
    }
  }
  const int64_t nr = std::min<int64_t>(kBR, C - c0);
  for (int i = 0; i < NI; ++i) {
    for (int64_t r = 0; r < nr; ++r) {
      scalar_t* o = orow[i] + (c0 + r) * L + l;
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_storeu_ps(o, s[r][i]);
      } else {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, s[r][i]);
        for (int e = 0; e < 16; ++e) o[e] = static_cast<scalar_t>(tmp[e]);
      }
    }
  }
}

template <typename scalar_t>
void cov_backward_fast(const at::Tensor& x, const HostGroups& g, const at::Tensor& mean, const at::Tensor& M,
                       at::Tensor& out) {
  const int64_t C = x.size(1), L = x.size(2), K = g.K();
  const int64_t Cp8 = (C + kBR - 1) / kBR * kBR;  // M rows padded with zeros to whole tiles
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const float* mp = mean.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  std::vector<float> Mpad(K * Cp8 * C, 0.0f);
  const float* Msrc = M.data_ptr<float>();
  for (int64_t k = 0; k < K; ++k) std::memcpy(Mpad.data() + k * Cp8 * C, Msrc + k * C * C, C * C * sizeof(float));
  const int64_t rs = C * L;
  over_classes(K, [&](int64_t k) {
    const int64_t j0 = g.offsets[k], n = g.offsets[k + 1] - j0;
    if (n == 0) return;
    const float* Mk = Mpad.data() + k * Cp8 * C;
    const int64_t ntiles = (n + kBI - 1) / kBI;
    at::parallel_for(0, ntiles, 4, [&](int64_t t0, int64_t t1) {
      thread_local Scratch tls_Y;
      float* const Y = tls_Y.zeros(kBI * rs);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t jb = t * kBI, ni = std::min(kBI, n - jb);
        centre_rows<scalar_t>(xp, g, mp + k * C * L, j0 + jb, ni, C, C, L, Y);
        scalar_t* orow[kBI];
        for (int64_t i = 0; i < ni; ++i) orow[i] = op + g.row(j0 + jb + i) * rs;
        for (int64_t l = 0; l < L; l += 16)
          for (int64_t c0 = 0; c0 < C; c0 += kBR) {
            if (ni == 3) bwd_tile<3>(Mk, C, Y, rs, L, c0, l, orow);
            else if (ni == 2) bwd_tile<2>(Mk, C, Y, rs, L, c0, l, orow);
            else bwd_tile<1>(Mk, C, Y, rs, L, c0, l, orow);
          }
      }
    });
  });
}
#endif  // EDFKERN_COV_AVX512

template <typename scalar_t>
void cov_forward_impl(const at::Tensor& x, const HostGroups& g, at::Tensor& sigma, const at::Tensor& mean) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), L = x.size(2), K = g.K();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* mp = mean.data_ptr<acc_t>();  // class means, from seg_mean (features.cpp)
  const int64_t B = block_rows(C, L);
  over_classes(K, [&](int64_t k) {
    const int64_t j0 = g.offsets[k], n = g.offsets[k + 1] - j0;
    if (n == 0) return;  // sigma is zero-initialised
    const int64_t nb_max = std::min(B, n);
    auto Y = at::empty({C, nb_max * L}, mean.options());
    acc_t* yp = Y.data_ptr<acc_t>();
    const int64_t ldy = nb_max * L;
    auto sk = sigma[k];
    for (int64_t jb = 0; jb < n; jb += nb_max) {
      const int64_t nb = std::min(nb_max, n - jb);
      centre_block<scalar_t, acc_t>(xp, g, mp + k * C * L, j0 + jb, nb, C, L, ldy, yp);
      auto Yv = Y.narrow(1, 0, nb * L);
      sk.addmm_(Yv, Yv.t());
    }
    sk.div_(static_cast<double>(n));
  });
}

template <typename scalar_t>
void cov_backward_impl(const at::Tensor& x, const HostGroups& g, const at::Tensor& mean, const at::Tensor& M,
                       at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), L = x.size(2), K = g.K();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* mp = mean.data_ptr<acc_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t B = block_rows(C, L);
  over_classes(K, [&](int64_t k) {
    const int64_t j0 = g.offsets[k], n = g.offsets[k + 1] - j0;
    if (n == 0) return;
    const int64_t nb_max = std::min(B, n), ld = nb_max * L;
    auto Y = at::empty({C, ld}, mean.options());
    auto Gb = at::empty({C, ld}, mean.options());
    acc_t* yp = Y.data_ptr<acc_t>();
    const acc_t* gp = Gb.data_ptr<acc_t>();
    auto Mk = M[k];
    for (int64_t jb = 0; jb < n; jb += nb_max) {
      const int64_t nb = std::min(nb_max, n - jb);
      centre_block<scalar_t, acc_t>(xp, g, mp + k * C * L, j0 + jb, nb, C, L, ld, yp);
      auto Gv = Gb.narrow(1, 0, nb * L);
      at::mm_out(Gv, Mk, Y.narrow(1, 0, nb * L));
      at::parallel_for(0, nb, std::max<int64_t>(1, 8192 / (C * L)), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* orow = op + g.row(j0 + jb + b) * C * L;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* gr = gp + c * ld + b * L;
            scalar_t* o = orow + c * L;
            for (int64_t l = 0; l < L; ++l) o[l] = static_cast<scalar_t>(gr[l]);
          }
        }
      });
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cov_forward(const at::Tensor& x, const std::optional<at::Tensor>& perm,
                                               const at::Tensor& offsets) {
  const HostGroups g = host_groups(perm, offsets);
  const int64_t C = x.size(1), L = x.size(2), K = g.K();
  const auto acc = acc_dtype(x.scalar_type());
  auto sigma = at::zeros({K, C, C}, x.options().dtype(acc));
  if (K == 0 || x.numel() == 0) return {sigma, at::zeros({K, C, L}, x.options().dtype(acc))};
  auto mean = seg_mean(x.view({x.size(0), C * L}), perm, offsets).view({K, C, L});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edfkern_cov_forward", [&] {
#ifdef EDFKERN_COV_AVX512
    if (use_fast_path(x, acc == at::kFloat)) return cov_forward_fast<scalar_t>(x, g, sigma, mean);
#endif
    cov_forward_impl<scalar_t>(x, g, sigma, mean);
  });
  return {sigma, mean};
}

at::Tensor cov_backward(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets,
                        const at::Tensor& mean, const at::Tensor& M) {
  const HostGroups g = host_groups(perm, offsets);
  auto out = empty_output_like(x);  // every row belongs to exactly one group
  if (g.K() == 0 || x.numel() == 0) return out;
  const auto acc = acc_dtype(x.scalar_type());
  auto Mc = M.to(acc).contiguous();
  auto meanc = mean.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edfkern_cov_backward", [&] {
#ifdef EDFKERN_COV_AVX512
    if (use_fast_path(x, acc == at::kFloat)) return cov_backward_fast<scalar_t>(x, g, meanc, Mc, out);
#endif
    cov_backward_impl<scalar_t>(x, g, meanc, Mc, out);
  });
  return out;
}

}  // namespace cpu
}  // namespace edfkern
