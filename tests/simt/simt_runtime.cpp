// SIMT emulation layer: the fiber scheduler behind cuda_runtime.h.
#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "cuda_runtime.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace simt {

int sm_count = 2;
int occupancy = 8;
bool force_wide = false;
int order = 0;
uint64_t seed = 0x5eedULL;
int drop_sync_line = -1;
int mutant = 0;
bool log_launches = false;
std::string launch_log;

namespace {

cudaError_t last_error = cudaSuccess;
std::string last_msg;

// ------------------------------------------------------------- fibers
//
// x86-64 System V: a context is the stack pointer of a stack holding the
// callee-saved registers, MXCSR and the x87 control word.
#if defined(__x86_64__)
extern "C" void simt_ctx_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl simt_ctx_switch
.type simt_ctx_switch,@function
simt_ctx_switch:
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
.size simt_ctx_switch, .-simt_ctx_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#else
#error "the SIMT layer's context switch is written for x86-64"
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

enum class State { Ready, AtBlock, AtWarp, Done };

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  State st = State::Ready;
  uint3 tid{0, 0, 0};
  uint64_t in = 0, out = 0;
  unsigned mask = 0, delta = 0;
  int width = 32;
  int line = 0;
};

std::vector<Fiber> fibers;
void* sched_sp = nullptr;
Fiber* cur = nullptr;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
uint64_t rng_state = 0;

uint64_t next_rand() {  // splitmix64
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void permute(std::vector<int>& p) {
  const int n = int(p.size());
  for (int i = 0; i < n; ++i) p[i] = order == 2 ? n - 1 - i : i;
  if (order == 0)
    for (int i = n - 1; i > 0; --i) std::swap(p[i], p[int(next_rand() % uint64_t(i + 1))]);
}

extern "C" void simt_fiber_entry() {
  g_body(g_ctx);
  cur->st = State::Done;
  simt_ctx_switch(&cur->sp, sched_sp);
  std::abort();  // a finished fiber is never resumed
}

void init_fiber(Fiber& f) {
  if (!f.stack) f.stack = static_cast<char*>(std::aligned_alloc(64, kStackBytes));
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 72);
  sp[0] = 0x1f80ULL | (0x037fULL << 32);  // MXCSR, x87 control word: the defaults
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&simt_fiber_entry);
  sp[8] = 0;  // the entry's return address: it never returns
  f.sp = sp;
  f.st = State::Ready;
}

void yield_to_scheduler() { simt_ctx_switch(&cur->sp, sched_sp); }

const char* state_name(State s) {
  switch (s) {
    case State::Ready: return "ready";
    case State::AtBlock: return "__syncthreads";
    case State::AtWarp: return "shuffle";
    case State::Done: return "exited";
  }
  return "?";
}

std::string fiber_states(int n) {
  std::string s;
  for (int w = 0; w * 32 < n; ++w) {
    s += "\n  warp " + std::to_string(w) + ":";
    for (int i = w * 32; i < n && i < w * 32 + 32; ++i) {
      s += " ";
      s += state_name(fibers[i].st);
      if (fibers[i].st == State::AtBlock) s += "@" + std::to_string(fibers[i].line);
    }
  }
  return s;
}

// Runs one block; false (error set) on a deadlock or a malformed barrier.
bool run_block(int n) {
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    init_fiber(f);
    f.tid.x = unsigned(i) % blockDim.x;
    f.tid.y = unsigned(i) / blockDim.x % blockDim.y;
    f.tid.z = unsigned(i) / (blockDim.x * blockDim.y);
  }
  std::vector<int> perm(n);
  for (;;) {
    permute(perm);
    for (int i : perm) {
      Fiber& f = fibers[i];
      if (f.st != State::Ready) continue;
      cur = &f;
      threadIdx = f.tid;
      simt_ctx_switch(&sched_sp, f.sp);
    }
    cur = nullptr;
    bool progress = false;
    int live = 0, at_block = 0, block_line = -1;
    bool mixed_lines = false;
    for (int w = 0; w * 32 < n; ++w) {
      const int lo = w * 32, hi = std::min(n, lo + 32);
      bool all = true;
      for (int i = lo; i < hi; ++i) all = all && fibers[i].st == State::AtWarp;
      if (!all) continue;
      for (int i = lo; i < hi; ++i) {
        const Fiber& f = fibers[i];
        if (f.mask != 0xffffffffu || f.width != 32 || f.delta != fibers[lo].delta) {
          set_error(cudaErrorLaunchFailure,
                    ("simt: warp " + std::to_string(w) +
                     ": shuffle with a partial mask, a width other than 32, or lanes at "
                     "different offsets (divergent shuffles)")
                        .c_str());
          return false;
        }
      }
      for (int i = lo; i < hi; ++i) {
        Fiber& f = fibers[i];
        const int src = (i - lo) + int(f.delta);
        f.out = src < hi - lo ? fibers[lo + src].in : f.in;
      }
      for (int i = lo; i < hi; ++i) fibers[i].st = State::Ready;
      progress = true;
    }
    for (int i = 0; i < n; ++i) {
      const Fiber& f = fibers[i];
      if (f.st == State::Done) continue;
      ++live;
      if (f.st == State::AtBlock) {
        ++at_block;
        if (block_line >= 0 && block_line != f.line) mixed_lines = true;
        block_line = f.line;
      }
    }
    if (live == 0) return true;
    if (progress) continue;
    if (at_block == live) {
      if (mixed_lines) {
        set_error(cudaErrorLaunchFailure,
                  ("simt: threads of a block wait at different __syncthreads()" +
                   fiber_states(n)).c_str());
        return false;
      }
      for (int i = 0; i < n; ++i)
        if (fibers[i].st == State::AtBlock) fibers[i].st = State::Ready;
      continue;
    }
    set_error(cudaErrorLaunchFailure,
              ("simt: deadlock in block (" + std::to_string(blockIdx.x) + ", " +
               std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) +
               "): every live thread waits and no barrier can complete" + fiber_states(n))
                  .c_str());
    return false;
  }
}

