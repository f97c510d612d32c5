// Grad-CAM (docs/ops.md): the method names, and the CUDA launcher. Torch-free (common.h).
#pragma once

#include <string>

#include <edfkern/common.h>

struct CUstream_st;

namespace edfkern {

enum class CamMethod : int { GradCAM = 0, GradCAMpp = 1, Smooth = 2 };

// The method called `name` ("gradcam", "gradcam++", "smoothgradcam++"); false for any other name.
inline bool parse_cam_method(const std::string& name, CamMethod& out) {
  if (name == "gradcam") out = CamMethod::GradCAM;
  else if (name == "gradcam++") out = CamMethod::GradCAMpp;
  else if (name == "smoothgradcam++") out = CamMethod::Smooth;
  else return false;
  return true;
}

namespace cuda {

// A, G: (S, N, C, h, w) (S = 1 unless Smooth), A_clean: (N, C, h, w) or null; all in dtype dt.
// out: (N, H, W) in acc (F64 for F64 input, else F32). ws: grad_cam_ws_elems acc elements.
// resize: the caller gave a size, so the map is interpolated even to its own size, as
// F.interpolate does (an infinite value becomes NaN); else the map is written as is.
int grad_cam(const void* A, const void* G, const void* A_clean, DType dt, CamMethod method, bool normalize,
             int64_t S, int64_t N, int64_t C, int64_t h, int64_t w, int64_t H, int64_t W, bool resize, void* out,
             void* ws, CUstream_st* stream);

inline int64_t grad_cam_ws_elems(int64_t N, int64_t C, int64_t h, int64_t w) { return N * C + N * h * w; }

}  // namespace cuda
}  // namespace edfkern
