// Argument checks of the edfkern._C functions (csrc/edfkern.cpp), for their CPU and CUDA paths alike.
// The functions can be called directly, so this file checks what the C++ code needs to read and write
// memory safely: dtypes, devices, contiguity, the sizes the kernels index with, aliasing of in-place
// outputs, and the CSR group tensors (offsets start at 0, never decrease, end at N; perm is a
// permutation of range(N)). A failure is a Python TypeError (a wrong dtype, a missing tensor) or
// ValueError (anything else), never a crash. The ops' own rules (how many groups a loss allows, the
// largest output the ops agree to allocate) live once, in the registered ops (edfkern/ops).
// Cost: O(K + N) on the host for CPU tensors; for CUDA tensors the value checks are device-side
// asserts (at::_assert_async), so there is no host sync.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <vector>

namespace edfkern {
namespace checks {

inline bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline bool dim_in(const at::Tensor& t, std::initializer_list<int64_t> dims) {
  for (int64_t d : dims)
    if (t.dim() == d) return true;
  return false;
}

// A tensor the kernels can read: defined, strided, with storage of its own, and not a subclass that
// intercepts dispatch (a FakeTensor, for one, reports a CPU device but holds no data).
inline void readable(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.defined(), "edfkern._C.", op, ": ", name, " must be a tensor");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "edfkern._C.", op, ": ", name, " must be a strided (dense) tensor, got ",
                    t.layout());
  TORCH_CHECK_VALUE(!t.key_set().has(c10::DispatchKey::Python) && t.has_storage(), "edfkern._C.", op, ": ", name,
                    " must be a plain tensor with data (not a FakeTensor or another __torch_dispatch__ subclass)");
}

// A defined, contiguous floating tensor of one of `dims` ranks (any rank when dims is empty).
inline void float_arg(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> dims = {}) {
  readable(op, name, t);
  TORCH_CHECK_TYPE(is_float(t), "edfkern._C.", op, ": ", name, " must be float32/float64/float16/bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK_VALUE(dims.size() == 0 || dim_in(t, dims), "edfkern._C.", op, ": ", name, " has the wrong rank ",
              t.dim(), " (shape ", t.sizes(), ")");
  TORCH_CHECK_VALUE(t.is_contiguous(), "edfkern._C.", op, ": ", name, " must be contiguous");
}

inline void same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "edfkern._C.", op, ": ", name, " must be on ", ref.device(), ", got ",
              t.device());
}

inline void shape_is(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "edfkern._C.", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

inline void one_value(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, bool integer) {
  readable(op, name, t);
  TORCH_CHECK_VALUE(t.numel() == 1, "edfkern._C.", op, ": ", name, " must hold one value");
  TORCH_CHECK_TYPE(integer ? t.scalar_type() == at::kLong : is_float(t), "edfkern._C.", op, ": ", name,
              integer ? " must be int64" : " must be floating", ", got ", t.scalar_type());
  same_device(op, name, t, ref);
}

// Written tensor `out` must not share memory with `other`.
inline void no_overlap(const char* op, const char* out_name, const at::Tensor& out, const char* name,
                       const at::Tensor& other) {
  if (!other.defined() || out.numel() == 0 || other.numel() == 0) return;
  TORCH_CHECK_VALUE(at::get_overlap_status(out, other) == at::MemOverlapStatus::No, "edfkern._C.", op, ": ", out_name,
              " and ", name, " share memory; the written tensor needs storage of its own");
}

// An output of `shape` whose byte count (at 8 bytes an element) fits int64: every offset the kernels
// compute into it is representable, and the allocator is never asked for an overflowed size.
inline void bounded_numel(const char* op, const char* what, std::initializer_list<int64_t> shape) {
  constexpr int64_t kMaxElements = std::numeric_limits<int64_t>::max() / 8;
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, "edfkern._C.", op, ": ", what, " extent ", s, " is negative");
    TORCH_CHECK_VALUE(s == 0 || n <= kMaxElements / s, "edfkern._C.", op, ": ", what,
                      " is too large to index (its extents multiply past 2^60 elements)");
    n *= s;
  }
}

