// A stand-in for <cuda_runtime.h> that lets g++ compile csrc/cuda/*.cu for the CPU (the CUDA-source-
// on-CPU test tier, tests/cuda_on_cpu). It is first on the include path; the toolkit's own
// vector_types.h, driver_types.h, cuda_fp16.h and cuda_bf16.h compile with g++ and are used as they are.
//
// Execution model (runtime.cpp): every GPU thread is a fiber; the blocks of a launch run one at a time;
// __shared__ variables are static storage in one linker section, filled with 0xff bytes before each
// block (uninitialised shared memory reads as NaN / -1). __syncthreads is a block barrier and
// __shfl_*_sync a 32-lane warp exchange; both stop the kernel with a message on misuse (threads at
// different barriers, a barrier after threads exited, a lane outside the mask, a deadlock). The order
// the fibers run in is EDFKERN_CUDA_ON_CPU_ORDER: forward (default), reverse, or random:SEED.
// Launches are synchronous; streams are ignored; atomics are plain read-modify-writes (fibers never
// switch inside one). Kernel launches k<<<g, b, s, st>>>(args) are rewritten by tests/cuda_on_cpu/shim_build.py
// into ::cucpu::launch(...)(args) calls.
#pragma once

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("cucpu_shared")))

#include <cuda_runtime_api.h>  // the real declarations (extern "C"); runtime.cpp defines the few used
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace cucpu {

// ------------------------------------------------------------------ thread identity
struct ThreadState;
extern ThreadState* g_current;  // the running fiber (null outside a kernel)
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;
const uint3& thread_idx();

// ------------------------------------------------------------------ synchronisation
void syncthreads(const char* file, int line);
enum class ShflKind : int { Idx, Up, Down, Xor };
// Deposit `bits` (size bytes) for this lane, wait for the lanes of `mask`, return the source lane's bits.
unsigned long long shfl_exchange(ShflKind kind, unsigned mask, unsigned long long bits, int arg, int width,
                                 const char* file, int line);

template <typename T>
T shfl(ShflKind kind, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a value of at most 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_exchange(kind, mask, bits, arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ------------------------------------------------------------------ launches
// Runs body(closure) once per thread of every block; returns the launch's error (limits, or a kernel
// stopped by a shim check, which also becomes the sticky error).
cudaError_t run_grid(dim3 grid, dim3 block, size_t shmem, void (*body)(void*), void* closure, const char* file,
                     int line);

template <typename F>
struct Launcher {
  F kernel;
  dim3 grid, block;
  size_t shmem;
  const char* file;
  int line;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // Each thread calls kernel(copies of the arguments): CUDA passes kernel arguments by value.
    auto packed = std::make_tuple(std::forward<Args>(args)...);
    auto call = [this, &packed]() { std::apply(kernel, packed); };
    using Call = decltype(call);
    run_grid(grid, block, shmem, [](void* c) { (*static_cast<Call*>(c))(); }, &call, file, line);
  }
};

template <typename F>
Launcher<F> launch(const char* file, int line, F kernel, dim3 grid, dim3 block, size_t shmem = 0,
                   cudaStream_t = nullptr) {
  return Launcher<F>{kernel, grid, block, shmem, file, line};
}

// ------------------------------------------------------------------ the shim's own controls (runtime.cpp)
void reset();                 // clear the sticky error and the message
const char* last_message();  // the first check that failed since reset ("" if none)

}  // namespace cucpu

#define threadIdx (::cucpu::thread_idx())
#define blockIdx (static_cast<const uint3&>(::cucpu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::cucpu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::cucpu::g_grid_dim))
#define warpSize 32

#define __syncthreads() ::cucpu::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(...) ::cucpu::shfl(::cucpu::ShflKind::Idx, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cucpu::shfl(::cucpu::ShflKind::Up, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cucpu::shfl(::cucpu::ShflKind::Down, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cucpu::shfl(::cucpu::ShflKind::Xor, __FILE__, __LINE__, __VA_ARGS__)

// ------------------------------------------------------------------ atomics and the runtime API
template <typename T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = v > old ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}

// Defined in runtime.cpp (declared by cuda_runtime_api.h): cudaGetLastError, cudaPeekAtLastError,
// cudaGetErrorString, cudaMemsetAsync, cudaMemset, cudaDeviceSynchronize, cudaStreamSynchronize.
