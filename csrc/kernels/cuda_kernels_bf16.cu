// The CUDA kernels and their launches for __nv_bfloat16 (cuda_launch.cuh).
#include "cuda_launch.cuh"

namespace fusedbn {
namespace cuda {
FUSEDBN_CUDA_TYPED(, __nv_bfloat16)
}  // namespace cuda
}  // namespace fusedbn
