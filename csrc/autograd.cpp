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
    const OptTensor&, const OptTensor&, bool, std::optional<double>, double, c10::string_view,
    double, double, c10::string_view, const OptTensor&, double);
using BackwardSig = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const Tensor&, const Tensor&, bool, c10::string_view, double, double, std::array<bool, 4>,
    bool, c10::string_view);

const c10::TypedOperatorHandle<ForwardSig>& forward_op(bool inplace) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedbn::forward", "")
                       .typed<ForwardSig>();
  static auto op_ = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fusedbn::forward_", "")
                        .typed<ForwardSig>();
  return inplace ? op_ : op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedbn::backward", "")
                       .typed<BackwardSig>();
  return op;
}

Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Inplace: the output overwrites the input and is what the backward keeps
// (from_output), unless a weight is exactly 0 -- the affine transform cannot
// be inverted there -- in which case a copy of the input is kept instead.
template <bool Inplace>
class FusedBatchNormAct : public torch::autograd::Function<FusedBatchNormAct<Inplace>> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const OptTensor& residual, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& nbt, bool training,
                               std::optional<double> momentum, double eps,
                               c10::string_view activation, double negative_slope, double alpha,
                               c10::string_view order, const OptTensor& activity,
                               double activity_momentum) {
    bool from_output = Inplace;
    Tensor input_copy;
    if (Inplace && weight.has_value() && weight->defined() && weight->eq(0).any().item<bool>()) {
      from_output = false;
      input_copy = input.clone();
    }
    Tensor out, mean, invstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, mean, invstd) =
          forward_op(Inplace).call(input, residual, weight, bias, running_mean, running_var, nbt,
                                   training, momentum, eps, activation, negative_slope, alpha,
                                   order, activity, activity_momentum);
    }
    if (Inplace) ctx->mark_dirty({input});
    // One full-size tensor is kept (two with a residual): the input, or in
    // place the output. The backward recomputes the pre-activation, and so
    // the activation's derivative, from it.
    const Tensor& keep = !Inplace ? input : from_output ? out : input_copy;
    ctx->save_for_backward(
        {keep, or_undefined(residual), or_undefined(weight), or_undefined(bias), mean, invstd});
    ctx->saved_data["from_output"] = from_output;
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["order"] = std::string(order);
    ctx->mark_non_differentiable({mean, invstd});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts only the tensor arguments that were given
    // (an absent optional is no input of the graph node), in argument order.
    int edge = 0;
    auto needs = [&](bool given) { return given && ctx->needs_input_grad(edge++); };
    const bool gi_wanted = needs(true);
    const bool gz_wanted = needs(saved[1].defined());
    const bool gw_wanted = needs(saved[2].defined());
    const bool gb_wanted = needs(saved[3].defined());
    const std::array<bool, 4> mask = {gi_wanted, gw_wanted, gb_wanted, gz_wanted};
    auto [gi, gw, gb, gz] = backward_op().call(
        grads[0], saved[0], or_none(saved[1]), or_none(saved[2]), or_none(saved[3]), saved[4],
        saved[5],
        ctx->saved_data["training"].toBool(), ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["negative_slope"].toDouble(), ctx->saved_data["alpha"].toDouble(), mask,
        ctx->saved_data["from_output"].toBool(), ctx->saved_data["order"].toStringRef());
    variable_list result(16);  // one per argument of forward
    result[0] = or_undefined(gi);
    result[1] = or_undefined(gz);
    result[2] = or_undefined(gw);
    result[3] = or_undefined(gb);
    return result;
  }
};

template <bool Inplace>
std::tuple<Tensor, Tensor, Tensor> forward_autograd(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& nbt,
    bool training, std::optional<double> momentum, double eps, c10::string_view activation,
    double negative_slope, double alpha, c10::string_view order, const OptTensor& activity,
    double activity_momentum) {
  auto out = FusedBatchNormAct<Inplace>::apply(input, residual, weight, bias, running_mean,
                                               running_var, nbt, training, momentum, eps,
                                               activation, negative_slope, alpha, order, activity,
                                               activity_momentum);
  // What ADInplaceOrView would do for the buffers mutated below autograd.
  if (training) {
    for (const OptTensor* t : {&running_mean, &running_var, &nbt})
      if (t->has_value() && (*t)->defined()) torch::autograd::impl::bump_version(**t);
  }
  if (activity.has_value() && activity->defined()) torch::autograd::impl::bump_version(*activity);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace fusedbn

TORCH_LIBRARY_IMPL(fusedbn, Autograd, m) {
  m.impl("forward", &fusedbn::forward_autograd<false>);
  m.impl("forward_", &fusedbn::forward_autograd<true>);
}