// `cond` (0-d bool tensor) must hold: at once on the host for CPU tensors, as a device-side assert
// (no host sync) for CUDA tensors.
inline void require(const char* op, const at::Tensor& cond, const char* msg) {
  if (cond.device().is_cpu()) {
    TORCH_CHECK_VALUE(cond.item<bool>(), "edfkern._C.", op, ": ", msg);
  } else {
    at::_assert_async(cond, msg);
  }
}

// CSR groups of N rows on `ref`'s device; returns K.
inline int64_t csr(const char* op, int64_t N, const std::optional<at::Tensor>& perm, const at::Tensor& offsets,
                   const at::Tensor& ref) {
  readable(op, "offsets", offsets);
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "edfkern._C.", op,
                   ": offsets must be an int64 tensor");
  TORCH_CHECK_VALUE(offsets.dim() == 1, "edfkern._C.", op, ": offsets must be 1-D, got shape ", offsets.sizes());
  TORCH_CHECK_VALUE(offsets.is_contiguous(), "edfkern._C.", op, ": offsets must be contiguous");
  same_device(op, "offsets", offsets, ref);
  const int64_t K = offsets.numel() - 1;
  TORCH_CHECK_VALUE(K >= 1 || (K == 0 && N == 0), "edfkern._C.", op, ": offsets must have K+1 >= 2 entries");
  const bool has_perm = perm.has_value() && perm->defined();
  if (has_perm) {
    readable(op, "perm", *perm);
    TORCH_CHECK_TYPE(perm->scalar_type() == at::kLong, "edfkern._C.", op, ": perm must be an int64 tensor");
    TORCH_CHECK_VALUE(perm->dim() == 1 && perm->numel() == N, "edfkern._C.", op, ": perm must be 1-D with N=", N,
                      " entries, got shape ", perm->sizes());
    TORCH_CHECK_VALUE(perm->is_contiguous(), "edfkern._C.", op, ": perm must be contiguous");
    same_device(op, "perm", *perm, ref);
  }
  if (offsets.device().is_cpu()) {
    const int64_t* o = offsets.data_ptr<int64_t>();
    bool ok = o[0] == 0 && o[K] == N;
    for (int64_t k = 0; ok && k < K; ++k) ok = o[k + 1] >= o[k];
    TORCH_CHECK_VALUE(ok, "edfkern._C.", op, ": offsets must start at 0, never decrease and end at N=", N);
    if (has_perm) {
      const int64_t* p = perm->data_ptr<int64_t>();
      std::vector<char> seen(static_cast<size_t>(N), 0);
      for (int64_t j = 0; j < N; ++j) {
        const int64_t i = p[j];
        TORCH_CHECK_VALUE(i >= 0 && i < N && !seen[i], "edfkern._C.", op, ": perm must be a permutation of range(N=", N,
                    ")");
        seen[i] = 1;
      }
    }
    return K;
  }
  auto ok = offsets[0].eq(0).logical_and(offsets[K].eq(N));
  if (K > 0) ok = ok.logical_and(offsets.narrow(0, 1, K).ge(offsets.narrow(0, 0, K)).all());
  require(op, ok, "edfkern._C: offsets must start at 0, never decrease and end at N");
  if (has_perm && N > 0) {
    auto in_range = perm->ge(0).all().logical_and(perm->lt(N).all());
    auto seen = at::zeros({N}, perm->options().dtype(at::kInt))
                    .index_add_(0, perm->clamp(0, N - 1), at::ones({N}, perm->options().dtype(at::kInt)));
    require(op, in_range.logical_and(seen.eq(1).all()), "edfkern._C: perm must be a permutation of range(N)");
  }
  return K;
}

// ----------------------------------------------------------------------------- per-op argument sets

