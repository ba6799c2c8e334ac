// The operator schemas, declared once; each backend registers its kernels
// with TORCH_LIBRARY_IMPL in its own file.
#include <torch/library.h>

TORCH_LIBRARY(fusedbn, m) {
  // y = act(batchnorm(input) + residual), residual optional (ResNet's
  // bn3 -> + identity -> relu). Training: batch statistics; running_mean,
  // running_var and num_batches_tracked updated in place when given
  // (momentum=None: cumulative average). Eval: the running statistics.
  // Returns (output, save_mean, save_invstd), the statistics in float32
  // (float64 for float64 input).
  // order="act_bn": y = batchnorm(act(input)) instead (no residual).
  // The activation: its name, then the parameters of the ones that have
  // them (negative_slope: leaky_relu, alpha: elu, min_val/max_val: hardtanh,
  // approximate: gelu); relu6 is hardtanh(0, 6).
  // activity: when given (float32, [C] or [3, C]), row 0 is set to the
  // fraction of each channel's values that are active (activations.h)
  // (counted in the same pass); with 3 rows, row 1 is its running average
  // (factor activity_momentum; NaN = no batch yet) and row 2 counts the calls
  // in a row in which the channel had no active value.
  m.def(
      "forward(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, bool training, "
      "float? momentum, float eps, str activation, float negative_slope, float alpha, "
      "str order=\"bn_act\", Tensor(d!)? activity=None, float activity_momentum=0.1, "
      "float min_val=-1., float max_val=1., str approximate=\"none\") "
      "-> (Tensor, Tensor, Tensor)");
  // forward writing its output over `input` (returned). Only for invertible
  // activations (identity, leaky_relu, elu): the backward then takes the
  // output in place of the input (from_output=True). Channels whose input
  // cannot be recovered accurately from the output (see glue.cpp,
  // kept_channels) keep a copy of their input: returned as kept_input
  // (N, K, *spatial) with their indices kept_channels (int64 [K]); K is
  // usually 0.
  m.def(
      "forward_(Tensor(a!) input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor(b!)? running_mean, Tensor(c!)? running_var, Tensor(d!)? num_batches_tracked, "
      "bool training, float? momentum, float eps, str activation, float negative_slope, "
      "float alpha, str order=\"bn_act\", Tensor(e!)? activity=None, "
      "float activity_momentum=0.1, float min_val=-1., float max_val=1., "
      "str approximate=\"none\") "
      "-> (Tensor(a!), Tensor, Tensor, Tensor, Tensor)");
  // Gradients of forward for input, weight, bias and residual, each only
  // when its output_mask entry is set (and the tensor exists); the
  // activation's derivative is recomputed from input, residual and the saved
  // statistics. from_output: `input` is forward_'s output, from which the
  // input is recovered, except for the channels kept_channels whose input
  // forward_ kept (kept_input).
  m.def(
      "backward(Tensor grad_out, Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_invstd, bool training, str activation, "
      "float negative_slope, float alpha, bool[4] output_mask, bool from_output=False, "
      "str order=\"bn_act\", Tensor? kept_input=None, Tensor? kept_channels=None, "
      "float min_val=-1., float max_val=1., str approximate=\"none\") "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?)");
}
