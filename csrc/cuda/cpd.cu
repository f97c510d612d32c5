// CPD (docs/ops.md) on CUDA: k-th smallest l by MSD radix select (11-bit digits) on
// order-preserving float bits, entirely on the device: histogram kernels feed a one-block kernel
// that picks the digit and updates the select state in global memory, so the host never waits.
// The stable-sort tie index comes from per-chunk counts of the entries equal to the threshold,
// a one-block scan, and a one-block search inside the chunk. l = (s - t)^2 is recomputed on every
// pass; workspace is O(P / 4096) counters.
#include "common.cuh"

#include <edfkern/cpd.h>

namespace edfkern {
namespace cuda {
namespace {

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per tie-count chunk

struct State {
  unsigned long long prefix, pmask;  // key bits fixed so far
  long long remaining;               // rank still sought among keys matching the prefix (1-based)
  long long count_less;              // #{key < prefix-range}
  long long tie;                     // one past the last dropped index equal to thr
  double sum_l, sum_d;               // kept sums (float64 atomics)
};

// Value source: l = (s - t)^2 in acc (forward) or l itself (keep mask).
template <typename T, bool kSquare>
struct Src {
  const T* a;
  const T* b;
  __device__ __forceinline__ acc_of<T> operator()(int64_t i) const {
    using A = acc_of<T>;
    if (kSquare) {
      const A v = load<A>(a + i) - load<A>(b + i);
      return v * v;
    }
    return load<A>(a + i);
  }
};

template <typename Get>
__global__ void hist_kernel(Get get, int64_t P, const State* st, int shift, int nbits, unsigned long long* hist) {
  using A = decltype(get(0));
  using U = sort_key_t<A>;
  __shared__ unsigned int sh[kBins];
  for (int d = threadIdx.x; d < kBins; d += blockDim.x) sh[d] = 0;
  __syncthreads();
  const U prefix = static_cast<U>(st->prefix), pmask = static_cast<U>(st->pmask);
  const U digit_mask = (U(1) << nbits) - 1;  // the last digit is narrower than kDigitBits
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < P; i += (int64_t)gridDim.x * blockDim.x) {
    const U key = to_key<A>(get(i));
    if ((key & pmask) == prefix) atomicAdd(&sh[(key >> shift) & digit_mask], 1u);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < kBins; d += blockDim.x)
    if (sh[d]) atomicAdd(&hist[d], static_cast<unsigned long long>(sh[d]));
}

// One block: pick the digit holding rank `remaining`, update the state, clear the histogram.
__global__ void pick_kernel(State* st, unsigned long long* hist, int shift, int nbits) {
  __shared__ long long before_s;
  __shared__ int digit_s;
  if (threadIdx.x == 0) {
    const int nb = 1 << nbits;
    long long before = 0;
    int d = 0;
    for (; d < nb; ++d) {
      const long long c = static_cast<long long>(hist[d]);
      if (before + c >= st->remaining) break;
      before += c;
    }
    if (d == nb) d = nb - 1;  // unreachable for 1 <= k <= P
    before_s = before;
    digit_s = d;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < kBins; d += blockDim.x) hist[d] = 0;
  if (threadIdx.x == 0) {
    st->remaining -= before_s;
    st->count_less += before_s;
    st->prefix |= static_cast<unsigned long long>(digit_s) << shift;
    st->pmask |= static_cast<unsigned long long>((1u << nbits) - 1u) << shift;
  }
}

template <typename Get>
__global__ void count_eq_kernel(Get get, int64_t P, const State* st, long long* counts) {
  using A = decltype(get(0));
  using U = sort_key_t<A>;
  const U thr = static_cast<U>(st->prefix);
  const int64_t c0 = blockIdx.x * kChunk, c1 = imin(P, c0 + kChunk);
  long long n = 0;
  for (int64_t i = c0 + threadIdx.x; i < c1; i += blockDim.x) n += to_key<A>(get(i)) == thr;
  n = block_reduce(n, Sum{}, 0LL);
  if (threadIdx.x == 0) counts[blockIdx.x] = n;
}

// One block of 1024 threads: find the chunk holding the r-th equal entry (r = k - count_less),
// then the index inside it; writes st->tie.
template <typename Get>
__global__ void __launch_bounds__(1024) tie_kernel(Get get, int64_t P, int64_t k, State* st, const long long* counts, int64_t nchunks) {
  using A = decltype(get(0));
  using U = sort_key_t<A>;
  __shared__ long long scan[1024];
  __shared__ long long target_s, chunk_s, rank_s;
  const int t = threadIdx.x, nt = blockDim.x;
  if (t == 0) {
    target_s = k - st->count_less;
    chunk_s = -1;
  }
  // 1. chunk: each thread owns a contiguous run of chunks
  const int64_t per = (nchunks + nt - 1) / nt, a0 = imin(nchunks, t * per), a1 = imin(nchunks, a0 + per);
  long long mine = 0;
  for (int64_t c = a0; c < a1; ++c) mine += counts[c];
  scan[t] = mine;
  __syncthreads();
  for (int o = 1; o < nt; o <<= 1) {  // inclusive Hillis-Steele scan
    const long long v = t >= o ? scan[t - o] : 0;
    __syncthreads();
    scan[t] += v;
    __syncthreads();
  }
  long long before = scan[t] - mine;
  const long long target = target_s;
  if (before < target && target <= scan[t]) {
    for (int64_t c = a0; c < a1; ++c) {
      if (before + counts[c] >= target) {
        chunk_s = c;
        rank_s = target - before;  // rank inside the chunk
        break;
      }
      before += counts[c];
    }
  }
  __syncthreads();
  const int64_t c = chunk_s;
  const long long r = rank_s;
  if (c < 0) {
    if (t == 0) st->tie = 0;
    return;
  }
  // 2. inside the chunk: each thread owns kChunk / nt consecutive elements
  const U thr = static_cast<U>(st->prefix);
  const int64_t e_per = (kChunk + nt - 1) / nt;
  const int64_t b0 = imin(P, c * kChunk + t * e_per), b1 = imin(P, imin(b0 + e_per, (c + 1) * kChunk));
  long long n = 0;
  for (int64_t i = b0; i < b1; ++i) n += to_key<A>(get(i)) == thr;
  __syncthreads();
  scan[t] = n;
  __syncthreads();
  for (int o = 1; o < nt; o <<= 1) {
    const long long v = t >= o ? scan[t - o] : 0;
    __syncthreads();
    scan[t] += v;
    __syncthreads();
  }
  long long seen = scan[t] - n;
  if (seen < r && r <= scan[t]) {
    for (int64_t i = b0; i < b1; ++i) {
      if (to_key<A>(get(i)) == thr && ++seen == r) {
        st->tie = i + 1;
        break;
      }
    }
  }
}

template <typename T>
__global__ void sums_kernel(const T* __restrict__ s, const T* __restrict__ t, const T* __restrict__ s0, int64_t P,
                            bool sel, State* st) {
  using A = acc_of<T>;
  using U = sort_key_t<A>;
  const U thr = static_cast<U>(st->prefix);
  const int64_t tie = sel ? st->tie : 0;
  double sl = 0.0, sd = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < P; i += (int64_t)gridDim.x * blockDim.x) {
    const A v = load<A>(s + i) - load<A>(t + i);
    const A l = v * v;
    if (sel) {
      const U key = to_key<A>(l);
      if (key < thr || (key == thr && i < tie)) continue;
    }
    const A dv = load<A>(s0 + i) - load<A>(t + i);
    sl += static_cast<double>(l);
    sd += static_cast<double>(dv * dv);
  }
  sl = block_reduce(sl, Sum{}, 0.0);
  sd = block_reduce(sd, Sum{}, 0.0);
  if (threadIdx.x == 0) {
    atomicAdd(&st->sum_l, sl);
    atomicAdd(&st->sum_d, sd);
  }
}

template <typename A>
__global__ void finish_kernel(const State* st, bool select, A* sum_l, A* sum_d, A* thr, int64_t* tie) {
  *sum_l = static_cast<A>(st->sum_l);
  *sum_d = static_cast<A>(st->sum_d);
  *thr = select ? from_key<A>(static_cast<sort_key_t<A>>(st->prefix)) : static_cast<A>(-INFINITY);
  *tie = select ? st->tie : 0;
}

template <typename Get>
__global__ void keep_kernel(Get get, int64_t P, const State* st, bool* out) {
  using A = decltype(get(0));
  using U = sort_key_t<A>;
  const U thr = static_cast<U>(st->prefix);
  const int64_t tie = st->tie;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < P; i += (int64_t)gridDim.x * blockDim.x) {
    const U key = to_key<A>(get(i));
    out[i] = !(key < thr || (key == thr && i < tie));
  }
}

