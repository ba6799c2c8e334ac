// The ops' arguments as C++ structs, read by name from the dispatcher's
// stack. The schemas in ops.cpp are the one definition of each op's
// signature; every C++ entry point (the device kernels in glue.h, the
// autograd kernel in autograd.cpp) is a boxed kernel that reads its
// arguments here. Adding an argument: the schema, a field below and its
// line in read() (an activation parameter: ActivationArgs).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

namespace fusedbn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Stack = torch::jit::Stack;

// An op's arguments as they lie on the stack, looked up by schema name.
class ArgList {
 public:
  // Takes the op's arguments off the top of the stack.
  ArgList(const c10::OperatorHandle& op, Stack& stack);
  const c10::IValue& operator[](const char* name) const;
  // The arguments back onto a stack, to call the op (or another with the
  // same arguments) boxed.
  void push_to(Stack& stack) const;
  // Every tensor argument on `device`, checked before a device guard is
  // made (a CPU input with a CUDA weight reaches the CUDA kernel), each
  // named in the error.
  void check_devices(const Tensor& input) const;

 private:
  const c10::FunctionSchema* schema_;
  std::vector<c10::IValue> values_;
};

// The activation's arguments, the same in every op (ops.cpp): its name,
// its parameters and the order. kNames lists them for code that passes them
// on by name (autograd.cpp).
struct ActivationArgs {
  std::string activation;
  double negative_slope = 0.01, alpha = 1.0, min_val = -1.0, max_val = 1.0;
  std::string approximate = "none";
  std::string order = "bn_act";

  static constexpr const char* kNames[] = {"activation", "negative_slope", "alpha", "min_val",
                                           "max_val", "approximate", "order"};
  static ActivationArgs read(const ArgList& a);
};

// fusedbn::forward and fusedbn::forward_ (ops.cpp).
struct ForwardArgs {
  Tensor input;
  OptTensor residual, weight, bias, running_mean, running_var, num_batches_tracked;
  bool training = false;
  std::optional<double> momentum;
  double eps = 1e-5;
  ActivationArgs act;
  OptTensor activity;
  double activity_momentum = 0.1;

  static ForwardArgs read(const ArgList& a);
};

// fusedbn::backward (ops.cpp).
struct BackwardArgs {
  Tensor grad_out, input;
  OptTensor residual, weight, bias;
  Tensor save_mean, save_invstd;
  bool training = false;
  ActivationArgs act;
  std::array<bool, 4> output_mask = {false, false, false, false};
  bool from_output = false;
  OptTensor kept_input, kept_channels;

  static BackwardArgs read(const ArgList& a);
};

// Pushes a result: a tuple's elements in order (what a boxed kernel returns).
template <typename... T>
void push_results(Stack& stack, const std::tuple<T...>& r) {
  std::apply([&](const auto&... v) { (stack.emplace_back(v), ...); }, r);
}

}  // namespace fusedbn
