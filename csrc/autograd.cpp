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

#include "args.h"

namespace fusedbn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Op { Forward, ForwardInplace, Backward };
const c10::OperatorHandle& find_op(Op which) {
  static const c10::OperatorHandle ops[] = {
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedbn::forward", ""),
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedbn::forward_", ""),
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedbn::backward", "")};
  return ops[int(which)];
}

// A call's stack built by argument name, in the schema's order; arguments
// not named take their schema default.
Stack named_stack(const c10::OperatorHandle& op,
                  const std::vector<std::pair<std::string, c10::IValue>>& named) {
  Stack stack;
  for (const c10::Argument& arg : op.schema().arguments()) {
    auto it = std::find_if(named.begin(), named.end(),
                           [&](const auto& kv) { return arg.name() == kv.first; });
    if (it != named.end()) {
      stack.push_back(it->second);
    } else {
      TORCH_INTERNAL_ASSERT(arg.default_value().has_value(), "fusedbn: ", arg.name(),
                            " of ", op.schema().name(), " has no default");
      stack.push_back(*arg.default_value());
    }
  }
  return stack;
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
  // input, residual, weight, bias: the differentiable arguments, passed
  // apart so that autograd sees them; args: every argument as on the stack.
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptTensor& residual,
                        const OptTensor& weight, const OptTensor& bias, const ArgList* args,
                        const ForwardArgs* a, SideResults* side) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      Stack stack;
      args->push_to(stack);
      find_op(Inplace ? Op::ForwardInplace : Op::Forward).callBoxed(stack);
      out = stack[0].toTensor();
      side->mean = stack[1].toTensor();
      side->invstd = stack[2].toTensor();
      if constexpr (Inplace) {
        side->kept_input = stack[3].toTensor();
        side->kept_channels = stack[4].toTensor();
      }
    }
    if (Inplace) ctx->mark_dirty({input});
    // One full-size tensor is kept (two with a residual): the input, or in
    // place the output. The backward recomputes the pre-activation, and so
    // the activation's derivative, from it.
    ctx->save_for_backward({Inplace ? out : input, or_undefined(residual), or_undefined(weight),
                            or_undefined(bias), side->mean, side->invstd, side->kept_input,
                            side->kept_channels});
    ctx->saved_data["training"] = a->training;
    for (const char* name : ActivationArgs::kNames) ctx->saved_data[name] = (*args)[name];
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
    const auto& d = ctx->saved_data;
    const c10::OperatorHandle& op = find_op(Op::Backward);
    std::vector<std::pair<std::string, c10::IValue>> named = {
        {"grad_out", grads[0]},
        {"input", saved[0]},
        {"residual", or_none(saved[1])},
        {"weight", or_none(saved[2])},
        {"bias", or_none(saved[3])},
        {"save_mean", saved[4]},
        {"save_invstd", saved[5]},
        {"training", d.at("training")},
        {"output_mask", c10::List<bool>({gi_wanted, gw_wanted, gb_wanted, gz_wanted})},
        {"from_output", Inplace},
        {"kept_input", or_none(saved[6])},
        {"kept_channels", or_none(saved[7])}};
    for (const char* name : ActivationArgs::kNames) named.emplace_back(name, d.at(name));
    Stack stack = named_stack(op, named);
    if (at::GradMode::is_enabled()) {
      // create_graph: the backward op's own autograd (ops.py) records it.
      op.callBoxed(stack);
    } else {
      // Nothing to record: called below autograd, past the Python autograd
      // kernel torch.library installed for the op (tens of us a call).
      at::AutoDispatchBelowADInplaceOrView guard;
      op.callBoxed(stack);
    }
    // One gradient per argument of forward (after ctx), the first four
    // differentiable; the op returns (input, weight, bias, residual).
    variable_list result(kForwardArgs);
    result[0] = stack[0].isNone() ? Tensor() : stack[0].toTensor();
    result[1] = stack[3].isNone() ? Tensor() : stack[3].toTensor();
    result[2] = stack[1].isNone() ? Tensor() : stack[1].toTensor();
    result[3] = stack[2].isNone() ? Tensor() : stack[2].toTensor();
    return result;
  }

  static constexpr size_t kForwardArgs =
      c10::guts::infer_function_traits_t<decltype(&FusedBatchNormAct::forward)>::number_of_parameters - 1;
};

// PyTorch's checks of an in-place write into the input (a leaf that requires
// grad, a view autograd cannot rebase), made before anything is written: an
// error raised by autograd after the Function ran would come after the
// running statistics were updated.
void check_inplace_input(const ForwardArgs& a) {
  bool requires_grad = false;
  for (const OptTensor& t : {OptTensor(a.input), a.residual, a.weight, a.bias})
    requires_grad = requires_grad || (t.has_value() && t->defined() && t->requires_grad());
  torch::autograd::check_inplace(a.input, requires_grad);
}

// What ADInplaceOrView would do for the arguments mutated below autograd.
void bump_versions(const ForwardArgs& a, bool inplace) {
  auto bump = [](const OptTensor& t) {
    if (t.has_value() && t->defined()) torch::autograd::impl::bump_version(*t);
  };
  if (a.training) {
    bump(a.running_mean);
    bump(a.running_var);
    bump(a.num_batches_tracked);
  }
  bump(a.activity);
  if (inplace) bump(a.input);
}

// Whether the call records nothing for autograd: grad mode off (eval under
// no_grad) or no differentiable argument requiring a gradient. Such a call
// skips the autograd Function, whose node and saved state cost more than a
// small layer's kernel. (A forward-mode tangent takes the Function, which
// refuses it.)
bool records_nothing(const ForwardArgs& a) {
  const bool grad_mode = at::GradMode::is_enabled();
  const OptTensor in(a.input);
  for (const OptTensor* t : {&in, &a.residual, &a.weight, &a.bias}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    if ((grad_mode && (*t)->requires_grad()) || (*t)->_fw_grad(/*level=*/0).defined())
      return false;
  }
  return true;
}

template <bool Inplace>
void forward_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks, Stack* stack) {
  const ArgList args(op, *stack);
  const ForwardArgs a = ForwardArgs::read(args);
  if (Inplace) check_inplace_input(a);
  if (records_nothing(a)) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      args.push_to(*stack);
      op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
    }
    bump_versions(a, Inplace);
    return;
  }
  SideResults side;
  Tensor out = FusedBatchNormAct<Inplace>::apply(a.input, a.residual, a.weight, a.bias, &args, &a,
                                                 &side);
  bump_versions(a, /*inplace=*/false);  // (mark_dirty bumped the input's)
  if constexpr (Inplace) {
    push_results(*stack, std::make_tuple(out, side.mean, side.invstd, side.kept_input,
                                         side.kept_channels));
  } else {
    push_results(*stack, std::make_tuple(out, side.mean, side.invstd));
  }
}

}  // namespace
}  // namespace fusedbn

TORCH_LIBRARY_IMPL(fusedbn, Autograd, m) {
  m.impl("forward", torch::CppFunction::makeFromBoxedFunction<&fusedbn::forward_autograd<false>>());
  m.impl("forward_", torch::CppFunction::makeFromBoxedFunction<&fusedbn::forward_autograd<true>>());
}
