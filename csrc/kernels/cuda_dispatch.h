// Entry points of the CUDA kernels (torch-free). The caller sets the device,
// allocates `workspace_bytes` of device memory usable in stream order on
// `stream` (null when zero bytes), and checks the returned error: the first
// failed launch ends the call with that launch's cudaGetLastError().
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "params.h"

namespace fusedbn {
namespace cuda {

// Scratch for the per-block partials of the reductions. Depends on the
// shape, the dtype, the pointers' alignment and the current device.
size_t forward_workspace_bytes(const ForwardParams& p, bool training);
size_t backward_workspace_bytes(const BackwardParams& p);

// training: batch statistics into p.mean/p.invstd, running stats updated,
// output written. Eval: p.mean/p.invstd are read, output written. p.y may be
// p.x (in place), and p.residual may be either of them.
cudaError_t forward(const ForwardParams& p, bool training, void* workspace, cudaStream_t stream);
// Residual: p.residual (and p.grad_residual, written with dx) as in
// cpu_kernels.h. p.from_output (x holds the forward's output) needs an
// invertible activation; others give cudaErrorInvalidValue, nothing launched.
cudaError_t backward(const BackwardParams& p, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedbn
