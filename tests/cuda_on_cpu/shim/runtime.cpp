// The scheduler behind the <cuda_runtime.h> stand-in (see its header comment): GPU threads as
// ucontext fibers, one block at a time, a checked block barrier, a checked 32-lane warp exchange,
// the launch limits, the run order, and the few runtime-API calls the kernels make.
#include "cuda_runtime.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUCPU_ASAN 1
#endif

#if defined(__x86_64__)
// x86-64 fibers switch with these few instructions instead of swapcontext, which makes a
// sigprocmask system call per switch (most of the tier's time). cucpu_switch(&from_sp, to_sp): push
// the callee-saved registers and the SSE / x87 control words, save rsp, load the other fiber's.
#define CUCPU_FAST_SWITCH 1
asm(R"(
.text
.globl cucpu_switch
.hidden cucpu_switch
.type cucpu_switch,@function
cucpu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cucpu_switch,.-cucpu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
extern "C" void cucpu_switch(void** from_sp, void* to_sp);
#endif

// The bounds of the section holding every __shared__ variable (the linker defines them).
extern "C" char __start_cucpu_shared[] __attribute__((weak));
extern "C" char __stop_cucpu_shared[] __attribute__((weak));

namespace cucpu {

enum class St { Ready, Barrier, Shfl, Exited };

struct ThreadState {
  ucontext_t ctx;  // without CUCPU_FAST_SWITCH
  void* sp;        // with CUCPU_FAST_SWITCH
  uint3 idx;
  int linear, warp, lane;
  St st;
  const char* file;  // where it waits (barrier or shuffle)
  int line;
  ShflKind kind;
  unsigned mask;
  int arg, width;
  unsigned long long bits, result;
};

ThreadState* g_current = nullptr;
uint3 g_block_idx;
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStack = 256 * 1024;  // per fiber, plus a guard page below it
constexpr size_t kPage = 4096;
constexpr int kMaxThreads = 1024;

const char* const kKindName[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};

struct Block {
  std::vector<ThreadState> t;
  int n = 0, exited = 0, at_barrier = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
};

Block g_blk;
ucontext_t g_sched, g_template;
void* g_sched_sp = nullptr;
char* g_stacks = nullptr;
void (*g_body)(void*) = nullptr;
void* g_closure = nullptr;
bool g_failed = false;
std::string g_msg;
cudaError_t g_last = cudaSuccess, g_sticky = cudaSuccess;
unsigned long long g_launches = 0;
#ifdef CUCPU_ASAN
const void* g_sched_bottom = nullptr;
size_t g_sched_size = 0;
#endif

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string where(const ThreadState& t) {
  return fmt("thread (%u,%u,%u) of block (%u,%u,%u)", t.idx.x, t.idx.y, t.idx.z, g_block_idx.x, g_block_idx.y,
             g_block_idx.z);
}

char* stack_of(const ThreadState& t) { return g_stacks + t.linear * (kStack + kPage) + kPage; }

void switch_to(ThreadState& t) {
  g_current = &t;
#ifdef CUCPU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, stack_of(t), kStack);
#endif
#ifdef CUCPU_FAST_SWITCH
  cucpu_switch(&g_sched_sp, t.sp);
#else
  swapcontext(&g_sched, &t.ctx);
#endif
#ifdef CUCPU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_current = nullptr;
}

// From a fiber back to the scheduler; returns when the scheduler resumes it (never when `last`).
void yield(bool last = false) {
  ThreadState* me = g_current;
#ifdef CUCPU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(last ? nullptr : &fake, g_sched_bottom, g_sched_size);
#endif
#ifdef CUCPU_FAST_SWITCH
  cucpu_switch(&me->sp, g_sched_sp);
#else
  swapcontext(&me->ctx, &g_sched);
#endif
#ifdef CUCPU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_current = me;
}

// A check failed: record it, print it, and leave the kernel (the scheduler abandons the grid).
[[noreturn]] void fail(const std::string& what) {
  if (!g_failed) {
    g_failed = true;
    g_msg = what;
    std::fprintf(stderr, "cuda-on-cpu: %s\n", what.c_str());
  }
  yield(true);
  std::abort();  // unreachable: an abandoned fiber is never resumed
}

void thread_exit(ThreadState& me);

void fiber_entry() {
#ifdef CUCPU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  g_body(g_closure);
  thread_exit(*g_current);
  yield(true);
}

ThreadState& self(const char* what) {
  if (g_current == nullptr) {
    std::fprintf(stderr, "cuda-on-cpu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *g_current;
}

void thread_exit(ThreadState& me) {
  me.st = St::Exited;
  ++g_blk.exited;
  if (g_blk.at_barrier > 0)
    fail(fmt("%s returned while %d threads wait at __syncthreads (%s:%d): a barrier that not every thread of "
             "the block reaches",
             where(me).c_str(), g_blk.at_barrier, g_blk.bar_file, g_blk.bar_line));
  for (int l = 0; l < 32; ++l) {
    const int id = me.warp * 32 + l;
    if (id >= g_blk.n) break;
    const ThreadState& o = g_blk.t[id];
    if (o.st == St::Shfl && ((o.mask >> me.lane) & 1u))
      fail(fmt("%s (lane %d) returned while lane %d waits for it in %s (%s:%d, mask 0x%08x)", where(me).c_str(),
               me.lane, l, kKindName[static_cast<int>(o.kind)], o.file, o.line, o.mask));
  }
}

bool same_site(const char* f1, int l1, const char* f2, int l2) { return l1 == l2 && std::strcmp(f1, f2) == 0; }

enum class Order { Forward, Reverse, Random };

Order run_order(unsigned long long& seed) {
  const char* v = std::getenv("EDFKERN_CUDA_ON_CPU_ORDER");
  seed = 0;
  if (v == nullptr || !*v || !std::strcmp(v, "forward")) return Order::Forward;
  if (!std::strcmp(v, "reverse")) return Order::Reverse;
  if (!std::strncmp(v, "random", 6)) {
    if (v[6] == ':') seed = std::strtoull(v + 7, nullptr, 10);
    return Order::Random;
  }
  std::fprintf(stderr, "cuda-on-cpu: EDFKERN_CUDA_ON_CPU_ORDER must be forward, reverse or random[:SEED], got '%s'\n",
               v);
  std::abort();
}

void arrange(std::vector<int>& v, Order o, std::mt19937_64& rng) {
  std::iota(v.begin(), v.end(), 0);
  if (o == Order::Reverse) std::reverse(v.begin(), v.end());
  if (o == Order::Random) std::shuffle(v.begin(), v.end(), rng);
}

__attribute__((no_sanitize("address"))) void poison_shared() {
  for (char* p = __start_cucpu_shared; p < __stop_cucpu_shared; ++p) *p = static_cast<char>(0xff);
}

std::string deadlock_report() {
  std::string s = fmt("deadlock in block (%u,%u,%u): no thread can run;", g_block_idx.x, g_block_idx.y, g_block_idx.z);
  if (g_blk.at_barrier)
    s += fmt(" %d threads wait at __syncthreads (%s:%d);", g_blk.at_barrier, g_blk.bar_file, g_blk.bar_line);
  for (const ThreadState& t : g_blk.t) {
    if (t.st != St::Shfl) continue;
    s += fmt(" %s (lane %d) waits in %s (%s:%d, mask 0x%08x) for lanes", where(t).c_str(), t.lane,
             kKindName[static_cast<int>(t.kind)], t.file, t.line, t.mask);
    for (int l = 0; l < 32; ++l)
      if (((t.mask >> l) & 1u) && g_blk.t[t.warp * 32 + l].st != St::Shfl) s += fmt(" %d", l);
    s += ";";
    break;
  }
  return s;
}

// Runs one block to completion; false when a check failed.
bool run_block(Order order, std::mt19937_64& rng) {
  poison_shared();
  Block& b = g_blk;
  const dim3 bd = g_block_dim;
  b.n = static_cast<int>(bd.x * bd.y * bd.z);
  b.exited = b.at_barrier = 0;
  b.bar_file = nullptr;
  b.t.assign(b.n, ThreadState{});
  for (int l = 0; l < b.n; ++l) {
    ThreadState& t = b.t[l];
    t.linear = l;
    t.idx = make_uint3(l % bd.x, (l / bd.x) % bd.y, l / (bd.x * bd.y));
    t.warp = l / 32;
    t.lane = l % 32;
    t.st = St::Ready;
#ifdef CUCPU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(stack_of(t), kStack);  // frames of fibers that never returned
#endif
#ifdef CUCPU_FAST_SWITCH
    // the frame cucpu_switch pops: control words, six registers, the return address (fiber_entry),
    // and a slot that leaves rsp as a call would (16-byte aligned minus 8)
    void** frame = reinterpret_cast<void**>(stack_of(t) + kStack) - 9;
    std::memset(frame, 0, 9 * sizeof(void*));
    const uint64_t control = 0x1F80u | (0x037FULL << 32);  // MXCSR default, then the x87 control word
    std::memcpy(frame, &control, sizeof control);
    frame[7] = reinterpret_cast<void*>(&fiber_entry);
    t.sp = frame;
#else
    std::memcpy(&t.ctx, &g_template, sizeof(ucontext_t));
    t.ctx.uc_stack.ss_sp = stack_of(t);
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_entry, 0);
#endif
  }
  std::vector<int> seq(b.n);
  arrange(seq, order, rng);
  while (b.exited < b.n) {
    for (int l : seq) {
      if (b.t[l].st != St::Ready) continue;
      switch_to(b.t[l]);
      if (g_failed) return false;
    }
    if (b.at_barrier > 0 && b.at_barrier == b.n - b.exited) {  // everyone arrived: release
      for (ThreadState& t : b.t)
        if (t.st == St::Barrier) t.st = St::Ready;
      b.at_barrier = 0;
      b.bar_file = nullptr;
    }
    if (b.exited < b.n && std::none_of(b.t.begin(), b.t.end(), [](const ThreadState& t) { return t.st == St::Ready; })) {
      g_failed = true;
      g_msg = deadlock_report();
      std::fprintf(stderr, "cuda-on-cpu: %s\n", g_msg.c_str());
      return false;
    }
    if (order == Order::Random) std::shuffle(seq.begin(), seq.end(), rng);
  }
  return true;
}

const char* limit_error(dim3 grid, dim3 block, size_t shmem) {
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    return "a grid or block dimension is 0";
  if (block.x > 1024 || block.y > 1024 || block.z > 64) return "block dimensions above (1024, 1024, 64)";
  if (static_cast<unsigned long long>(block.x) * block.y * block.z > kMaxThreads)
    return "more than 1024 threads per block";
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    return "grid dimensions above (2^31 - 1, 65535, 65535)";
  if (shmem + static_cast<size_t>(__stop_cucpu_shared - __start_cucpu_shared) > 48 * 1024)
    return "more than 48 KiB of shared memory per block";
  return nullptr;
}

}  // namespace

const uint3& thread_idx() { return self("threadIdx").idx; }

void syncthreads(const char* file, int line) {
  ThreadState& me = self("__syncthreads");
  Block& b = g_blk;
  if (b.exited > 0) {
    const auto first = std::find_if(b.t.begin(), b.t.end(), [](const ThreadState& t) { return t.st == St::Exited; });
    fail(fmt("__syncthreads (%s:%d) in %s after %d threads of the block returned (first: %s): a barrier that not "
             "every thread of the block reaches",
             file, line, where(me).c_str(), b.exited, where(*first).c_str()));
  }
  if (b.at_barrier > 0 && !same_site(file, line, b.bar_file, b.bar_line))
    fail(fmt("threads of one block wait at different barriers: %s at %s:%d, %d threads at %s:%d", where(me).c_str(),
             file, line, b.at_barrier, b.bar_file, b.bar_line));
  me.st = St::Barrier;
  me.file = file;
  me.line = line;
  b.bar_file = file;
  b.bar_line = line;
  ++b.at_barrier;
  yield();
}

unsigned long long shfl_exchange(ShflKind kind, unsigned mask, unsigned long long bits, int arg, int width,
                                 const char* file, int line) {
  ThreadState& me = self("__shfl_*_sync");
  Block& b = g_blk;
  const char* name = kKindName[static_cast<int>(kind)];
  if (!((mask >> me.lane) & 1u))
    fail(fmt("%s (%s:%d) in %s: the calling lane %d is not in the mask 0x%08x", name, file, line, where(me).c_str(),
             me.lane, mask));
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(fmt("%s (%s:%d): width %d is not a power of two in [1, 32]", name, file, line, width));
  ThreadState* lanes[32] = {};
  int arrived = 0, named = 0;
  for (int l = 0; l < 32; ++l) {
    const int id = me.warp * 32 + l;
    ThreadState* o = id < b.n ? &b.t[id] : nullptr;
    lanes[l] = o;
    const bool in_mask = (mask >> l) & 1u;
    if (in_mask) {
      ++named;
      if (o == nullptr)
        fail(fmt("%s (%s:%d) in %s: mask 0x%08x names lane %d, which does not exist in a block of %d threads", name,
                 file, line, where(me).c_str(), mask, l, b.n));
      if (o->st == St::Exited)
        fail(fmt("%s (%s:%d) in %s: mask 0x%08x names lane %d, which has returned", name, file, line,
                 where(me).c_str(), mask, l));
    }
    if (o != nullptr && o != &me && o->st == St::Shfl && (in_mask || ((o->mask >> me.lane) & 1u))) {
      if (o->kind != kind || o->mask != mask || o->width != width)
        fail(fmt("lanes of one warp in different shuffles: lane %d in %s (%s:%d, mask 0x%08x), lane %d in %s "
                 "(%s:%d, mask 0x%08x)",
                 me.lane, name, file, line, mask, l, kKindName[static_cast<int>(o->kind)], o->file, o->line,
                 o->mask));
      ++arrived;
    }
  }
  me.st = St::Shfl;
  me.file = file;
  me.line = line;
  me.kind = kind;
  me.mask = mask;
  me.arg = arg;
  me.width = width;
  me.bits = bits;
  if (arrived + 1 < named) {
    yield();
    return me.result;
  }
  // the last lane of the mask arrived: exchange
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    ThreadState& t = *lanes[l];
    const int base = l & ~(width - 1), pos = l & (width - 1);
    int src = l;
    switch (kind) {
      case ShflKind::Idx: src = base + (t.arg & (width - 1)); break;
      case ShflKind::Up: src = pos - t.arg >= 0 ? l - t.arg : l; break;
      case ShflKind::Down: src = pos + t.arg < width ? l + t.arg : l; break;
      case ShflKind::Xor: src = (l ^ t.arg) < base + width ? (l ^ t.arg) : l; break;
    }
    if (src < 0 || src > 31 || !((mask >> src) & 1u))
      fail(fmt("%s (%s:%d): lane %d reads lane %d, outside the mask 0x%08x", name, file, line, l, src, mask));
    t.result = lanes[src]->bits;
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) lanes[l]->st = St::Ready;
  return me.result;
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t shmem, void (*body)(void*), void* closure, const char* file,
                     int line) {
  if (g_current != nullptr) {
    std::fprintf(stderr, "cuda-on-cpu: a kernel launch inside a kernel (%s:%d) is not supported\n", file, line);
    std::abort();
  }
  if (g_sticky != cudaSuccess) return g_last = g_sticky;
  if (const char* why = limit_error(grid, block, shmem)) {
    if (g_msg.empty())
      g_msg = fmt("launch at %s:%d: grid (%u,%u,%u), block (%u,%u,%u), %zu bytes of dynamic shared memory: %s", file,
                  line, grid.x, grid.y, grid.z, block.x, block.y, block.z, shmem, why);
    return g_last = cudaErrorInvalidConfiguration;
  }
  if (g_stacks == nullptr) {
    void* m = mmap(nullptr, kMaxThreads * (kStack + kPage), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::perror("cuda-on-cpu: mmap of the fiber stacks");
      std::abort();
    }
    g_stacks = static_cast<char*>(m);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(g_stacks + i * (kStack + kPage), kPage, PROT_NONE);
    getcontext(&g_template);
  }
  unsigned long long seed;
  const Order order = run_order(seed);
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ULL + (++g_launches));
  g_body = body;
  g_closure = closure;
  g_block_dim = block;
  g_grid_dim = grid;
  const unsigned long long nb = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  std::vector<int> seq;
  if (order == Order::Random) {
    seq.resize(nb);
    arrange(seq, order, rng);
  }
  for (unsigned long long i = 0; i < nb; ++i) {
    const unsigned long long q = order == Order::Forward ? i : order == Order::Reverse ? nb - 1 - i : seq[i];
    g_block_idx = make_uint3(static_cast<unsigned>(q % grid.x), static_cast<unsigned>((q / grid.x) % grid.y),
                             static_cast<unsigned>(q / (static_cast<unsigned long long>(grid.x) * grid.y)));
    if (!run_block(order, rng)) {
      g_msg = fmt("kernel launched at %s:%d stopped: ", file, line) + g_msg;
      g_sticky = cudaErrorLaunchFailure;
      return g_last = g_sticky;
    }
  }
  return cudaSuccess;
}

void reset() {
  g_failed = false;
  g_msg.clear();
  g_last = g_sticky = cudaSuccess;
  g_launches = 0;
}

const char* last_message() { return g_msg.c_str(); }

}  // namespace cucpu

extern "C" {

cudaError_t cudaGetLastError() {
  const cudaError_t e = cucpu::g_last;
  cucpu::g_last = cucpu::g_sticky;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cucpu::g_last; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  if (cucpu::g_sticky != cudaSuccess) return cucpu::g_sticky;
  std::memset(p, value, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t n) { return cudaMemsetAsync(p, value, n, nullptr); }
cudaError_t cudaDeviceSynchronize() { return cucpu::g_sticky; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cucpu::g_sticky; }

}  // extern "C"
