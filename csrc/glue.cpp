#include "glue.h"
#include "kernels/activations.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cmath>
#include <limits>
#include <sstream>

namespace fusedbn {
namespace {

DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK(false, "fusedbn: unsupported dtype ", s);
  }
}

at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

ActParams parse_activation(const ActivationArgs& args) {
  const std::string& name = args.activation;
  const std::string& order = args.order;
  ActParams a;
  TORCH_CHECK_VALUE(order == "bn_act" || order == "act_bn", "fusedbn: unknown order '", order,
                    "'; expected 'bn_act' (act(bn(x))) or 'act_bn' (bn(act(x)))");
  a.negative_slope = args.negative_slope;
  a.alpha = args.alpha;
  a.min_val = args.min_val;
  a.max_val = args.max_val;
  if (name == "identity") a.kind = Activation::Identity;
  else if (name == "relu") a.kind = Activation::ReLU;
  else if (name == "leaky_relu") a.kind = Activation::LeakyReLU;
  else if (name == "elu") a.kind = Activation::ELU;
  else if (name == "hardtanh") a.kind = Activation::Hardtanh;
  else if (name == "relu6") {
    a.kind = Activation::Hardtanh;
    a.min_val = 0.0;
    a.max_val = 6.0;
  } else if (name == "silu") a.kind = Activation::SiLU;
  else if (name == "hardswish") a.kind = Activation::Hardswish;
  else if (name == "hardsigmoid") a.kind = Activation::Hardsigmoid;
  else if (name == "gelu") {
    TORCH_CHECK_VALUE(args.approximate == "none" || args.approximate == "tanh",
                      "fusedbn: gelu's approximate must be 'none' or 'tanh', got '",
                      args.approximate, "'");
    a.kind = args.approximate == "tanh" ? Activation::GELUTanh : Activation::GELU;
  } else if (name == "mish") a.kind = Activation::Mish;
  else
    TORCH_CHECK_VALUE(false, "fusedbn: unknown activation '", name,
                      "'; expected one of 'identity', 'relu', 'leaky_relu', 'elu', 'relu6', "
                      "'hardtanh', 'silu', 'hardswish', 'hardsigmoid', 'gelu', 'mish'");
  if (a.kind == Activation::Hardtanh)
    TORCH_CHECK_VALUE(std::isfinite(a.min_val) && std::isfinite(a.max_val) &&
                          a.min_val <= a.max_val,
                      "fusedbn: hardtanh needs finite min_val <= max_val, got min_val=",
                      a.min_val, ", max_val=", a.max_val);
  // (With the identity both orders compute the same; they differ in what
  // activity tracking counts: bn(x) > 0 or x > 0.)
  if (order == "act_bn") a.order = Order::ActBn;
  return a;
}

// In-place mode recovers the pre-activation from the output, so the
// activation must be one-to-one.
void check_invertible(const ActParams& a) {
  TORCH_CHECK_VALUE(is_invertible(a),
                    "fusedbn: inplace=True needs an invertible activation: 'identity', "
                    "'leaky_relu' with negative_slope > 0 or 'elu' with alpha > 0. In-place mode "
                    "keeps only the output and recovers the input from it in the backward; ReLU "
                    "(or a non-positive slope/alpha), and relu6, hardtanh, silu, hardswish, "
                    "hardsigmoid, gelu and mish, map several inputs to the same output, so the "
                    "input cannot be recovered. Use inplace=False, or leaky_relu.");
}

std::string size_str(const Tensor& t) {
  std::ostringstream os;
  os << "torch.Size([";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "])";
  return os.str();
}

void check_input(const Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() >= 2 && input.dim() <= 5,
                    "fusedbn: expected input of shape (N, C), (N, C, L), (N, C, H, W) or "
                    "(N, C, D, H, W), got a ", input.dim(), "D input of shape ", size_str(input));
  const auto s = input.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
                   "fusedbn: input must be float32, float64, bfloat16 or float16, got ", s);
}

// weight, bias, running_mean, running_var: C elements, float32 or the input's
// dtype, on the input's device.
void check_per_channel(const OptTensor& t, const char* name, const Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t C = input.size(1);
  TORCH_CHECK(t->device() == input.device(), "fusedbn: ", name, " is on ", t->device(),
              " but input is on ", input.device(), "; all tensors must be on the same device");
  const auto s = t->scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == input.scalar_type(), "fusedbn: ", name,
                   " must be float32 or the input's dtype (", input.scalar_type(), "), got ", s);
  // RuntimeError, as PyTorch raises for the same mistake.
  TORCH_CHECK(t->dim() == 1 && t->numel() == C, "fusedbn: ", name, " must have shape [", C,
                    "] to match the input's channel dimension (input shape ", size_str(input),
                    "), got shape ", size_str(*t));
}

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

