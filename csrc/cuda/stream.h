// The two things the CUDA path of csrc/edfkern.cpp needs from torch's CUDA side (csrc/cuda/stream.cpp).
#pragma once

struct CUstream_st;

namespace edfkern {
namespace cuda {

// torch's current CUDA stream on the current device (the caller holds a device guard).
CUstream_st* current_stream();
// A launcher's status (a cudaError_t value) as a Python RuntimeError naming edfkern._C.<op>.
void check_launch(const char* op, int status);

}  // namespace cuda
}  // namespace edfkern
