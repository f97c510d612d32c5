// The boundary with torch's CUDA side: the only translation unit that includes c10/cuda headers.
// It is compiled only in CUDA builds (EDFKERN_WITH_CUDA) and cannot be compiled against the torch
// CPU wheel, which lacks CUDA's generated headers (c10/cuda/impl/cuda_cmake_macros.h); everything
// else of the CUDA path (csrc/edfkern.cpp with EDFKERN_WITH_CUDA, the .cu files) compiles without it.
#include "stream.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace edfkern {
namespace cuda {

CUstream_st* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(const char* op, int status) {
  TORCH_CHECK(status == 0, "edfkern._C.", op, ": CUDA error: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

}  // namespace cuda
}  // namespace edfkern
