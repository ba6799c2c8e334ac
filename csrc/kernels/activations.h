// The activations, one functor each, used by the CPU and CUDA kernels alike.
// fwd(y): the activation of the BatchNorm output y.
// grad(dy, y): dy times the derivative at the pre-activation y. The backward
// recomputes y from the saved input and statistics instead of storing it.
// Branch conditions follow ATen's so NaN and the kink at 0 behave the same:
// the positive branch is y > 0 strictly.
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
#else
template <typename A> FUSEDBN_HD A act_exp(A v) { return std::exp(v); }
template <typename A> FUSEDBN_HD A act_expm1(A v) { return std::expm1(v); }
#endif

template <typename A>
struct IdentityAct {
  FUSEDBN_HD A fwd(A y) const { return y; }
  FUSEDBN_HD A grad(A dy, A) const { return dy; }
};

template <typename A>
struct ReLUAct {
  // `y < 0 ? 0 : y` keeps NaN, as torch.relu does.
  FUSEDBN_HD A fwd(A y) const { return y < A(0) ? A(0) : y; }
  // threshold_backward: zero where y <= 0, so NaN passes the gradient.
  FUSEDBN_HD A grad(A dy, A y) const { return y <= A(0) ? A(0) : dy; }
};

template <typename A>
struct LeakyReLUAct {
  A slope;
  FUSEDBN_HD A fwd(A y) const { return y > A(0) ? y : y * slope; }
  FUSEDBN_HD A grad(A dy, A y) const { return y > A(0) ? dy : dy * slope; }
};

template <typename A>
struct ELUAct {
  A alpha;
  FUSEDBN_HD A fwd(A y) const { return y <= A(0) ? alpha * act_expm1(y) : y; }
  FUSEDBN_HD A grad(A dy, A y) const { return y <= A(0) ? dy * alpha * act_exp(y) : dy; }
};

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
