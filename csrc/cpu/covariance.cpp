// Local covariance (docs/ops.md, IID) on CPU.
//
// Forward, per class k: mean_k (C, L) in acc, then Sigma_k = Y_k Y_k^T / n_k where Y_k = [x_i - mean_k]
// is (C, n_k * L). Y_k is never formed whole: blocks of B rows are centred into one (C, B*L) acc
// buffer and accumulated with a BLAS GEMM (IEEE fp32 on CPU; fp64 for fp64). No per-sample (C, C)
// product exists anywhere. Backward, per block: G = M_k Y_b (one GEMM), scattered back to the rows.
// Workspace: outputs (K*C*C + K*C*L) plus two (C, B*L) blocks, B*L ~ 4096 columns.
// FLOPs: 2*N*C*C*L forward (GEMM), 2*N*C*C*L backward; bytes: x read twice forward, twice backward.
#include "kernels.h"
#include "groups.h"
#include "../dtypes.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace edfkern {
namespace cpu {

namespace {

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
    cov_forward_impl<scalar_t>(x, g, sigma, mean);
  });
  return {sigma, mean};
}

at::Tensor cov_backward(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets,
                        const at::Tensor& mean, const at::Tensor& M) {
  const HostGroups g = host_groups(perm, offsets);
  auto out = at::empty_like(x);  // every row belongs to exactly one group
  if (g.K() == 0 || x.numel() == 0) return out;
  const auto acc = acc_dtype(x.scalar_type());
  auto Mc = M.to(acc).contiguous();
  auto meanc = mean.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "edfkern_cov_backward", [&] {
    cov_backward_impl<scalar_t>(x, g, meanc, Mc, out);
  });
  return out;
}

}  // namespace cpu
}  // namespace edfkern
