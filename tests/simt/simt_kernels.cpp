// SIMT emulation layer: the unchanged host side and kernels of the CUDA
// backend (csrc/kernels/cuda_kernels.cu, .cuh) compiled as host code against
// the stand-in CUDA headers of this folder, behind a small C interface that
// tests/simt/simt_binding.cpp loads with dlopen (a mutated build of the
// kernels is just another library). Torch-free.
#include <cstring>
#include <string>

#include "cuda_runtime.h"
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

// Settings: sm_count, force_wide, order, seed, drop_sync_line, mutant, log.
int simt_set(const char* key, long long v) {
  const std::string k = key;
  if (k == "sm_count") simt::sm_count = int(v);
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