template <typename T>
__global__ void backward_kernel(const acc_of<T>* go, const T* __restrict__ s, const T* __restrict__ t, int64_t P,
                                const acc_of<T>* thr, const int64_t* tie, const acc_of<T>* sum_d, T* __restrict__ out) {
  using A = acc_of<T>;
  using U = sort_key_t<A>;
  const A scale = *go / *sum_d;
  const U th = to_key<A>(*thr);
  const int64_t ti = *tie;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < P; i += (int64_t)gridDim.x * blockDim.x) {
    const A v = load<A>(s + i) - load<A>(t + i);
    const U key = to_key<A>(v * v);
    const bool dropped = key < th || (key == th && i < ti);
    const A v2 = A(2) * v;  // dropped: 0 * 2v (0, or NaN where s - t is not finite), as the loop's autograd
    out[i] = cast_to<T>(dropped ? v2 * A(0) : v2 * scale);
  }
}

__global__ void init_kernel(State* st, int64_t k) {
  State z{};
  z.remaining = k;
  *st = z;
}

// Radix select + tie search for the k-th smallest get(i); leaves the result in *st.
template <typename Get>
cudaError_t radix_select(Get get, int64_t P, int64_t k, State* st, unsigned long long* hist, long long* counts,
                   cudaStream_t stream) {
  using A = decltype(get(0));
  constexpr int kBits = sizeof(sort_key_t<A>) * 8;
  init_kernel<<<1, 1, 0, stream>>>(st, k);
  cudaError_t e = cudaMemsetAsync(hist, 0, kBins * sizeof(unsigned long long), stream);
  if (e != cudaSuccess) return e;
  const unsigned int blocks = blocks_for(P, kThreads, 1024);
  for (int hi = kBits; hi > 0; hi -= kDigitBits) {
    const int nbits = hi >= kDigitBits ? kDigitBits : hi, shift = hi - nbits;
    hist_kernel<<<blocks, kThreads, 0, stream>>>(get, P, st, shift, nbits, hist);
    pick_kernel<<<1, 256, 0, stream>>>(st, hist, shift, nbits);
  }
  const int64_t nchunks = (P + kChunk - 1) / kChunk;
  count_eq_kernel<<<static_cast<unsigned int>(nchunks), kThreads, 0, stream>>>(get, P, st, counts);
  tie_kernel<<<1, 1024, 0, stream>>>(get, P, k, st, counts, nchunks);
  return cudaGetLastError();
}