// What order="act_bn" cannot be combined with.
void check_mode(const ActParams& act, const OptTensor& residual, bool inplace) {
  if (act.order == Order::ActBn) {
    TORCH_CHECK_VALUE(!defined(residual),
                      "fusedbn: order='act_bn' (bn(act(x))) takes no residual; the residual form "
                      "is act(bn(x) + residual)");
    TORCH_CHECK_VALUE(!inplace, "fusedbn: inplace=True is not supported with order='act_bn'");
  }
}

void check_activity(const OptTensor& activity, const Tensor& input, double momentum) {
  if (!defined(activity)) return;
  const int64_t C = input.size(1);
  TORCH_CHECK(activity->device() == input.device(), "fusedbn: activity is on ",
              activity->device(), " but input is on ", input.device());
  // Any floating dtype (module.to(dtype) converts buffers); kept in float32 best.
  TORCH_CHECK_TYPE(at::isFloatingType(activity->scalar_type()),
                   "fusedbn: activity must be a floating-point tensor, got ",
                   activity->scalar_type());
  TORCH_CHECK_VALUE((activity->dim() == 1 && activity->size(0) == C) ||
                        (activity->dim() == 2 && activity->size(0) == 3 && activity->size(1) == C),
                    "fusedbn: activity must have shape [", C, "] or [3, ", C,
                    "] (per channel: fraction active, running average, inactive streak), got "
                    "shape ", size_str(*activity));
  TORCH_CHECK_VALUE(momentum >= 0 && momentum <= 1,
                    "fusedbn: activity_momentum must be in [0, 1], got ", momentum);
}

void check_residual(const OptTensor& z, const Tensor& input) {
  if (!defined(z)) return;
  TORCH_CHECK(z->device() == input.device(), "fusedbn: residual is on ", z->device(),
              " but input is on ", input.device(), "; all tensors must be on the same device");
  TORCH_CHECK_TYPE(z->scalar_type() == input.scalar_type(), "fusedbn: residual dtype ",
                   z->scalar_type(), " differs from the input's ", input.scalar_type());
  TORCH_CHECK_VALUE(z->sizes() == input.sizes(), "fusedbn: residual has shape ", size_str(*z),
                    " but input has shape ", size_str(input), "; they must match");
}

void check_forward(const Tensor& input, const OptTensor& residual, const OptTensor& weight,
                   const OptTensor& bias,
                   const OptTensor& running_mean, const OptTensor& running_var,
                   const OptTensor& nbt, bool training, std::optional<double> momentum,
                   double eps) {
  check_input(input);
  check_residual(residual, input);
  check_per_channel(weight, "weight", input);
  check_per_channel(bias, "bias", input);
  check_per_channel(running_mean, "running_mean", input);
  check_per_channel(running_var, "running_var", input);
  TORCH_CHECK_VALUE(defined(running_mean) == defined(running_var),
                    "fusedbn: running_mean and running_var must be given together (got ",
                    defined(running_mean) ? "running_mean" : "running_var", " only)");
  if (defined(running_mean) && defined(running_var)) {
    TORCH_CHECK_TYPE(running_mean->scalar_type() == running_var->scalar_type(),
                     "fusedbn: running_mean and running_var must have the same dtype, got ",
                     running_mean->scalar_type(), " and ", running_var->scalar_type());
  }
  TORCH_CHECK(training || defined(running_mean),
                    "fusedbn: evaluation mode (training=False) needs running_mean and running_var");
  TORCH_CHECK_VALUE(!std::isnan(eps), "fusedbn: eps must be a number, got nan");
  if (training) {
    TORCH_CHECK_VALUE(eps > 0, "batch_norm eps must be positive during training, but got ", eps);
  } else {
    TORCH_CHECK_VALUE(eps >= 0, "batch_norm eps must be non-negative, but got ", eps);
  }
  if (defined(nbt)) {
    TORCH_CHECK(nbt->device() == input.device(), "fusedbn: num_batches_tracked is on ",
                nbt->device(), " but input is on ", input.device());
    TORCH_CHECK_TYPE(nbt->scalar_type() == at::kLong && nbt->numel() == 1,
                     "fusedbn: num_batches_tracked must be a single int64 value");
  }
  if (training && defined(running_mean) && !momentum.has_value()) {
    TORCH_CHECK_VALUE(defined(nbt),
                      "fusedbn: momentum=None (cumulative average) needs num_batches_tracked");
  }
  if (training) {
    int64_t per_channel = input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) per_channel *= input.size(d);
    TORCH_CHECK_VALUE(per_channel != 1,
                      "Expected more than 1 value per channel when training, got input size ",
                      size_str(input));
  }
}