inline void dae_cam(const char* op, const at::Tensor& cam, int64_t N, const at::Tensor& ref) {
  float_arg(op, "cam", cam, {3});
  TORCH_CHECK_VALUE(cam.size(0) == N, "edfkern._C.", op, ": cam must have N=", N, " maps, got shape ", cam.sizes());
  TORCH_CHECK_VALUE(cam.size(1) >= 1 && cam.size(2) >= 1, "edfkern._C.", op, ": cam maps must be non-empty, got ",
              cam.sizes());
  same_device(op, "cam", cam, ref);
}

inline void dae_mask_args(const at::Tensor& cam, int64_t H, int64_t W) {
  float_arg("dae_mask", "cam", cam, {3});
  TORCH_CHECK_VALUE(cam.size(1) >= 1 && cam.size(2) >= 1, "edfkern._C.dae_mask: cam maps must be non-empty");
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, "edfkern._C.dae_mask: H and W must be >= 1, got ", H, ", ", W);
  bounded_numel("dae_mask", "the mask", {cam.size(0), H, W});
}

inline void dae_args(const at::Tensor& grad, const at::Tensor& cam) {
  float_arg("dae_", "grad", grad, {4});
  dae_cam("dae_", cam, grad.size(0), grad);
  no_overlap("dae_", "grad", grad, "cam", cam);
}

inline void dae_sgd_args(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& buf,
                         const at::Tensor& cam, double momentum) {
  const char* op = "dae_sgd_step_";
  float_arg(op, "param", param, {4});
  float_arg(op, "grad", grad, {4});
  shape_is(op, "grad", grad, param.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == param.scalar_type(), "edfkern._C.dae_sgd_step_: grad must have param's dtype");
  same_device(op, "grad", grad, param);
  const bool has_buf = buf.has_value() && buf->defined();
  TORCH_CHECK_VALUE(momentum == 0.0 || has_buf, "edfkern._C.dae_sgd_step_: momentum != 0 needs a momentum buffer");
  dae_cam(op, cam, param.size(0), param);
  no_overlap(op, "param", param, "grad", grad);
  no_overlap(op, "param", param, "cam", cam);
  if (has_buf) {
    float_arg(op, "buf", *buf, {4});
    shape_is(op, "buf", *buf, param.sizes());
    TORCH_CHECK_TYPE(buf->scalar_type() == param.scalar_type(), "edfkern._C.dae_sgd_step_: buf must have param's dtype");
    same_device(op, "buf", *buf, param);
    no_overlap(op, "buf", *buf, "param", param);
    no_overlap(op, "buf", *buf, "grad", grad);
    no_overlap(op, "buf", *buf, "cam", cam);
  }
}

inline void grad_cam_args(const at::Tensor& A, const at::Tensor& G, const std::optional<at::Tensor>& A_clean,
                          bool smooth, const std::optional<std::vector<int64_t>>& size) {
  const char* op = "grad_cam";
  float_arg(op, "A", A, {smooth ? int64_t(5) : int64_t(4)});
  float_arg(op, "G", G);
  shape_is(op, "G", G, A.sizes());
  TORCH_CHECK_TYPE(G.scalar_type() == A.scalar_type(), "edfkern._C.grad_cam: G must have A's dtype");
  same_device(op, "G", G, A);
  const bool has_clean = A_clean.has_value() && A_clean->defined();
  TORCH_CHECK_VALUE(has_clean == smooth, "edfkern._C.grad_cam: A_clean is required by smoothgradcam++ and only by it");
  if (smooth) {
    TORCH_CHECK_VALUE(A.size(0) >= 1, "edfkern._C.grad_cam: smoothgradcam++ needs S >= 1 passes");
    float_arg(op, "A_clean", *A_clean, {4});
    shape_is(op, "A_clean", *A_clean, A.sizes().slice(1));
    TORCH_CHECK_TYPE(A_clean->scalar_type() == A.scalar_type(), "edfkern._C.grad_cam: A_clean must have A's dtype");
    same_device(op, "A_clean", *A_clean, A);
  }
  const int64_t d = A.dim();
  TORCH_CHECK_VALUE(A.size(d - 3) >= 1 && A.size(d - 2) >= 1 && A.size(d - 1) >= 1,
              "edfkern._C.grad_cam: A must have C, h, w >= 1, got ", A.sizes());
  if (size.has_value()) {
    TORCH_CHECK_VALUE(size->size() == 2, "edfkern._C.grad_cam: size must be (H, W)");
    TORCH_CHECK_VALUE((*size)[0] >= 1 && (*size)[1] >= 1, "edfkern._C.grad_cam: size must be positive");
    bounded_numel(op, "the CAMs", {A.size(d - 4), (*size)[0], (*size)[1]});
  }
}