struct Ws {
  State* st;
  unsigned long long* hist;
  long long* counts;
};

Ws carve(void* ws) {
  char* p = static_cast<char*>(ws);
  Ws w;
  w.st = reinterpret_cast<State*>(p);
  w.hist = reinterpret_cast<unsigned long long*>(p + 256);
  w.counts = reinterpret_cast<long long*>(p + 256 + kBins * sizeof(unsigned long long));
  return w;
}

}  // namespace

size_t cpd_workspace_bytes(int64_t P) {
  const int64_t nchunks = (P + kChunk - 1) / kChunk;
  return 256 + kBins * sizeof(unsigned long long) + static_cast<size_t>(nchunks + 1) * sizeof(long long);
}

int cpd_forward(const void* s, const void* t, const void* s0, DType dt, int64_t P, int64_t k, void* sum_l,
                void* sum_d, void* thr, int64_t* tie, void* ws, CUstream_st* stream) {
  const Ws w = carve(ws);
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    using A = acc_of<T>;
    const T* sp = static_cast<const T*>(s);
    const T* tp = static_cast<const T*>(t);
    const bool sel = k > 0 && P > 0;
    cudaError_t e;
    if (sel) {
      e = radix_select(Src<T, true>{sp, tp}, P, k, w.st, w.hist, w.counts, stream);
    } else {
      init_kernel<<<1, 1, 0, stream>>>(w.st, 0);
      e = cudaGetLastError();
    }
    if (e != cudaSuccess) return e;
    if (P > 0)
      sums_kernel<T><<<blocks_for(P, kThreads, 1024), kThreads, 0, stream>>>(sp, tp, static_cast<const T*>(s0), P, sel,
                                                                             w.st);
    finish_kernel<A><<<1, 1, 0, stream>>>(w.st, sel, static_cast<A*>(sum_l), static_cast<A*>(sum_d),
                                          static_cast<A*>(thr), tie);
    return cudaGetLastError();
  });
}

int cpd_backward(const void* grad_out, const void* s, const void* t, DType dt, int64_t P, const void* thr,
                 const int64_t* tie, const void* sum_d, void* out, CUstream_st* stream) {
  if (P == 0) return cudaSuccess;
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    using A = acc_of<T>;
    backward_kernel<T><<<blocks_for(P, kThreads), kThreads, 0, stream>>>(
        static_cast<const A*>(grad_out), static_cast<const T*>(s), static_cast<const T*>(t), P,
        static_cast<const A*>(thr), tie, static_cast<const A*>(sum_d), static_cast<T*>(out));
    return cudaGetLastError();
  });
}

int cpd_keep_mask(const void* l, DType dt, int64_t P, int64_t k, bool* out, void* ws, CUstream_st* stream) {
  if (P == 0) return cudaSuccess;
  if (k == 0) return cudaMemsetAsync(out, 1, static_cast<size_t>(P), stream);
  const Ws w = carve(ws);
  return dispatch(dt, [&](auto tt) -> cudaError_t {
    using T = decltype(tt);
    const Src<T, false> get{static_cast<const T*>(l), nullptr};
    cudaError_t e = radix_select(get, P, k, w.st, w.hist, w.counts, stream);
    if (e != cudaSuccess) return e;
    keep_kernel<<<blocks_for(P, kThreads), kThreads, 0, stream>>>(get, P, w.st, out);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace edfkern
