// Groups (CSR form, <edfkern/groups.h>) as the CPU kernels read them (covariance.cpp, features.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <edfkern/groups.h>

#include <optional>
#include <vector>

namespace edfkern {
namespace cpu {

// Group layout on the host: sorted row j is input row perm[j] (identity when perm is absent).
struct HostGroups {
  const int64_t* perm = nullptr;
  std::vector<int64_t> offsets;  // K+1
  int64_t K() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t row(int64_t j) const { return group_row(perm, j); }
};

// perm (N,) int64 or absent, offsets (K+1,) int64, both checked (csrc/checks.h) and on the CPU.
inline HostGroups host_groups(const std::optional<at::Tensor>& perm, const at::Tensor& offsets) {
  HostGroups g;
  const int64_t* o = offsets.data_ptr<int64_t>();
  g.offsets.assign(o, o + offsets.numel());
  if (perm.has_value() && perm->defined()) g.perm = perm->data_ptr<int64_t>();
  return g;
}

}  // namespace cpu
}  // namespace edfkern
