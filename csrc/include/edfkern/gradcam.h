// CUDA launcher for Grad-CAM (docs/ops.md). Plain C++.
#pragma once

#include <edfkern/common.h>

struct CUstream_st;

namespace edfkern {
namespace cuda {

enum class CamMethod : int { GradCAM = 0, GradCAMpp = 1, Smooth = 2 };

// A, G: (S, N, C, h, w) (S = 1 unless Smooth), A_clean: (N, C, h, w) or null; all in dtype dt.
// out: (N, H, W) in acc (F64 for F64 input, else F32). ws: N*C + N*h*w acc elements.
// resize: 1 when the caller gave a size (the map is interpolated even to its own size, as
// F.interpolate does, which turns an infinite value into NaN), 0 when not (the map as is);
// -1 infers it from the shapes (interpolate only when (H, W) != (h, w)).
int grad_cam(const void* A, const void* G, const void* A_clean, DType dt, CamMethod method, bool normalize,
             int64_t S, int64_t N, int64_t C, int64_t h, int64_t w, int64_t H, int64_t W, void* out, void* ws,
             CUstream_st* stream, int resize = -1);

inline int64_t grad_cam_ws_elems(int64_t N, int64_t C, int64_t h, int64_t w) { return N * C + N * h * w; }

}  // namespace cuda
}  // namespace edfkern
