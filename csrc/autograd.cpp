// Autograd for fusedbn::forward, registered for every device at once.
//
// Why C++ and not torch.library.register_autograd: that API refuses schemas
// that mutate an argument (forward updates the running statistics in place),
// and the Python autograd wrapper it installs costs ~100 us per call, more
// than the whole kernel on small layers. The backward is still the
// fusedbn::backward custom op, dispatched like any other, so torch.compile
// and opcheck see the same ops either way.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

namespace fusedbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, bool, std::optional<double>, double, c10::string_view, double, double);
using BackwardSig = std::tuple<OptTensor, OptTensor, OptTensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
    bool, c10::string_view, double, double, std::array<bool, 3>);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedbn::forward", "")
                       .typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedbn::backward", "")
                       .typed<BackwardSig>();
  return op;
}

Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class FusedBatchNormAct : public torch::autograd::Function<FusedBatchNormAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& nbt, bool training,
                               std::optional<double> momentum, double eps,
                               c10::string_view activation, double negative_slope, double alpha) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, invstd] =
        forward_op().call(input, weight, bias, running_mean, running_var, nbt, training, momentum,
                          eps, activation, negative_slope, alpha);
    // The input is the only full-size tensor kept: the backward recomputes
    // the pre-activation, and so the activation's derivative, from it.
    ctx->save_for_backward({input, or_undefined(weight), or_undefined(bias), mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["alpha"] = alpha;
    ctx->mark_non_differentiable({mean, invstd});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2)};
    auto [gi, gw, gb] = backward_op().call(
        grads[0], saved[0], or_none(saved[1]), or_none(saved[2]), saved[3], saved[4],
        ctx->saved_data["training"].toBool(), ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["negative_slope"].toDouble(), ctx->saved_data["alpha"].toDouble(), mask);
    variable_list result(12);
    result[0] = or_undefined(gi);
    result[1] = or_undefined(gw);
    result[2] = or_undefined(gb);
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> forward_autograd(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& nbt,
    bool training, std::optional<double> momentum, double eps, c10::string_view activation,
    double negative_slope, double alpha) {
  auto out = FusedBatchNormAct::apply(input, weight, bias, running_mean, running_var, nbt, training,
                                      momentum, eps, activation, negative_slope, alpha);
  // What ADInplaceOrView would do for the buffers mutated below autograd.
  if (training) {
    for (const OptTensor* t : {&running_mean, &running_var, &nbt})
      if (t->has_value() && (*t)->defined()) torch::autograd::impl::bump_version(**t);
  }
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace fusedbn

TORCH_LIBRARY_IMPL(fusedbn, Autograd, m) { m.impl("forward", &fusedbn::forward_autograd); }
