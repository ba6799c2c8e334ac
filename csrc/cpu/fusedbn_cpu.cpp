// CPU registration: the shared glue with the CPU kernels plugged in.
#include <torch/library.h>

#include "../glue.h"
#include "../kernels/cpu_dispatch.h"

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  fusedbn::register_kernels<fusedbn::NoGuard, &fusedbn::cpu::forward, &fusedbn::cpu::backward>(m);
}
