// Groups in CSR form (edfkern/reference/__init__.py), shared by the CPU and CUDA kernels:
// sorted row j is input row perm[j] (perm may be null: the identity), and class k owns sorted rows
// offsets[k] .. offsets[k+1]-1 (possibly none).
#pragma once

#include <edfkern/common.h>

namespace edfkern {

// Input row of sorted row j.
EDFKERN_HD int64_t group_row(const int64_t* perm, int64_t j) { return perm ? perm[j] : j; }

// Class of sorted row j: the k with offsets[k] <= j < offsets[k+1] (skips empty groups).
EDFKERN_HD int64_t group_of(const int64_t* offsets, int64_t K, int64_t j) {
  int64_t lo = 0, hi = K;  // invariant: offsets[lo] <= j < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (offsets[mid] <= j) lo = mid;
    else hi = mid;
  }
  return lo;
}

}  // namespace edfkern
