// SIMT emulation layer: the unchanged host side and kernels of the CUDA
// backend (csrc/kernels/cuda_kernels*.cu, cuda_launch.cuh, .cuh) compiled as host code against
// the stand-in CUDA headers of this folder, behind a small C interface that
// tests/simt/simt_binding.cpp loads with dlopen (a mutated build of the
// kernels is just another library). Torch-free.
#include <cstring>
#include <string>

#include "cuda_runtime.h"
// The shared entry points; each dtype's kernels (cuda_kernels_<dtype>.cu)
// are units of their own, as for nvcc (tests/test_cuda_simt.py builds them).
#include "kernels/cuda_kernels.cu"

namespace simt {
extern std::string launch_log;
}

extern "C" {

size_t simt_forward_workspace_bytes(const fusedbn::ForwardParams* p, int training) {
  return fusedbn::cuda::forward_workspace_bytes(*p, training != 0);
}
size_t simt_backward_workspace_bytes(const fusedbn::BackwardParams* p) {
  return fusedbn::cuda::backward_workspace_bytes(*p);
}
int simt_forward(const fusedbn::ForwardParams* p, int training, void* ws) {
  cudaGetLastError();
  return int(fusedbn::cuda::forward(*p, training != 0, ws, nullptr));
}
int simt_backward(const fusedbn::BackwardParams* p, void* ws) {
  cudaGetLastError();
  return int(fusedbn::cuda::backward(*p, ws, nullptr));
}
const char* simt_message() { return simt::last_message(); }

// Settings: sm_count, occupancy, force_wide, order, seed, drop_sync_line,
// mutant, log.
int simt_set(const char* key, long long v) {
  const std::string k = key;
  if (k == "sm_count") simt::sm_count = int(v);
  else if (k == "occupancy") simt::occupancy = int(v);
  else if (k == "force_wide") simt::force_wide = v != 0;
  else if (k == "order") simt::order = int(v);
  else if (k == "seed") simt::seed = uint64_t(v);
  else if (k == "drop_sync_line") simt::drop_sync_line = int(v);
  else if (k == "mutant") simt::mutant = int(v);
  else if (k == "log") simt::log_launches = v != 0;
  else return 0;
  return 1;
}

// The launches logged since the last call (one line each), then cleared.
const char* simt_take_log() {
  static std::string out;
  out.swap(simt::launch_log);
  simt::launch_log.clear();
  return out.c_str();
}
}

// The layer's own half / bfloat16 conversions, for the test against torch's.
extern "C" void simt_convert(const float* in, size_t n, uint16_t* h, uint16_t* b, float* h_back,
                             float* b_back) {
  for (size_t i = 0; i < n; ++i) {
    const __half hv = __float2half_rn(in[i]);
    const __nv_bfloat16 bv = __float2bfloat16_rn(in[i]);
    h[i] = hv.__x;
    b[i] = bv.__x;
    h_back[i] = __half2float(hv);
    b_back[i] = __bfloat162float(bv);
  }
}

// ------------------------------------------------------ the layer's self-test
namespace selftest_kernels {

__global__ void exited_lane_shuffle(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void split_barrier(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Thread t writes s[t], then reads its neighbour's slot: wrong without the
// barrier unless the scheduler happens to run every writer first.
template <bool Sync>
__global__ void neighbour(int* wrong) {
  __shared__ int s[256];
  const int t = int(threadIdx.x);
  s[t] = int(blockIdx.x) * 1000 + t;
  if (Sync) __syncthreads();
  const int n = (t + 1) % int(blockDim.x);
  if (s[n] != int(blockIdx.x) * 1000 + n) ++*wrong;
  if (Sync) __syncthreads();  // before the next block of this launch rewrites s (same static)
}

__global__ void shuffles(int* out) {
  const int lane = int(threadIdx.x) & 31;
  int v = int(threadIdx.x) * 10;
  v = __shfl_down_sync(0xffffffffu, v, 3);
  // lane < 29 gets lane + 3's value, the others keep their own.
  const int want = (lane < 29 ? int(threadIdx.x) + 3 : int(threadIdx.x)) * 10;
  out[threadIdx.x] = v == want;
}

}  // namespace selftest_kernels

// which: 0 exited lane at a shuffle, 1 threads at different barriers,
// 2/3 shared-memory neighbour exchange without / with the barrier (result:
// the wrong reads), 4 shuffle semantics (result: lanes right of 128),
// 5 an invalid launch configuration. Returns the launch's error; *result
// as described.
extern "C" int simt_selftest(int which, int* result) {
  using namespace selftest_kernels;
  cudaGetLastError();
  int buf[256] = {};
  *result = 0;
  switch (which) {
    case 0: simt::launch(exited_lane_shuffle, dim3(1), dim3(64), nullptr, buf); break;
    case 1: simt::launch(split_barrier, dim3(1), dim3(64), nullptr, buf); break;
    case 2: simt::launch(neighbour<false>, dim3(4), dim3(256), nullptr, result); break;
    case 3: simt::launch(neighbour<true>, dim3(4), dim3(256), nullptr, result); break;
    case 4:
      simt::launch(shuffles, dim3(1), dim3(128), nullptr, buf);
      for (int i = 0; i < 128; ++i) *result += buf[i];
      break;
    case 5: simt::launch(shuffles, dim3(1), dim3(2048), nullptr, buf); break;
  }
  return int(cudaGetLastError());
}