// How the kernels see a tensor: contiguous (N, C, S) or channels-last (N*S, C).
// Anything else is computed on a contiguous copy.
struct View {
  Shape shape;
  bool native = true;  // false: the kernels run on a contiguous copy
};

// t.permute(order).is_contiguous(), without the view (two ATen calls per op
// otherwise): dims of size 1 impose no stride.
bool contiguous_in_order(at::IntArrayRef sizes, at::IntArrayRef strides,
                         const std::vector<int64_t>& order) {
  if (c10::multiply_integers(sizes) == 0) return true;
  int64_t expected = 1;
  for (auto d = order.rbegin(); d != order.rend(); ++d) {
    if (sizes[*d] == 1) continue;
    if (strides[*d] != expected) return false;
    expected *= sizes[*d];
  }
  return true;
}

View view_of(at::IntArrayRef sizes, at::IntArrayRef strides) {
  View v;
  const int64_t dim = int64_t(sizes.size());
  v.shape.N = sizes[0];
  v.shape.C = sizes[1];
  v.shape.S = 1;
  for (int64_t d = 2; d < dim; ++d) v.shape.S *= sizes[d];
  // Channels-last: C innermost, then the spatial dims, then N (covers a plain
  // (N, C) matrix and any (N, C, 1, ..., 1) tensor too). A single channel
  // with planes (S > 1) is both layouts: contiguous, whose kernels split the
  // channel's planes among the threads (the channels-last loops over rows
  // of one value ran at a tenth of the bandwidth).
  std::vector<int64_t> order{0}, plain;
  for (int64_t d = 2; d < dim; ++d) order.push_back(d);
  order.push_back(1);
  for (int64_t d = 0; d < dim; ++d) plain.push_back(d);
  const bool single = v.shape.C == 1 && v.shape.S > 1;
  if (!single && contiguous_in_order(sizes, strides, order)) {
    v.shape.layout = Layout::NSC;
  } else if (contiguous_in_order(sizes, strides, plain)) {
    v.shape.layout = Layout::NCS;
  } else {
    v.shape.layout = Layout::NCS;
    v.native = false;
  }
  return v;
}

View view_of(const Tensor& t) { return view_of(t.sizes(), t.strides()); }

// In training and in the backward, a contiguous CPU input whose channels
// hold very few values (N*S <= 8: 2x2048x2x2, the last ResNet layer at a
// batch of 2 and 64x64 images) runs the channels-last kernels on a
// channels-last copy. The contiguous kernels' statistics and sums pay a
// fixed cost per channel, which outweighs the copies there: 2x2048x2x2
// forward-train 1.1-1.25x, forward+backward 1.1x faster with the copy
// (AVX-512, 2 threads). Up to N*S = 64 the copy paid before the contiguous
// kernels took short planes as columns (2x2048x2x2 5.5x then; 2026-11-30
// per-call report); now at N*S = 16-64 it was 1.2-2x slower (4x256x2x2,
// 8x512x2x2, 4x1024x4x4, 1x2048x7x7), even at 18 (2x1024x3x3).
// (benchmarks/results/2026-12-01-cpu-avx512-2core-columns.md)
// Eval has no statistics: its contiguous kernel beats the copies.
constexpr int64_t kMaxValuesPerChannelForRows = 8;

bool rows_copy_pays(const View& v) {
  const Shape& s = v.shape;
  return v.native && s.layout == Layout::NCS && s.S > 1 && s.C > 1 &&
         s.N * s.S <= kMaxValuesPerChannelForRows;
}

// x (and v) to run the kernels on: t itself, a contiguous copy of a layout
// the kernels do not read (v.native false), or when the kernels reduce over
// the batch (reduces) the channels-last copy above (v.native false, v.shape
// channels-last).
Tensor kernel_input(const Tensor& t, View& v, bool reduces) {
  if (!v.native) return t.contiguous();
  if (!reduces || !t.is_cpu() || !rows_copy_pays(v)) return t;
  Tensor x = t.movedim(1, -1).contiguous().movedim(-1, 1);
  v = view_of(x);
  v.native = false;
  return x;
}

// Eval's saved statistics on the CPU, in mean and invstd (contiguous, the
// accumulation type): running_mean and 1/sqrt(running_var + eps) as ATen computes them
// (eps rounded to that type, a correctly rounded sqrt, then the division), in
// one loop. Three ATen ops did it, whose fixed costs a small layer's eval
// (8x512x7x7) noticed.
void eval_stats(const Tensor& rm, const Tensor& rv, double eps, Tensor& mean, Tensor& invstd) {
  const int64_t C = mean.numel();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "fusedbn_eval_stats", [&] {
    using A = scalar_t;
    A* m = mean.data_ptr<A>();
    A* is = invstd.data_ptr<A>();
    const A e = A(eps);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rm.scalar_type(), "fusedbn_eval_mean", [&] {
      const scalar_t* r = rm.const_data_ptr<scalar_t>();
      const int64_t st = rm.stride(0);
      for (int64_t c = 0; c < C; ++c) m[c] = A(r[c * st]);
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rv.scalar_type(), "fusedbn_eval_invstd", [&] {
      const scalar_t* r = rv.const_data_ptr<scalar_t>();
      const int64_t st = rv.stride(0);
      for (int64_t c = 0; c < C; ++c) is[c] = A(1) / std::sqrt(A(r[c * st]) + e);
    });
  });
}

// Per-channel tensor as a contiguous array of the accumulation type.
Tensor per_channel_acc(const OptTensor& t, at::ScalarType acc) {
  if (!defined(t)) return Tensor();
  if (t->scalar_type() == acc && t->is_contiguous()) return *t;  // the usual case: no ATen call
  return t->to(acc).contiguous();
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// `t` with exactly the strides of `like` (the layout the kernels read x in).
Tensor in_layout_of(const Tensor& t, const Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}


// F.batch_norm accepts a 1-D empty input (with 0-element statistics) and
// returns an empty tensor; it is seen here as (0, 0). Other ranks as given.
Tensor with_channel_dim(const Tensor& input) {
  return input.dim() == 1 && input.numel() == 0 ? input.view({0, 0}) : input;
}

// In place, the output is written over the input: like PyTorch's in-place
// ops, refuse an input whose elements share memory (an expanded tensor) and
// per-channel tensors or a residual that partly overlap it. A residual that
// is the input itself is fine: each value is read before it is written.
void check_inplace_overlap(const Tensor& input, std::initializer_list<const OptTensor*> others) {
  at::assert_no_internal_overlap(input);
  for (const OptTensor* t : others)
    if (defined(*t)) at::assert_no_partial_overlap(input, **t);
}

// In place, the backward recovers the normalized input from the output y,
// which is stored in the input's dtype: xhat = (act^-1(y) - b [- z]) / w.
// Rounding y (half an ulp of |w * xhat + b + z|) puts an error of about
// u * (|xhat| + (|b| + max|z|) / |w|) into xhat, where eager's saved input
// gives u * |xhat|. So a channel keeps its input instead when
//   (|b| + max|z| + tiny) / |w| > kMaxRecoveryRatio
// (tiny: the dtype's smallest normal, so w = 0 and a w * xhat in the
// denormals count as unrecoverable; NaN anywhere keeps the input too). At
// the bound, float32 gradients measured within a quarter of the suite's
// tolerance (tests/test_inplace.py). bfloat16 and float16 keep every channel:
// with their 8 and 11 bits, grad_weight from a recovered xhat measured 2.5-9x
// eager's error against float64 even with b = 0, above the 2x the suite allows.
constexpr double kMaxRecoveryRatio = 4.0;

// Indices (int64 [K]) of the channels whose input the in-place forward keeps.
// On CUDA the count is read back to the host (one small sync per call): the
// kept tensor's size depends on it.
// In eval, eval_var (running_var) also keeps the channels whose scale
// w / sqrt(var + eps) is not finite: their outputs are +-inf or NaN, from
// which no input can be recovered.
Tensor kept_channels(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                     const OptTensor& residual, const OptTensor& eval_var, double eps) {
  const auto idx_opts = input.options().dtype(at::kLong);
  const int64_t C = input.size(1);
  const auto s = input.scalar_type();
  if (s == at::kBFloat16 || s == at::kHalf) return at::arange(C, idx_opts);
  const at::ScalarType acc = acc_dtype(s);
  const auto opts = input.options().dtype(acc);
  const double tiny = s == at::kDouble ? std::numeric_limits<double>::min()
                                       : double(std::numeric_limits<float>::min());
  Tensor reach = defined(bias) ? bias->to(acc).abs() + tiny : at::full({C}, tiny, opts);
  if (defined(residual) && residual->numel() > 0) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
    reach = reach + residual->abs().amax(dims).to(acc);
  }
  const Tensor w = defined(weight) ? weight->to(acc).abs() : at::ones({C}, opts);
  // Written so that NaN compares false and keeps the input.
  Tensor keep = at::logical_not(w * kMaxRecoveryRatio >= reach);
  if (defined(eval_var))
    keep = keep.logical_or_(at::isfinite(w * (eval_var->to(acc) + eps).rsqrt()).logical_not_());
  return keep.nonzero().view({-1});
}
}  // namespace

