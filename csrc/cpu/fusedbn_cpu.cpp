// CPU registration: the shared glue with the CPU kernels plugged in.
#include <torch/library.h>

#include "../glue.h"
#include "../kernels/cpu_dispatch.h"

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  using namespace fusedbn;
  m.impl("forward", &forward_op<NoGuard, &cpu::forward>);
  m.impl("forward_", &forward_inplace_op<NoGuard, &cpu::forward, true>);
  m.impl("backward", &backward_op<NoGuard, &cpu::backward>);
}