inline void cpd_vectors(const char* op, const at::Tensor& student, const at::Tensor& target, const at::Tensor& start) {
  float_arg(op, "student", student);
  float_arg(op, "target", target);
  float_arg(op, "start", start);
  TORCH_CHECK_VALUE(student.numel() >= 1, "edfkern._C.", op, ": student must hold at least one value");
  for (const at::Tensor* t : {&target, &start}) {
    TORCH_CHECK_TYPE(t->scalar_type() == student.scalar_type(), "edfkern._C.", op,
                     ": target and start must have student's dtype");
    TORCH_CHECK_VALUE(t->numel() == student.numel(), "edfkern._C.", op, ": target and start must have student's size");
    same_device(op, "target/start", *t, student);
  }
}

inline void cpd_k(const char* op, int64_t P, int64_t k) {
  TORCH_CHECK_VALUE(k >= 0 && k < std::max<int64_t>(P, 1), "edfkern._C.", op, ": k must lie in [0, P=", P, "), got ", k);
}

inline void cpd_backward_args(const at::Tensor& grad_out, const at::Tensor& student, const at::Tensor& target,
                              const at::Tensor& start, const at::Tensor& thr, const at::Tensor& tie,
                              const at::Tensor& sum_d) {
  const char* op = "cpd_backward";
  cpd_vectors(op, student, target, start);
  one_value(op, "grad_out", grad_out, student, false);
  one_value(op, "thr", thr, student, false);
  one_value(op, "sum_d", sum_d, student, false);
  one_value(op, "tie", tie, student, true);
}

// x (N, C, L) or (N, D) and its groups; returns K.
inline int64_t rows_csr(const char* op, const at::Tensor& x, int64_t rank, const std::optional<at::Tensor>& perm,
                        const at::Tensor& offsets) {
  float_arg(op, "x", x, {rank});
  return csr(op, x.size(0), perm, offsets, x);
}

inline void cov_backward_args(const at::Tensor& x, const std::optional<at::Tensor>& perm, const at::Tensor& offsets,
                              const at::Tensor& mean, const at::Tensor& M) {
  const char* op = "cov_backward";
  const int64_t K = rows_csr(op, x, 3, perm, offsets);
  readable(op, "mean", mean);
  readable(op, "M", M);
  TORCH_CHECK_TYPE(is_float(mean) && is_float(M), "edfkern._C.cov_backward: mean and M must be floating tensors");
  shape_is(op, "mean", mean, {K, x.size(1), x.size(2)});
  shape_is(op, "M", M, {K, x.size(1), x.size(1)});
  same_device(op, "mean", mean, x);
  same_device(op, "M", M, x);
}

inline void cc_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& perm,
                             const at::Tensor& offsets, const at::Tensor& mean) {
  const char* op = "cc_backward";
  const int64_t K = rows_csr(op, x, 2, perm, offsets);
  one_value(op, "grad_out", grad_out, x, false);
  readable(op, "mean", mean);
  TORCH_CHECK_TYPE(is_float(mean), "edfkern._C.cc_backward: mean must be a floating tensor");
  shape_is(op, "mean", mean, {K, x.size(1)});
  same_device(op, "mean", mean, x);
}

}  // namespace checks
}  // namespace edfkern
