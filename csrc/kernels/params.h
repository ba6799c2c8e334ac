// Plain-data description of one fused BatchNorm + activation call.
// Shared by the CPU and CUDA kernels; knows nothing of at::Tensor.
#pragma once
#include <cstdint>

namespace fusedbn {

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };
// relu6 is Hardtanh(0, 6); gelu's approximate="tanh" is GELUTanh.
enum class Activation : int {
  Identity = 0, ReLU = 1, LeakyReLU = 2, ELU = 3, Hardtanh = 4, SiLU = 5, Hardswish = 6,
  Hardsigmoid = 7, GELU = 8, GELUTanh = 9, Mish = 10
};

// Where element (n, c, s) lives:
//   NCS (contiguous):     x[(n * C + c) * S + s]
//   NSC (channels-last):  x[(n * S + s) * C + c]   i.e. M = N * S rows of C channels
enum class Layout : int { NCS = 0, NSC = 1 };

struct Shape {
  int64_t N = 0, C = 0, S = 1;
  Layout layout = Layout::NCS;
  int64_t count() const { return N * S; }  // elements per channel
};

// BnAct: y = act(bn(x) [+ z]).  ActBn: y = bn(act(x)), the activation before
// the normalization (no residual, no in-place mode).
enum class Order : int { BnAct = 0, ActBn = 1 };

struct ActParams {
  Activation kind = Activation::ReLU;
  Order order = Order::BnAct;
  double negative_slope = 0.01;  // leaky_relu
  double alpha = 1.0;            // elu
  double min_val = -1.0, max_val = 1.0;  // hardtanh
};

// Per-channel arrays (C elements) are in the accumulation type `acc`
// (double for float64 input, float otherwise); the glue converts weight and
// bias to it, so the hot loops never see the parameter dtype.
struct ForwardParams {
  Shape shape;
  DType dtype = DType::Float32;
  ActParams act;
  const void* x = nullptr;
  const void* residual = nullptr;  // z, laid out as x, or null: y = act(bn(x) + z)
  void* y = nullptr;
  const void* weight = nullptr;  // acc[C] or null (= 1)
  const void* bias = nullptr;    // acc[C] or null (= 0)
  // acc[C]. Training: written (batch mean and 1/sqrt(var + eps)).
  // Eval: read (the glue fills them from the running statistics).
  void* mean = nullptr;
  void* invstd = nullptr;
  // Training only, both null or both set: updated in place after the
  // statistics are known, in their own dtype.
  void* running_mean = nullptr;
  void* running_var = nullptr;
  DType running_dtype = DType::Float32;
  double momentum = 0.1;  // the exponential-average factor
  // momentum = None (cumulative average): int64[1] number of batches seen so
  // far, in the kernels' memory; the factor is 1 / (n + 1), read by the
  // kernel (bn_math.h: momentum_of), so a GPU call does not sync the host.
  const int64_t* num_batches_tracked = nullptr;
  double eps = 1e-5;
  // Activity tracking: float32 [rows][C] or null, updated from how many of
  // each channel's values are active (activations.h: active(); of the
  // pre-activation for BnAct, of x for ActBn), counted in the pass that
  // writes y (bn_math.h:
  // update_activity). Only with values to count (N * S > 0).
  float* activity = nullptr;
  int activity_rows = 1;
  double activity_momentum = 0.1;
  // Scratch of the kernels' entry points for the counts (int64[C]); callers
  // leave it null.
  int64_t* active_count = nullptr;
  int num_threads = 1;
};

struct BackwardParams {
  Shape shape;
  DType dtype = DType::Float32;
  ActParams act;
  bool training = true;  // batch statistics: dx gets the mean/var terms
  // In-place mode: `x` holds the forward's output y (which overwrote the
  // input); the pre-activation is recovered by inverting the activation
  // and the normalized value by inverting the affine transform (weight != 0).
  bool from_output = false;
  const void* dy = nullptr;  // same layout as x
  const void* x = nullptr;
  const void* residual = nullptr;  // z as in the forward, or null
  void* dx = nullptr;              // null: input gradient not wanted
  void* grad_residual = nullptr;   // dz (= g), written with dx; needs residual
  const void* weight = nullptr;  // acc[C] or null
  const void* bias = nullptr;    // acc[C] or null
  const void* mean = nullptr;    // acc[C]
  const void* invstd = nullptr;  // acc[C]
  void* grad_weight = nullptr;   // acc[C]: sum(g * xhat), always written
  void* grad_bias = nullptr;     // acc[C]: sum(g), always written
  int num_threads = 1;
};

}  // namespace fusedbn
