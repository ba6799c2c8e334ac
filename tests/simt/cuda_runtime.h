// SIMT emulation layer, CUDA runtime stand-in: compiles the unchanged kernels
// of csrc/kernels/cuda_kernels.cuh as host code (g++, FUSEDBN_SIMT defined)
// and runs them on the CPU. Only what the kernels and cuda_launch.cuh use.
//
// Execution model (simt_runtime.cpp): the blocks of a grid run one after
// another; the threads of a block are cooperative fibers on one OS thread,
// switched only at __syncthreads() (a barrier over the block's live threads)
// and at warp shuffles (a barrier over the warp's 32 lanes that exchanges
// the values). Between two barriers the runnable fibers run in a seeded
// pseudo-random order (or forward / reverse), so a missing barrier gives
// wrong results instead of happening to work. A block whose fibers all wait
// and no barrier can complete is a deadlock: the launch fails with a message.
// __shared__ is a function-local static: one per kernel instantiation, which
// is a block's shared memory because blocks never run concurrently.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>

#ifndef FUSEDBN_SIMT
#define FUSEDBN_SIMT 1
#endif

// CUDA's device math is in the global namespace.
using std::isfinite;
using std::isinf;
using std::isnan;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
// __restrict__ is g++'s own.

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The current fiber's values (set by the scheduler at every switch).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace simt {
// Settings (see simt_runtime.cpp for the defaults), set by the test harness.
extern int sm_count;          // what cudaDeviceGetAttribute reports
extern int occupancy;         // what the occupancy API reports for every kernel
extern bool force_wide;       // wide_index(): int64 indices on any tensor
extern int order;             // 0 seeded shuffle, 1 forward, 2 reverse
extern uint64_t seed;
extern int drop_sync_line;    // a __syncthreads() at this source line is a no-op (mutation test)
extern int mutant;            // runtime switch of the mutated test build (mutation test)

void sync_block(int line);
uint64_t shfl_exchange(uint64_t bits, unsigned mask, unsigned delta, int width);
extern bool log_launches;     // append each launch (kernel, grid, block) to launch_log
void run_grid_named(dim3 grid, dim3 block, void (*body)(void*), void* ctx, void* kernel);
void set_error(cudaError_t e, const char* msg);
const char* last_message();

template <typename T>
inline T shfl_down(unsigned mask, T v, unsigned delta, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  b = shfl_exchange(b, mask, delta, width);
  T r;
  std::memcpy(&r, &b, sizeof(T));
  return r;
}

// The kernel launch (cuda_launch.cuh: launch()): arguments already converted
// to the kernel's parameter types, each thread gets its own copy.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, A... args) {
  auto body = [&]() { kernel(args...); };
  using B = decltype(body);
  run_grid_named(grid, block, [](void* c) { (*static_cast<B*>(c))(); }, &body,
                 reinterpret_cast<void*>(kernel));
}
}  // namespace simt

#define __syncthreads() ::simt::sync_block(__LINE__)

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::shfl_down(mask, v, delta, width);
}

// The fibers of a launch run on one OS thread and switch only at barriers
// and shuffles, so a plain read-modify-write is atomic here.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float v) { return std::sqrt(v); }
inline double __dsqrt_rn(double v) { return std::sqrt(v); }

cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
const char* cudaGetErrorString(cudaError_t e);
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = simt::occupancy;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
