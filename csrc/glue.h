// ATen glue shared by the CPU and CUDA implementations: argument checks,
// layout detection, allocation and the filling of the kernels' params
// structs. Each backend passes in the function that runs its kernels.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "kernels/params.h"

namespace fusedbn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using ForwardKernel = void (*)(const ForwardParams&, bool training);
using BackwardKernel = void (*)(const BackwardParams&);

std::tuple<Tensor, Tensor, Tensor> forward_impl(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, bool training, std::optional<double> momentum,
    double eps, const std::string& activation, double negative_slope, double alpha,
    ForwardKernel kernel);

std::tuple<OptTensor, OptTensor, OptTensor> backward_impl(
    const Tensor& grad_out, const Tensor& input, const OptTensor& weight,
    const OptTensor& bias, const Tensor& save_mean, const Tensor& save_invstd, bool training,
    const std::string& activation, double negative_slope, double alpha,
    std::array<bool, 3> output_mask, BackwardKernel kernel);

}  // namespace fusedbn
