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
#include <c10/util/TypeTraits.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>

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
using ForwardInplaceSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, bool, std::optional<double>, double, c10::string_view,
    double, double, c10::string_view, const OptTensor&, double);
using BackwardSig = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const Tensor&, const Tensor&, bool, c10::string_view, double, double, std::array<bool, 4>,
    bool, c10::string_view, const OptTensor&, const OptTensor&);

template <typename Sig>
const c10::TypedOperatorHandle<Sig>& find_op(const char* name) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return op;
}

Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The op's results besides the output. They are not differentiable, so the
// autograd Function below returns the output alone and hands these over on
// the side: a Function that modifies a view of another tensor in place must
// return exactly one tensor, for autograd to rebase the view's history.
struct SideResults {
  Tensor mean, invstd, kept_input, kept_channels;
};

// In place (Inplace), the output overwrites the input and is what the
// backward keeps (from_output), with the inputs of the few channels that
// cannot be recovered from it (glue.cpp: kept_channels).
template <bool Inplace>
class FusedBatchNormAct : public torch::autograd::Function<FusedBatchNormAct<Inplace>> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptTensor& residual,
                        const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& running_mean, const OptTensor& running_var,
                        const OptTensor& nbt, bool training, std::optional<double> momentum,
                        double eps, c10::string_view activation, double negative_slope,
                        double alpha, c10::string_view order, const OptTensor& activity,
                        double activity_momentum, SideResults* side) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if constexpr (Inplace) {
        std::tie(out, side->mean, side->invstd, side->kept_input, side->kept_channels) =
            find_op<ForwardInplaceSig>("fusedbn::forward_").call(
                input, residual, weight, bias, running_mean, running_var, nbt, training,
                momentum, eps, activation, negative_slope, alpha, order, activity,
                activity_momentum);
      } else {
        std::tie(out, side->mean, side->invstd) = find_op<ForwardSig>("fusedbn::forward").call(
            input, residual, weight, bias, running_mean, running_var, nbt, training, momentum,
            eps, activation, negative_slope, alpha, order, activity, activity_momentum);
      }
    }
    if (Inplace) ctx->mark_dirty({input});
    // One full-size tensor is kept (two with a residual): the input, or in
    // place the output. The backward recomputes the pre-activation, and so
    // the activation's derivative, from it.
    ctx->save_for_backward({Inplace ? out : input, or_undefined(residual), or_undefined(weight),
                            or_undefined(bias), side->mean, side->invstd, side->kept_input,
                            side->kept_channels});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["order"] = std::string(order);
    return out;
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
    auto [gi, gw, gb, gz] = find_op<BackwardSig>("fusedbn::backward").call(
        grads[0], saved[0], or_none(saved[1]), or_none(saved[2]), or_none(saved[3]), saved[4],
        saved[5], ctx->saved_data["training"].toBool(),
        ctx->saved_data["activation"].toStringRef(), ctx->saved_data["negative_slope"].toDouble(),
        ctx->saved_data["alpha"].toDouble(), mask, Inplace,
        ctx->saved_data["order"].toStringRef(), or_none(saved[6]), or_none(saved[7]));
    // One gradient per argument of forward (after ctx), the first four differentiable.
    variable_list result(kForwardArgs);
    result[0] = or_undefined(gi);
    result[1] = or_undefined(gz);
    result[2] = or_undefined(gw);
    result[3] = or_undefined(gb);
    return result;
  }

  static constexpr size_t kForwardArgs =
      c10::guts::infer_function_traits_t<decltype(&FusedBatchNormAct::forward)>::number_of_parameters - 1;
};

// PyTorch's checks of an in-place write into the input (a leaf that requires
// grad, a view autograd cannot rebase), made before anything is written: an
// error raised by autograd after the Function ran would come after the
// running statistics were updated.
void check_inplace_input(const Tensor& input, const OptTensor& residual, const OptTensor& weight,
                         const OptTensor& bias) {
  bool requires_grad = false;
  for (const OptTensor& t : {OptTensor(input), residual, weight, bias})
    requires_grad = requires_grad || (t.has_value() && t->defined() && t->requires_grad());
  torch::autograd::check_inplace(input, requires_grad);
}

template <bool Inplace, typename Result>
Result forward_autograd(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& nbt,
    bool training, std::optional<double> momentum, double eps, c10::string_view activation,
    double negative_slope, double alpha, c10::string_view order, const OptTensor& activity,
    double activity_momentum) {
  if (Inplace) check_inplace_input(input, residual, weight, bias);
  SideResults side;
  Tensor out = FusedBatchNormAct<Inplace>::apply(input, residual, weight, bias, running_mean,
                                                 running_var, nbt, training, momentum, eps,
                                                 activation, negative_slope, alpha, order,
                                                 activity, activity_momentum, &side);
  // What ADInplaceOrView would do for the buffers mutated below autograd.
  if (training) {
    for (const OptTensor* t : {&running_mean, &running_var, &nbt})
      if (t->has_value() && (*t)->defined()) torch::autograd::impl::bump_version(**t);
  }
  if (activity.has_value() && activity->defined()) torch::autograd::impl::bump_version(*activity);
  if constexpr (Inplace) {
    return {out, side.mean, side.invstd, side.kept_input, side.kept_channels};
  } else {
    return {out, side.mean, side.invstd};
  }
}

}  // namespace
}  // namespace fusedbn

TORCH_LIBRARY_IMPL(fusedbn, Autograd, m) {
  using at::Tensor;
  m.impl("forward", &fusedbn::forward_autograd<false, std::tuple<Tensor, Tensor, Tensor>>);
  m.impl("forward_",
         &fusedbn::forward_autograd<true, std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>>);
}
