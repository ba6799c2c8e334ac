// The activations, one functor each, used by the CPU and CUDA kernels alike.
// fwd(y): the activation of the BatchNorm output y.
// grad(dy, y): dy times the derivative at the pre-activation y. The backward
// recomputes y from the saved input and statistics instead of storing it.
// Branch conditions follow ATen's so NaN and the kink at 0 behave the same:
// the positive branch is y > 0 strictly.
// grad_from_output(dy, out): the same derivative from the output out = fwd(y),
// as ATen's backward with is_result=True; the in-place backward uses it
// because inverting a saturated output (ELU at -alpha) loses the input.
// active(y): whether activity tracking counts the value (params.h): the
// pre-activation is positive for the activations unbounded above (ReLU's
// family, SiLU, GELU, Mish, Hardswish), strictly inside the linear range for
// the saturating ones (Hardtanh/ReLU6, Hardsigmoid).
// The formulas and the order of their operations are ATen's (CPU), in the
// accumulation type, so results match eager PyTorch to its own rounding.
#pragma once
#include <cmath>

#include "params.h"
#if !defined(__CUDACC__)
#include "vec_math.h"
#endif

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
template <typename A> FUSEDBN_HD A act_tanh(A v) { return ::tanh(v); }
template <typename A> FUSEDBN_HD A act_erf(A v) { return ::erf(v); }
#else
template <typename A> FUSEDBN_HD A act_exp(A v) { return std::exp(v); }
template <typename A> FUSEDBN_HD A act_expm1(A v) { return std::expm1(v); }
template <typename A> FUSEDBN_HD A act_log1p(A v) { return std::log1p(v); }
template <typename A> FUSEDBN_HD A act_tanh(A v) { return std::tanh(v); }
template <typename A> FUSEDBN_HD A act_erf(A v) { return std::erf(v); }
#if !defined(__CUDACC__)
// float on the CPU: libm's functions are calls that keep a loop scalar;
// vec_math.h's vectorize (within 2 ulp of the correctly rounded result, as
// ATen's own vectorized float math).
template <> FUSEDBN_HD float act_exp<float>(float v) { return vexp(v); }
template <> FUSEDBN_HD float act_expm1<float>(float v) { return vexpm1(v); }
template <> FUSEDBN_HD float act_log1p<float>(float v) { return vlog1p(v); }
template <> FUSEDBN_HD float act_tanh<float>(float v) { return vtanh(v); }
template <> FUSEDBN_HD float act_erf<float>(float v) { return verf(v); }
#endif
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
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
};

template <typename A>
struct ReLUAct {
  static constexpr bool invertible = false;  // every y <= 0 maps to 0
  // `y < 0 ? 0 : y` keeps NaN, as torch.relu does.
  FUSEDBN_HD A fwd(A y) const { return y < A(0) ? A(0) : y; }
  // threshold_backward: zero where y <= 0, so NaN passes the gradient.
  FUSEDBN_HD A grad(A dy, A y) const { return y <= A(0) ? A(0) : dy; }
  FUSEDBN_HD A grad_from_output(A dy, A out) const { return grad(dy, out); }
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
};

template <typename A>
struct LeakyReLUAct {
  static constexpr bool invertible = true;  // for slope > 0
  A slope;
  FUSEDBN_HD A fwd(A y) const { return y > A(0) ? y : y * slope; }
  FUSEDBN_HD A inverse(A v) const { return v > A(0) ? v : v / slope; }
  FUSEDBN_HD A grad(A dy, A y) const { return y > A(0) ? dy : dy * slope; }
  FUSEDBN_HD A grad_from_output(A dy, A out) const { return grad(dy, out); }  // slope > 0
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
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
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
};

// None of the activations below is one-to-one on its whole range, so none
// takes in-place mode (no inverse, no grad_from_output).

// hardtanh(min_val, max_val); relu6 is hardtanh(0, 6). The clamp keeps NaN;
// the derivative is 0 at both bounds (hardtanh_backward), so NaN passes dy.
template <typename A>
struct HardtanhAct {
  static constexpr bool invertible = false;
  A lo, hi;
  FUSEDBN_HD A fwd(A y) const { return y < lo ? lo : (y > hi ? hi : y); }
  FUSEDBN_HD A grad(A dy, A y) const { return (y <= lo || y >= hi) ? A(0) : dy; }
  FUSEDBN_HD bool active(A y) const { return y > lo && y < hi; }
};

// Clamps y + 3 to [0, 6] as std::min(std::max(.)) does: NaN stays NaN.
template <typename A>
FUSEDBN_HD A relu6_of(A v) {
  const A lo = v < A(0) ? A(0) : v;
  return A(6) < lo ? A(6) : lo;
}

// silu(y) = y * sigmoid(y), as y / (1 + exp(-y)).
template <typename A>
struct SiLUAct {
  static constexpr bool invertible = false;
  FUSEDBN_HD A fwd(A y) const { return y / (A(1) + act_exp(-y)); }
  FUSEDBN_HD A grad(A dy, A y) const {
    const A s = A(1) / (A(1) + act_exp(-y));
    return dy * s * (A(1) + y * (A(1) - s));
  }
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
};