std::string kernel_name(void* fn) {
  Dl_info info;
  if (!dladdr(fn, &info) || !info.dli_sname) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : info.dli_sname;
  std::free(d);
  return s;
}

}  // namespace

void set_error(cudaError_t e, const char* msg) {
  if (last_error == cudaSuccess) {
    last_error = e;
    last_msg = msg;
  }
}

const char* last_message() { return last_msg.c_str(); }

void sync_block(int line) {
  if (!cur) {
    std::fprintf(stderr, "simt: __syncthreads() outside a kernel\n");
    std::abort();
  }
  if (line == drop_sync_line) return;  // the mutation test's dropped barrier
  cur->st = State::AtBlock;
  cur->line = line;
  yield_to_scheduler();
}

uint64_t shfl_exchange(uint64_t bits, unsigned mask, unsigned delta, int width) {
  if (!cur) {
    std::fprintf(stderr, "simt: warp shuffle outside a kernel\n");
    std::abort();
  }
  cur->in = bits;
  cur->mask = mask;
  cur->delta = delta;
  cur->width = width;
  cur->st = State::AtWarp;
  yield_to_scheduler();
  return cur->out;
}

void run_grid_named(dim3 grid, dim3 block, void (*body)(void*), void* ctx, void* fn) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (log_launches) {
    launch_log += kernel_name(fn) + " grid=(" + std::to_string(grid.x) + "," +
                  std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block=(" +
                  std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                  std::to_string(block.z) + ")\n";
  }
  if (threads == 0 || threads > uint64_t(kMaxThreads) || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration,
              ("simt: invalid launch configuration grid=(" + std::to_string(grid.x) + "," +
               std::to_string(grid.y) + "," + std::to_string(grid.z) + ") block=(" +
               std::to_string(block.x) + "," + std::to_string(block.y) + "," +
               std::to_string(block.z) + ")").c_str());
    return;
  }
  if (last_error != cudaSuccess) return;  // a failed launch poisons the "context"
  const int n = int(threads);
  if (int(fibers.size()) < n) fibers.resize(n);
  g_body = body;
  g_ctx = ctx;
  gridDim = grid;
  blockDim = block;
  rng_state = seed;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  // Block order: forward, reverse, or a pseudo-random walk (stride coprime
  // with the block count, random start).
  uint64_t start = 0, stride = 1;
  if (order == 2) {
    start = nblocks - 1;
    stride = nblocks - 1;
  } else if (order == 0 && nblocks > 1) {
    start = next_rand() % nblocks;
    do stride = next_rand() % nblocks; while (stride == 0 || std::gcd(stride, nblocks) != 1);
  }
  for (uint64_t b = 0, idx = start; b < nblocks; ++b, idx = (idx + stride) % nblocks) {
    blockIdx.x = unsigned(idx % grid.x);
    blockIdx.y = unsigned(idx / grid.x % grid.y);
    blockIdx.z = unsigned(idx / (uint64_t(grid.x) * grid.y));
    if (!run_block(n)) return;
  }
  seed = next_rand();  // the next launch gets other orders
}

}  // namespace simt

cudaError_t cudaGetLastError() {
  const cudaError_t e = simt::last_error;
  simt::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) *value = simt::sm_count;
  else if (attr == cudaDevAttrMaxThreadsPerMultiProcessor) *value = 2048;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
