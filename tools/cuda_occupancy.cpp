// Occupancy on an H100 (sm_90, SXM: 132 SMs) from the CUDA toolkit's host-only cuda_occupancy.h, for
// tools/cuda_limits.py. Reads lines "threads registers static_shared_bytes" and prints, for each,
// "active_blocks_per_sm occupancy limited_by" (occupancy = active warps / 64).
#include <cuda_occupancy.h>

#include <cstdio>

int main() {
  cudaOccDeviceProp prop;
  prop.computeMajor = 9;
  prop.computeMinor = 0;
  prop.maxThreadsPerBlock = 1024;
  prop.maxThreadsPerMultiprocessor = 2048;
  prop.regsPerBlock = 65536;
  prop.regsPerMultiprocessor = 65536;
  prop.warpSize = 32;
  prop.sharedMemPerBlock = 48 * 1024;
  prop.sharedMemPerMultiprocessor = 228 * 1024;
  prop.numSms = 132;
  prop.sharedMemPerBlockOptin = 227 * 1024;
  prop.reservedSharedMemPerBlock = 1024;
  cudaOccDeviceState state;
  int threads, regs;
  size_t shared;
  while (std::scanf("%d %d %zu", &threads, &regs, &shared) == 3) {
    cudaOccFuncAttributes attr;
    attr.maxThreadsPerBlock = 1024;
    attr.numRegs = regs;
    attr.sharedSizeBytes = shared;
    cudaOccResult res;
    if (cudaOccMaxActiveBlocksPerMultiprocessor(&res, &prop, &attr, &state, threads, 0) != CUDA_OCC_SUCCESS) {
      std::printf("0 0 error\n");
      continue;
    }
    const int warps = res.activeBlocksPerMultiprocessor * ((threads + 31) / 32);
    const unsigned lim = res.limitingFactors;
    std::printf("%d %.3f %s\n", res.activeBlocksPerMultiprocessor, warps / 64.0,
                lim & OCC_LIMIT_REGISTERS ? "registers"
                : lim & OCC_LIMIT_SHARED_MEMORY ? "shared"
                : lim & OCC_LIMIT_WARPS ? "warps"
                : lim & OCC_LIMIT_BLOCKS ? "blocks"
                                          : "-");
  }
  return 0;
}
