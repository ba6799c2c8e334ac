// CPU registration: the shared glue with the CPU kernels plugged in.
#include <torch/library.h>

#include "../glue.h"
#include "../kernels/cpu_dispatch.h"

namespace fusedbn {
namespace {

std::tuple<Tensor, Tensor, Tensor> forward_cpu(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& nbt,
    bool training, std::optional<double> momentum, double eps, c10::string_view activation,
    double negative_slope, double alpha) {
  return forward_impl(input, weight, bias, running_mean, running_var, nbt, training, momentum, eps,
                      std::string(activation), negative_slope, alpha, &cpu::forward);
}

std::tuple<OptTensor, OptTensor, OptTensor> backward_cpu(
    const Tensor& grad_out, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const Tensor& save_mean, const Tensor& save_invstd, bool training, c10::string_view activation,
    double negative_slope, double alpha, std::array<bool, 3> output_mask) {
  return backward_impl(grad_out, input, weight, bias, save_mean, save_invstd, training,
                       std::string(activation), negative_slope, alpha, output_mask, &cpu::backward);
}

}  // namespace
}  // namespace fusedbn

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  m.impl("forward", &fusedbn::forward_cpu);
  m.impl("backward", &fusedbn::backward_cpu);
}