const char* kernel_layout(at::IntArrayRef sizes, at::IntArrayRef strides) {
  TORCH_CHECK_VALUE(sizes.size() >= 2 && sizes.size() == strides.size(),
                    "kernel_layout: sizes and strides of a tensor of rank >= 2");
  const View v = view_of(sizes, strides);
  if (!v.native) return "copy";
  if (rows_copy_pays(v)) return "NSC copy";  // (in training and the backward)
  return v.shape.layout == Layout::NSC ? "NSC" : "NCS";
}

bool is_invertible(const std::string& activation, double negative_slope, double alpha) {
  ActivationArgs a;
  a.activation = activation;
  a.negative_slope = negative_slope;
  a.alpha = alpha;
  return is_invertible(parse_activation(a));
}

// ------------------------------------------------------------- arguments

ArgList::ArgList(const c10::OperatorHandle& op, Stack& stack) : schema_(&op.schema()) {
  const size_t n = schema_->arguments().size();
  auto args = torch::jit::last(stack, n);
  values_.assign(args.begin(), args.end());
  torch::jit::drop(stack, n);
}

const c10::IValue& ArgList::operator[](const char* name) const {
  const std::optional<int> i = schema_->argumentIndexWithName(name);
  TORCH_INTERNAL_ASSERT(i.has_value(), "fusedbn: ", schema_->name(), " has no argument ", name);
  return values_[size_t(*i)];
}

void ArgList::push_to(Stack& stack) const {
  stack.insert(stack.end(), values_.begin(), values_.end());
}

void ArgList::check_devices(const Tensor& input) const {
  const auto& args = schema_->arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = values_[i];
    if (!v.isTensor() || !v.toTensor().defined()) continue;
    const Tensor& t = v.toTensor();
    TORCH_CHECK(t.device() == input.device(), "fusedbn: ", args[i].name(), " is on ",
                t.device(), " but input is on ", input.device(),
                "; all tensors must be on the same device");
  }
}

ActivationArgs ActivationArgs::read(const ArgList& a) {
  ActivationArgs r;
  r.activation = a["activation"].toStringRef();
  r.negative_slope = a["negative_slope"].toDouble();
  r.alpha = a["alpha"].toDouble();
  r.min_val = a["min_val"].toDouble();
  r.max_val = a["max_val"].toDouble();
  r.approximate = a["approximate"].toStringRef();
  r.order = a["order"].toStringRef();
  return r;
}

ForwardArgs ForwardArgs::read(const ArgList& a) {
  ForwardArgs f;
  f.input = a["input"].toTensor();
  f.residual = a["residual"].toOptional<Tensor>();
  f.weight = a["weight"].toOptional<Tensor>();
  f.bias = a["bias"].toOptional<Tensor>();
  f.running_mean = a["running_mean"].toOptional<Tensor>();
  f.running_var = a["running_var"].toOptional<Tensor>();
  f.num_batches_tracked = a["num_batches_tracked"].toOptional<Tensor>();
  f.training = a["training"].toBool();
  f.momentum = a["momentum"].toOptional<double>();
  f.eps = a["eps"].toDouble();
  f.act = ActivationArgs::read(a);
  f.activity = a["activity"].toOptional<Tensor>();
  f.activity_momentum = a["activity_momentum"].toDouble();
  return f;
}

BackwardArgs BackwardArgs::read(const ArgList& a) {
  BackwardArgs b;
  b.grad_out = a["grad_out"].toTensor();
  b.input = a["input"].toTensor();
  b.residual = a["residual"].toOptional<Tensor>();
  b.weight = a["weight"].toOptional<Tensor>();
  b.bias = a["bias"].toOptional<Tensor>();
  b.save_mean = a["save_mean"].toTensor();
  b.save_invstd = a["save_invstd"].toTensor();
  b.training = a["training"].toBool();
  b.act = ActivationArgs::read(a);
  const c10::List<bool> mask = a["output_mask"].toBoolList();
  for (size_t i = 0; i < 4; ++i) b.output_mask[i] = mask.get(i);
  b.from_output = a["from_output"].toBool();
  b.kept_input = a["kept_input"].toOptional<Tensor>();
  b.kept_channels = a["kept_channels"].toOptional<Tensor>();
  return b;
}

