// The activations, one functor each, used by the CPU and CUDA kernels alike.
// fwd(y): the activation of the BatchNorm output y.
// grad(dy, y): dy times the derivative at the pre-activation y. The backward
// recomputes y from the saved input and statistics instead of storing it.
// Branch conditions follow ATen's so NaN and the kink at 0 behave the same:
// the positive branch is y > 0 strictly.
// grad_from_output(dy, out): the same derivative from the output out = fwd(y),
// as ATen's backward with is_result=True; the in-place backward uses it
// because inverting a saturated output (ELU at -alpha) loses the input.
#pragma once
#include <cmath>

#include "params.h"

#if defined(__CUDACC__)
#define FUSEDBN_HD __host__ __device__ __forceinline__
#else
#define FUSEDBN_HD inline __attribute__((always_inline))
#endif

namespace fusedbn {

#if defined(__CUDA_ARCH__)
template <typename A> FUSEDBN_HD A act_exp(A v) { return ::exp(v); }
template <typename A> FUSEDBN_HD A act_expm1(A v) { return ::expm1(v); }
template <typename A> FUSEDBN_HD A act_log1p(A v) { return ::log1p(v); }
#else
template <typename A> FUSEDBN_HD A act_exp(A v) { return std::exp(v); }
template <typename A> FUSEDBN_HD A act_expm1(A v) { return std::expm1(v); }
template <typename A> FUSEDBN_HD A act_log1p(A v) { return std::log1p(v); }
#endif

// log of the smallest positive (denormal) value of A.
template <typename A> struct LogTiny;
template <> struct LogTiny<float> { static constexpr float value = -103.27893f; };
template <> struct LogTiny<double> { static constexpr double value = -744.44007192138122; };

// `invertible` activations also give inverse(fwd(y)) == y, which lets the
// in-place backward recover the pre-activation from the output.
template <typename A>
struct IdentityAct {
  static constexpr bool invertible = true;
  FUSEDBN_HD A fwd(A y) const { return y; }
  FUSEDBN_HD A inverse(A v) const { return v; }
  FUSEDBN_HD A grad(A dy, A) const { return dy; }
  FUSEDBN_HD A grad_from_output(A dy, A) const { return dy; }
};

template <typename A>
struct ReLUAct {
  static constexpr bool invertible = false;  // every y <= 0 maps to 0
  // `y < 0 ? 0 : y` keeps NaN, as torch.relu does.
  FUSEDBN_HD A fwd(A y) const { return y < A(0) ? A(0) : y; }
  // threshold_backward: zero where y <= 0, so NaN passes the gradient.
  FUSEDBN_HD A grad(A dy, A y) const { return y <= A(0) ? A(0) : dy; }
  FUSEDBN_HD A grad_from_output(A dy, A out) const { return grad(dy, out); }
};

template <typename A>
struct LeakyReLUAct {
  static constexpr bool invertible = true;  // for slope > 0
  A slope;
  FUSEDBN_HD A fwd(A y) const { return y > A(0) ? y : y * slope; }
  FUSEDBN_HD A inverse(A v) const { return v > A(0) ? v : v / slope; }
  FUSEDBN_HD A grad(A dy, A y) const { return y > A(0) ? dy : dy * slope; }
  FUSEDBN_HD A grad_from_output(A dy, A out) const { return grad(dy, out); }  // slope > 0
};

template <typename A>
struct ELUAct {
  static constexpr bool invertible = true;  // for alpha > 0
  A alpha;
  FUSEDBN_HD A fwd(A y) const { return y <= A(0) ? alpha * act_expm1(y) : y; }
  // An output saturated at -alpha gives log1p(-1) = -inf; it becomes the
  // finite log of the smallest positive (v + alpha) / alpha, so that the
  // backward's zero gradient times the recovered input stays 0, not NaN.
  // (NaN stays NaN.)
  FUSEDBN_HD A inverse(A v) const {
    if (v > A(0)) return v;
    const A y = act_log1p(v / alpha), lowest = LogTiny<A>::value;
    return y < lowest ? lowest : y;
  }
  FUSEDBN_HD A grad(A dy, A y) const { return y <= A(0) ? dy * alpha * act_exp(y) : dy; }
  // d/dy alpha * expm1(y) = alpha * exp(y) = out + alpha: exactly 0 once the
  // output saturated, however far below the input was.
  FUSEDBN_HD A grad_from_output(A dy, A out) const { return out <= A(0) ? dy * (out + alpha) : dy; }
};

// Whether in-place mode can recover the pre-activation from the output: the
// functor has an inverse (Act::invertible) and the parameters keep the
// activation one-to-one (a positive slope or alpha). The one statement of
// the rule: the glue and fusedbn.functional.is_invertible ask here.
inline bool is_invertible(const ActParams& a) {
  switch (a.kind) {
    case Activation::Identity: return IdentityAct<double>::invertible;
    case Activation::LeakyReLU: return LeakyReLUAct<double>::invertible && a.negative_slope > 0;
    case Activation::ELU: return ELUAct<double>::invertible && a.alpha > 0;
    default: return ReLUAct<double>::invertible;
  }
}

// Runtime activation -> functor type, once per call, outside the hot loops.
template <typename A, typename F>
auto dispatch_activation(const ActParams& a, F&& f) {
  switch (a.kind) {
    case Activation::Identity: return f(IdentityAct<A>{});
    case Activation::ReLU: return f(ReLUAct<A>{});
    case Activation::LeakyReLU: return f(LeakyReLUAct<A>{static_cast<A>(a.negative_slope)});
    case Activation::ELU: default: return f(ELUAct<A>{static_cast<A>(a.alpha)});
  }
}

}  // namespace fusedbn