// hardswish(y) = y * relu6(y + 3) / 6; the derivative is 0 at or below -3,
// y / 3 + 1/2 strictly inside (-3, 3), 1 at or above 3 (as ATen).
template <typename A>
struct HardswishAct {
  static constexpr bool invertible = false;
  FUSEDBN_HD A fwd(A y) const { return y * relu6_of(y + A(3)) / A(6); }
  FUSEDBN_HD A grad(A dy, A y) const {
    return y <= A(-3) ? A(0) : (y < A(3) ? dy * (y / A(3) + A(0.5)) : dy);
  }
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
};

// hardsigmoid(y) = relu6(y + 3) / 6; the derivative is 1/6 strictly inside
// (-3, 3), 0 elsewhere -- 1/6 rounded to float, in every dtype, as ATen's
// (a float64 gradient of 0.1666666716337204).
template <typename A>
struct HardsigmoidAct {
  static constexpr bool invertible = false;
  FUSEDBN_HD A fwd(A y) const { return relu6_of(y + A(3)) / A(6); }
  FUSEDBN_HD A grad(A dy, A y) const {
    return (y > A(-3) && y < A(3)) ? dy * A(1.0f / 6.0f) : A(0);
  }
  FUSEDBN_HD bool active(A y) const { return y > A(-3) && y < A(3); }
};

// gelu(y) = y * Phi(y), the exact (erf) form.
template <typename A>
struct GELUAct {
  static constexpr bool invertible = false;
  static constexpr A kAlpha = A(0.70710678118654752440);  // 1 / sqrt(2)
  static constexpr A kBeta = A(0.39894228040143267794);   // 1 / sqrt(2 pi)
  FUSEDBN_HD A fwd(A y) const { return y * A(0.5) * (A(1) + act_erf(y * kAlpha)); }
  FUSEDBN_HD A grad(A dy, A y) const {
    const A cdf = A(0.5) * (A(1) + act_erf(y * kAlpha));
    const A pdf = kBeta * act_exp(y * y * A(-0.5));
    return dy * (cdf + y * pdf);
  }
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
};

// gelu(y, approximate="tanh") = y / 2 * (1 + tanh(sqrt(2 / pi) * (y + 0.044715 y^3))).
template <typename A>
struct GELUTanhAct {
  static constexpr bool invertible = false;
  static constexpr A kBeta = A(0.79788456080286535588);  // sqrt(2 / pi)
  static constexpr A kKappa = A(0.044715);
  FUSEDBN_HD A fwd(A y) const {
    const A inner = kBeta * (y + kKappa * (y * y * y));
    return A(0.5) * y * (A(1) + act_tanh(inner));
  }
  FUSEDBN_HD A grad(A dy, A y) const {
    const A y2 = y * y;
    const A t = act_tanh(kBeta * (y + kKappa * (y2 * y)));
    const A left = A(0.5) * y, right = A(1) + t;
    const A d_left = A(0.5) * right;
    const A d_right = left * (A(1) - t * t) * kBeta * (A(1) + A(3) * kKappa * y2);
    return dy * (d_left + d_right);
  }
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
};

// mish(y) = y * tanh(softplus(y)), softplus(y) = log1p(exp(y)).
template <typename A>
struct MishAct {
  static constexpr bool invertible = false;
  FUSEDBN_HD A fwd(A y) const { return y * act_tanh(act_log1p(act_exp(y))); }
  FUSEDBN_HD A grad(A dy, A y) const {
    const A s = A(1) / (A(1) + act_exp(-y));
    const A t = act_tanh(act_log1p(act_exp(y)));
    return dy * (t + y * s * (A(1) - t * t));
  }
  FUSEDBN_HD bool active(A y) const { return y > A(0); }
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
    default: return false;  // relu and the activations after ELU (see above)
  }
}

// Runtime activation -> functor type, once per call, outside the hot loops.
template <typename A, typename F>
auto dispatch_activation(const ActParams& a, F&& f) {
#ifdef FUSEDBN_ONLY_ACT  // benchmarks/kernel_bench.cpp: one activation compiles in a minute
  return f(FUSEDBN_ONLY_ACT<A>{});
#else
  switch (a.kind) {
    case Activation::Identity: return f(IdentityAct<A>{});
    case Activation::ReLU: return f(ReLUAct<A>{});
    case Activation::LeakyReLU: return f(LeakyReLUAct<A>{static_cast<A>(a.negative_slope)});
    case Activation::ELU: return f(ELUAct<A>{static_cast<A>(a.alpha)});
    case Activation::Hardtanh:
      return f(HardtanhAct<A>{static_cast<A>(a.min_val), static_cast<A>(a.max_val)});
    case Activation::SiLU: return f(SiLUAct<A>{});
    case Activation::Hardswish: return f(HardswishAct<A>{});
    case Activation::Hardsigmoid: return f(HardsigmoidAct<A>{});
    case Activation::GELU: return f(GELUAct<A>{});
    case Activation::GELUTanh: return f(GELUTanhAct<A>{});
    case Activation::Mish: default: return f(MishAct<A>{});
  }
#endif
}

}  // namespace fusedbn