// ------------------------------------------------------------------ forward

ForwardResult forward_impl(const ForwardArgs& a, bool inplace, ForwardKernel kernel) {
  const Tensor input = with_channel_dim(a.input);
  const OptTensor residual =
      defined(a.residual) ? OptTensor(with_channel_dim(*a.residual)) : a.residual;
  // Every check comes before any buffer is touched.
  const ActParams act = parse_activation(a.act);
  check_mode(act, residual, inplace);
  if (inplace) check_invertible(act);
  check_forward(input, residual, a.weight, a.bias, a.running_mean, a.running_var,
                a.num_batches_tracked, a.training, a.momentum, a.eps);
  check_activity(a.activity, input, a.activity_momentum);
  if (inplace) check_inplace_overlap(input, {&residual, &a.weight, &a.bias, &a.running_mean,
                                             &a.running_var, &a.num_batches_tracked, &a.activity});

  // Before the output overwrites them: the inputs of the channels the
  // backward could not recover from the output.
  Tensor kept_idx, kept;
  if (inplace) {
    kept_idx = kept_channels(input, a.weight, a.bias, residual,
                             a.training ? OptTensor() : a.running_var, a.eps);
    kept = input.index_select(1, kept_idx).contiguous();
  }
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  View v = view_of(input);
  const Tensor x = kernel_input(input, v, a.training);
  const Tensor z = defined(residual) ? in_layout_of(*residual, x) : Tensor();
  // In place: the kernels read each value before writing it at the same index.
  Tensor out = inplace ? input : at::empty_like(input);
  Tensor y = v.native ? out : at::empty_like(x);
  const int64_t C = v.shape.C;
  auto fopts = input.options().dtype(acc);
  Tensor mean, invstd;
  const Tensor w = per_channel_acc(a.weight, acc), b = per_channel_acc(a.bias, acc);

  ForwardParams p;
  p.shape = v.shape;
  p.dtype = to_dtype(input.scalar_type());
  p.act = act;
  p.x = x.const_data_ptr();
  p.residual = ptr_or_null(z);
  p.y = y.data_ptr();
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.eps = a.eps;
  p.num_threads = at::get_num_threads();
  // The kernels update a float32 activity (bn_math.h: update_activity), a
  // copy when the buffer is not one.
  Tensor act32;
  if (defined(a.activity)) {
    const bool direct = a.activity->scalar_type() == at::kFloat && a.activity->is_contiguous();
    act32 = direct ? *a.activity : a.activity->to(at::kFloat).contiguous();
    if (v.shape.count() > 0) {
      p.activity = act32.data_ptr<float>();
      p.activity_rows = act32.dim() == 2 ? 3 : 1;
      p.activity_momentum = a.activity_momentum;
    } else {
      // An empty batch has no fraction; the average and streak stay as they
      // are, as the running statistics do.
      (act32.dim() == 2 ? act32[0] : act32).fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }

  const bool update = a.training && defined(a.running_mean);
  if (a.training) {
    // The kernels write every channel's; an empty batch has zeros.
    mean = v.shape.count() > 0 ? at::empty({C}, fopts) : at::zeros({C}, fopts);
    invstd = v.shape.count() > 0 ? at::empty({C}, fopts) : at::zeros({C}, fopts);
    // As in PyTorch, an empty batch leaves the running statistics alone.
    if (v.shape.count() > 0) {
      p.mean = mean.data_ptr();
      p.invstd = invstd.data_ptr();
      Tensor rm, rv;
      if (update) {
        rm = a.running_mean->contiguous();
        rv = a.running_var->contiguous();
        p.running_mean = rm.data_ptr();
        p.running_var = rv.data_ptr();
        p.running_dtype = to_dtype(rm.scalar_type());
        // momentum=None: the kernels read the count where it lives (no sync).
        if (a.momentum.has_value()) p.momentum = *a.momentum;
        else p.num_batches_tracked = a.num_batches_tracked->const_data_ptr<int64_t>();
      }
      kernel(p, true);
      if (update) {
        if (!rm.is_same(*a.running_mean)) a.running_mean->copy_(rm);
        if (!rv.is_same(*a.running_var)) a.running_var->copy_(rv);
      }
    }
    if (defined(a.num_batches_tracked)) {
      // On the CPU without a dispatched add_ (a few us, a small layer's kernel time).
      if (a.num_batches_tracked->is_cpu()) ++*a.num_batches_tracked->mutable_data_ptr<int64_t>();
      else a.num_batches_tracked->add_(1);
    }
  } else {
    // A copy, never the buffer itself: outputs must not alias inputs.
    if (input.is_cpu()) {
      mean = at::empty({C}, fopts);
      invstd = at::empty({C}, fopts);
      eval_stats(*a.running_mean, *a.running_var, a.eps, mean, invstd);
    } else {
      mean = a.running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
      invstd = (a.running_var->to(acc) + a.eps).rsqrt().contiguous();
    }
    p.mean = mean.data_ptr();
    p.invstd = invstd.data_ptr();
    kernel(p, false);
  }
  if (!v.native) out.copy_(y);
  if (defined(a.activity) && !act32.is_same(*a.activity)) a.activity->copy_(act32);
  if (inplace) out = a.input;
  // (A 1-D input passes the checks only when empty.)
  else if (a.input.dim() == 1) out = at::empty_like(a.input);
  return {out, mean, invstd, kept, kept_idx};
}

namespace {

using Grads = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor>;

// The backward of every channel, from a.input (or from the output).
Grads backward_channels(const BackwardArgs& a, BackwardKernel kernel) {
  const ActParams act = parse_activation(a.act);
  check_mode(act, a.residual, a.from_output);
  if (a.from_output) check_invertible(act);
  check_input(a.input);
  check_residual(a.residual, a.input);
  check_per_channel(a.weight, "weight", a.input);
  check_per_channel(a.bias, "bias", a.input);
  TORCH_CHECK_VALUE(a.grad_out.sizes() == a.input.sizes(), "fusedbn: grad_out has shape ",
                    size_str(a.grad_out), " but input has shape ", size_str(a.input));
  TORCH_CHECK_TYPE(a.grad_out.scalar_type() == a.input.scalar_type(), "fusedbn: grad_out dtype ",
                   a.grad_out.scalar_type(), " differs from the input's ", a.input.scalar_type());
  TORCH_CHECK(a.grad_out.device() == a.input.device(), "fusedbn: grad_out is on ",
              a.grad_out.device(), " but input is on ", a.input.device());
  const at::ScalarType acc = acc_dtype(a.input.scalar_type());
  const int64_t C = a.input.size(1);
  for (const Tensor* t : {&a.save_mean, &a.save_invstd}) {
    TORCH_CHECK(t->device() == a.input.device(), "fusedbn: saved statistics are on ", t->device(),
                " but input is on ", a.input.device());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->numel() == C && t->scalar_type() == acc,
                      "fusedbn: save_mean and save_invstd must be ", acc, " of shape [", C,
                      "], got ", t->scalar_type(), " of shape ", size_str(*t));
  }
  const bool want_w = a.output_mask[1] && defined(a.weight);
  const bool want_b = a.output_mask[2] && defined(a.bias);
  const bool want_z = a.output_mask[3] && defined(a.residual);
  if (!a.output_mask[0] && !want_w && !want_b && !want_z) return {};

  View v = view_of(a.input);
  const Tensor x = kernel_input(a.input, v, /*reduces=*/true);
  // The kernels read dy and z in x's layout.
  const Tensor dy = in_layout_of(a.grad_out, x);
  const Tensor z = defined(a.residual) ? in_layout_of(*a.residual, x) : Tensor();
  Tensor grad_input, dx, grad_residual, dz;
  if (a.output_mask[0]) {
    grad_input = at::empty_like(a.input);
    dx = v.native ? grad_input : at::empty_like(x);
  }
  if (want_z) {
    grad_residual = at::empty_like(*a.residual);
    dz = grad_residual.strides() == x.strides() ? grad_residual : at::empty_like(x);
  }
  auto fopts = a.input.options().dtype(acc);
  Tensor gw = at::empty({C}, fopts), gb = at::empty({C}, fopts);
  const Tensor w = per_channel_acc(a.weight, acc), b = per_channel_acc(a.bias, acc);
  const Tensor mean = a.save_mean.contiguous(), invstd = a.save_invstd.contiguous();

  BackwardParams p;
  p.shape = v.shape;
  p.dtype = to_dtype(a.input.scalar_type());
  p.act = act;
  p.training = a.training;
  p.from_output = a.from_output;
  p.dy = dy.const_data_ptr();
  p.x = x.const_data_ptr();
  p.dx = dx.defined() ? dx.data_ptr() : nullptr;
  p.residual = ptr_or_null(z);
  p.grad_residual = dz.defined() ? dz.data_ptr() : nullptr;
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.mean = mean.const_data_ptr();
  p.invstd = invstd.const_data_ptr();
  p.grad_weight = gw.data_ptr();
  p.grad_bias = gb.data_ptr();
  p.num_threads = at::get_num_threads();
  kernel(p);

  if (grad_input.defined() && !v.native) grad_input.copy_(dx);
  if (want_z && !dz.is_same(grad_residual)) grad_residual.copy_(dz);
  OptTensor gi = grad_input.defined() ? OptTensor(grad_input) : std::nullopt;
  auto as_param = [](const Tensor& g, const Tensor& param) {
    return g.scalar_type() == param.scalar_type() ? g : g.to(param.scalar_type());
  };
  OptTensor gwo, gbo;
  if (want_w) gwo = as_param(gw, *a.weight);
  if (want_b) gbo = as_param(gb, *a.bias);
  OptTensor gzo = want_z ? OptTensor(grad_residual) : std::nullopt;
  return {gi, gwo, gbo, gzo};
}

OptTensor channels_of(const OptTensor& t, int64_t dim, const Tensor& idx) {
  return defined(t) ? OptTensor(t->index_select(dim, idx)) : std::nullopt;
}

}  // namespace

