// Entry points of the CUDA kernels (cuda_dispatch.h): the checks every
// dtype shares, then the dtype's instantiation (cuda_launch.cuh, compiled in
// cuda_kernels_<dtype>.cu).
#include "cuda_launch.cuh"

namespace fusedbn {
namespace cuda {

FUSEDBN_CUDA_TYPED(extern, float)
FUSEDBN_CUDA_TYPED(extern, double)
FUSEDBN_CUDA_TYPED(extern, __half)
FUSEDBN_CUDA_TYPED(extern, __nv_bfloat16)

size_t forward_workspace_bytes(const ForwardParams& p, bool training) {
  if (empty(p.shape) || !grid_fits(p.shape)) return 0;
  size_t bytes = 0;
  dispatch_dtype(p.dtype, [&](auto tag) {
    bytes = typed::forward_workspace_bytes<decltype(tag)>(p, training);
    return cudaSuccess;
  });
  return bytes;
}

size_t backward_workspace_bytes(const BackwardParams& p) {
  if (empty(p.shape) || !grid_fits(p.shape)) return 0;
  size_t bytes = 0;
  dispatch_dtype(p.dtype, [&](auto tag) {
    bytes = typed::backward_workspace_bytes<decltype(tag)>(p);
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t forward(const ForwardParams& p, bool training, void* workspace, cudaStream_t stream) {
  // An empty batch has no statistics to compute and no output to write; the
  // glue leaves the running statistics alone in that case.
  if (empty(p.shape)) return cudaSuccess;
  if (!grid_fits(p.shape)) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return typed::forward<decltype(tag)>(p, training, workspace, stream);
  });
}

cudaError_t backward(const BackwardParams& p, void* workspace, cudaStream_t stream) {
  const Shape& s = p.shape;
  if (s.C == 0) return cudaSuccess;
  if (!grid_fits(s)) return cudaErrorInvalidConfiguration;
  if (empty(s)) {
    // No values: the sums are zero (as on the CPU), dx is empty.
    const size_t bytes = size_t(s.C) * (p.dtype == DType::Float64 ? sizeof(double) : sizeof(float));
    cudaError_t err = cudaMemsetAsync(p.grad_weight, 0, bytes, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(p.grad_bias, 0, bytes, stream);
    return err;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return typed::backward<decltype(tag)>(p, workspace, stream);
  });
}

}  // namespace cuda
}  // namespace fusedbn
