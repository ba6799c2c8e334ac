// CUDA registration: the shared glue with the CUDA kernels plugged in, run on
// the input's device and the current stream.
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../glue.h"
#include "../kernels/cuda_dispatch.h"

namespace fusedbn {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fusedbn: CUDA ", op, " kernel launch failed: ",
              cudaGetErrorString(err));
}

// Scratch for the kernels' per-block partials from the caching allocator: it
// is freed when this returns, which is safe because the allocator reuses it
// only in the current stream's order, after these kernels.
Tensor workspace(size_t bytes) {
  if (bytes == 0) return Tensor();
  return at::empty({int64_t(bytes)}, at::TensorOptions()
                                         .dtype(at::kByte)
                                         .device(at::kCUDA, c10::cuda::current_device()));
}

void run_forward(const ForwardParams& p, bool training) {
  const Tensor ws = workspace(cuda::forward_workspace_bytes(p, training));
  check_launch(cuda::forward(p, training, ws.defined() ? ws.data_ptr() : nullptr,
                             c10::cuda::getCurrentCUDAStream()),
               "forward");
}

void run_backward(const BackwardParams& p) {
  const Tensor ws = workspace(cuda::backward_workspace_bytes(p));
  check_launch(cuda::backward(p, ws.defined() ? ws.data_ptr() : nullptr,
                              c10::cuda::getCurrentCUDAStream()),
               "backward");
}

}  // namespace
}  // namespace fusedbn

TORCH_LIBRARY_IMPL(fusedbn, CUDA, m) {
  using namespace fusedbn;
  register_kernels<c10::cuda::CUDAGuard, &run_forward, &run_backward>(m);
}