Grads backward_impl(const BackwardArgs& a, BackwardKernel kernel) {
  if (a.input.dim() == 1 && a.input.numel() == 0) {
    // The empty 1-D input F.batch_norm accepts (forward_impl): checked as (0, 0).
    BackwardArgs b = a;
    b.grad_out = with_channel_dim(a.grad_out);
    b.input = with_channel_dim(a.input);
    if (defined(a.residual)) b.residual = with_channel_dim(*a.residual);
    auto g = backward_channels(b, kernel);
    if (std::get<0>(g)) std::get<0>(g) = at::empty_like(a.input);
    if (std::get<3>(g)) std::get<3>(g) = at::empty_like(*a.residual);
    return g;
  }
  const OptTensor& kept_input = a.kept_input;
  const OptTensor& kept_channels = a.kept_channels;
  const Tensor& input = a.input;
  TORCH_CHECK_VALUE(defined(kept_input) == defined(kept_channels) &&
                        (a.from_output || !defined(kept_input)),
                    "fusedbn: kept_input and kept_channels come together, from an in-place "
                    "forward (from_output=True)");
  const int64_t K = defined(kept_channels) ? kept_channels->numel() : 0;
  const bool all_kept = K > 0 && K == input.size(1) && kept_input->sizes() == input.sizes();
  if (all_kept) {
    // Every channel kept its input (16-bit dtypes): the plain backward of it.
    BackwardArgs b = a;
    b.input = *kept_input;
    b.from_output = false;
    return backward_channels(b, kernel);
  }
  auto grads = backward_channels(a, kernel);
  if (K == 0) return grads;
  // The channels forward_ kept the input of: their gradients again, from it.
  const Tensor& idx = *kept_channels;
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.scalar_type() == at::kLong &&
                        kept_input->dim() == input.dim() && kept_input->size(1) == K &&
                        kept_input->size(0) == input.size(0) &&
                        kept_input->numel() == input.numel() / std::max<int64_t>(input.size(1), 1) * K &&
                        kept_input->scalar_type() == input.scalar_type() &&
                        kept_input->device() == input.device(),
                    "fusedbn: kept_input (", size_str(*kept_input), ") and kept_channels (",
                    size_str(idx), ") do not match the input ", size_str(input));
  BackwardArgs b = a;
  b.grad_out = a.grad_out.index_select(1, idx);
  b.input = *kept_input;
  b.residual = channels_of(a.residual, 1, idx);
  b.weight = channels_of(a.weight, 0, idx);
  b.bias = channels_of(a.bias, 0, idx);
  b.save_mean = a.save_mean.index_select(0, idx);
  b.save_invstd = a.save_invstd.index_select(0, idx);
  b.from_output = false;
  auto part = backward_channels(b, kernel);
  auto merge = [&](OptTensor& all, const OptTensor& some, int64_t dim) {
    if (defined(all) && defined(some)) all->index_copy_(dim, idx, *some);
  };
  merge(std::get<0>(grads), std::get<0>(part), 1);
  merge(std::get<1>(grads), std::get<1>(part), 0);
  merge(std::get<2>(grads), std::get<2>(part), 0);
  merge(std::get<3>(grads), std::get<3>(part), 1);
  return grads;
}

}  // namespace fusedbn
