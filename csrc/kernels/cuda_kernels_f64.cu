// The CUDA kernels and their launches for double (cuda_launch.cuh).
#include "cuda_launch.cuh"

namespace fusedbn {
namespace cuda {
FUSEDBN_CUDA_TYPED(, double)
}  // namespace cuda
}  // namespace fusedbn
