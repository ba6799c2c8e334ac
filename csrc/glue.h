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

#include <torch/library.h>

#include "args.h"
#include "kernels/params.h"

namespace fusedbn {

using ForwardKernel = void (*)(const ForwardParams&, bool training);
using BackwardKernel = void (*)(const BackwardParams&);

// (output, save_mean, save_invstd, kept_input, kept_channels); the last two
// are defined in place only (see forward_ in ops.cpp).
using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Whether in-place mode takes this activation (kernels/activations.h:
// is_invertible); ValueError (c10::ValueError) for an unknown name.
bool is_invertible(const std::string& activation, double negative_slope, double alpha);

// How the kernels take a tensor of these sizes and strides (rank >= 2):
// "NCS" (contiguous), "NSC" (channels-last) or "copy" (a contiguous copy).
const char* kernel_layout(at::IntArrayRef sizes, at::IntArrayRef strides);

ForwardResult forward_impl(const ForwardArgs& a, bool inplace, ForwardKernel kernel);

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> backward_impl(const BackwardArgs& a,
                                                                     BackwardKernel kernel);

// The operator entry points with a device's kernels plugged in, as boxed
// kernels reading their arguments by name (args.h); each backend registers
// these (see csrc/cpu, csrc/cuda). Every tensor is checked to be on the
// input's device before Guard is made from it (a CUDA device guard; a no-op
// on CPU): a CPU input with a CUDA weight is dispatched to the CUDA kernels.
struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

// forward (Inplace = false: output, save_mean, save_invstd) and forward_
// (Inplace: also kept_input, kept_channels).
template <typename Guard, ForwardKernel K, bool Inplace>
void forward_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet, Stack* stack) {
  const ArgList args(op, *stack);
  const ForwardArgs a = ForwardArgs::read(args);
  args.check_devices(a.input);
  const Guard guard(a.input.device());
  const ForwardResult r = forward_impl(a, Inplace, K);
  if constexpr (Inplace) push_results(*stack, r);
  else push_results(*stack, std::make_tuple(std::get<0>(r), std::get<1>(r), std::get<2>(r)));
}

template <typename Guard, BackwardKernel K>
void backward_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet, Stack* stack) {
  const ArgList args(op, *stack);
  const BackwardArgs a = BackwardArgs::read(args);
  args.check_devices(a.input);
  const Guard guard(a.input.device());
  push_results(*stack, backward_impl(a, K));
}

// The registrations of one device: Guard and its kernels.
template <typename Guard, ForwardKernel F, BackwardKernel B>
void register_kernels(torch::Library& m) {
  m.impl("forward", torch::CppFunction::makeFromBoxedFunction<&forward_boxed<Guard, F, false>>());
  m.impl("forward_", torch::CppFunction::makeFromBoxedFunction<&forward_boxed<Guard, F, true>>());
  m.impl("backward", torch::CppFunction::makeFromBoxedFunction<&backward_boxed<Guard, B>>());
}

}  // namespace fusedbn
