// The CUDA kernels and their launches for float (cuda_launch.cuh).
#include "cuda_launch.cuh"

namespace fusedbn {
namespace cuda {
FUSEDBN_CUDA_TYPED(, float)
}  // namespace cuda
}  // namespace fusedbn
