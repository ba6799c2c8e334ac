// ATen glue shared by the CPU and CUDA implementations: argument checks,
// layout detection, allocation and the filling of the kernels' params
// structs. Each backend passes in the function that runs its kernels.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "kernels/params.h"

namespace fusedbn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using ForwardKernel = void (*)(const ForwardParams&, bool training);
using BackwardKernel = void (*)(const BackwardParams&);

// (output, save_mean, save_invstd, kept_input, kept_channels); the last two
// are defined in place only (see forward_ in ops.cpp).
using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardResult forward_impl(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, const std::string& activation, double negative_slope, double alpha,
    const std::string& order, const OptTensor& activity, double activity_momentum, bool inplace,
    ForwardKernel kernel);

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> backward_impl(
    const Tensor& grad_out, const Tensor& input, const OptTensor& residual,
    const OptTensor& weight, const OptTensor& bias, const Tensor& save_mean,
    const Tensor& save_invstd, bool training, const std::string& activation,
    double negative_slope, double alpha, std::array<bool, 4> output_mask, bool from_output,
    const std::string& order, const OptTensor& kept_input, const OptTensor& kept_channels,
    BackwardKernel kernel);

// Every tensor on the input's device: checked before the device guard is
// made from the input (a CPU input with CUDA parameters is dispatched to the
// CUDA kernels, and a CUDA guard cannot take a CPU device).
using Named = std::pair<const char*, const OptTensor*>;
void check_devices(const Tensor& input, std::initializer_list<Named> others);

// The operator entry points with a device's kernels plugged in; each
// backend registers these (see csrc/cpu, csrc/cuda). Guard is constructed from
// the input's device first (a CUDA device guard; a no-op on CPU).
struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

// forward (Inplace = false; kept_input, kept_channels undefined) and forward_.
template <typename Guard, ForwardKernel K, bool Inplace>
ForwardResult forward_inplace_op(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& nbt,
    bool training, std::optional<double> momentum, double eps, c10::string_view activation,
    double negative_slope, double alpha, c10::string_view order, const OptTensor& activity,
    double activity_momentum) {
  check_devices(input, {{"residual", &residual}, {"weight", &weight}, {"bias", &bias},
                        {"running_mean", &running_mean}, {"running_var", &running_var},
                        {"num_batches_tracked", &nbt}, {"activity", &activity}});
  const Guard guard(input.device());
  return forward_impl(input, residual, weight, bias, running_mean, running_var, nbt, training,
                      momentum, eps, std::string(activation), negative_slope, alpha,
                      std::string(order), activity, activity_momentum, Inplace, K);
}

template <typename Guard, ForwardKernel K>
std::tuple<Tensor, Tensor, Tensor> forward_op(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& nbt,
    bool training, std::optional<double> momentum, double eps, c10::string_view activation,
    double negative_slope, double alpha, c10::string_view order, const OptTensor& activity,
    double activity_momentum) {
  auto r = forward_inplace_op<Guard, K, false>(input, residual, weight, bias, running_mean,
                                               running_var, nbt, training, momentum, eps,
                                               activation, negative_slope, alpha, order, activity,
                                               activity_momentum);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

template <typename Guard, BackwardKernel K>
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> backward_op(
    const Tensor& grad_out, const Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const Tensor& save_mean, const Tensor& save_invstd, bool training,
    c10::string_view activation, double negative_slope, double alpha,
    std::array<bool, 4> output_mask, bool from_output, c10::string_view order,
    const OptTensor& kept_input, const OptTensor& kept_channels) {
  const OptTensor g(grad_out), m(save_mean), v(save_invstd);
  check_devices(input, {{"grad_out", &g}, {"residual", &residual}, {"weight", &weight},
                        {"bias", &bias}, {"save_mean", &m}, {"save_invstd", &v},
                        {"kept_input", &kept_input}, {"kept_channels", &kept_channels}});
  const Guard guard(input.device());
  return backward_impl(grad_out, input, residual, weight, bias, save_mean, save_invstd, training,
                       std::string(activation), negative_slope, alpha, output_mask, from_output,
                       std::string(order), kept_input, kept_channels, K);
}

}  // namespace fusedbn
