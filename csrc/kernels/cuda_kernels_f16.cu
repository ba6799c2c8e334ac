// The CUDA kernels and their launches for __half (cuda_launch.cuh).
#include "cuda_launch.cuh"

namespace fusedbn {
namespace cuda {
FUSEDBN_CUDA_TYPED(, __half)
}  // namespace cuda
}  // namespace fusedbn
