// The BatchNorm formulas, written once for the CPU and the CUDA kernels
// (cpu_kernels.h, cuda_kernels.cuh): merging moments, invstd, the running
// statistics' update, the per-channel constants of the element loops, the
// pre-activation and its gradient, and the dx coefficients. Scalar functions
// on the accumulation type A (float, or double for float64 data); the kernels
// decide the loops, the layouts and the passes around them.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "activations.h"

namespace fusedbn {

#if defined(__CUDA_ARCH__)
FUSEDBN_HD bool bn_isfinite(float v) { return ::isfinite(v); }
FUSEDBN_HD bool bn_isfinite(double v) { return ::isfinite(v); }
FUSEDBN_HD float bn_abs(float v) { return ::fabsf(v); }
FUSEDBN_HD double bn_abs(double v) { return ::fabs(v); }
FUSEDBN_HD double bn_sqrt(double v) { return __dsqrt_rn(v); }
// One rounding, so that every kernel that recomputes a pre-activation gets
// the forward's value bit for bit whatever the compiler contracts elsewhere.
FUSEDBN_HD float bn_madd(float a, float b, float c) { return __fmaf_rn(a, b, c); }
FUSEDBN_HD double bn_madd(double a, double b, double c) { return __fma_rn(a, b, c); }
#else
FUSEDBN_HD bool bn_isfinite(float v) { return std::isfinite(v); }
FUSEDBN_HD bool bn_isfinite(double v) { return std::isfinite(v); }
FUSEDBN_HD float bn_abs(float v) { return std::fabs(v); }
FUSEDBN_HD double bn_abs(double v) { return std::fabs(v); }
FUSEDBN_HD double bn_sqrt(double v) { return std::sqrt(v); }
// The CPU loops are vectorized by the compiler; std::fma would be a library
// call on the baseline ISA. The same expression in every loop is contracted
// the same way.
FUSEDBN_HD float bn_madd(float a, float b, float c) { return a * b + c; }
FUSEDBN_HD double bn_madd(double a, double b, double c) { return a * b + c; }
#endif

template <typename A> struct MaxOf;
template <> struct MaxOf<float> { static constexpr float value = FLT_MAX; };
template <> struct MaxOf<double> { static constexpr double value = DBL_MAX; };

// ------------------------------------------------------------- moments

// Chan et al.'s update of (mean, m2) over n values by a disjoint side of nb
// values with mean_b, m2_b; tot = n + nb. When mean_b - mean is not finite, a
// side whose values held inf/NaN (non-finite mean, M2 NaN) propagates as a
// sum would (inf + finite = inf, inf + -inf = NaN: eager's mean = sum / n),
// and two finite means too far apart (float64 only) are averaged without
// their difference, M2 then overflowing as eager's does.
template <typename A>
FUSEDBN_HD void chan_update(A& mean, A& m2, A n, A nb, A tot, A mean_b, A m2_b) {
  const A fb = nb / tot;
  const A d = mean_b - mean;
  if (bn_isfinite(d)) {
    mean += d * fb;
    // d * (d * f), not d * d * f: a first merge has f = 0, and d * d may
    // overflow (float64 near its maximum) where the product does not.
    m2 += m2_b + d * (d * (n * fb));
  } else if (bn_isfinite(mean) && bn_isfinite(mean_b)) {
    mean = mean * (n / tot) + mean_b * fb;
    m2 += m2_b + A(HUGE_VAL);
  } else {
    mean += mean_b;
    m2 = A(NAN);
  }
}

// (count, mean, M2) of a set of values; merge() adds a disjoint set. Either
// side may be empty. A plain aggregate (CUDA __shared__ arrays of it):
// `Moments<A> m{}` is the empty set.
template <typename A>
struct Moments {
  A n, mean, m2;
  FUSEDBN_HD void merge(A nb, A mean_b, A m2_b) {
    if (nb == A(0)) return;
    const A tot = n + nb;
    chan_update(mean, m2, n, nb, tot, mean_b, m2_b);
    n = tot;
  }
};

// A batch's (mean, M2) from the corrected two-pass sums: bmean0 = sum / nb
// rounded, bs1 = sum(x - bmean0), bm2 = sum((x - bmean0)^2); the bs1 terms
// take out what the rounding of bmean0 added. When that comes out
// non-finite, eager's pattern for a batch holding inf/NaN: mean = sum / nb,
// M2 = NaN.
template <typename A>
FUSEDBN_HD void batch_moments(A sum, A bmean0, A bs1, A bm2, A inv_nb, A& mean, A& m2) {
  mean = bmean0 + bs1 * inv_nb;
  m2 = bm2 - bs1 * bs1 * inv_nb;
  if (!bn_isfinite(mean) || !bn_isfinite(m2)) {
    mean = sum * inv_nb;
    m2 = A(NAN);
  }
}

// 1 / sqrt(var + eps) from the merged (double) moments: a variance beyond
// float's range still gives its finite invstd.
template <typename A>
FUSEDBN_HD A invstd_of(double m2, double n, double eps) {
  return A(1.0 / bn_sqrt(m2 / n + eps));
}

// momentum = None: the cumulative average's factor 1 / (batches + 1), read
// where the kernel runs (on the GPU, without a host sync).
FUSEDBN_HD double momentum_of(double momentum, const int64_t* num_batches_tracked) {
  return num_batches_tracked ? 1.0 / double(*num_batches_tracked + 1) : momentum;
}

// running = (1 - momentum) * running + momentum * batch statistic, the
// variance unbiased by count / (count - 1), in the accumulation type.
template <typename A>
struct RunningUpdate {
  A mom, keep, unbias;
  FUSEDBN_HD RunningUpdate(double momentum, double count)
      : mom(A(momentum)), keep(A(1.0 - momentum)), unbias(A(count / (count - 1.0))) {}
  FUSEDBN_HD A mean(A running, A batch_mean) const { return keep * running + mom * batch_mean; }
  FUSEDBN_HD A var(A running, A batch_var) const { return keep * running + mom * batch_var * unbias; }
};

// Activity counting: whether a value is active is the activation's call
// (activations.h: active()) on its input -- the pre-activation for order
// BnAct (kCountPre), x itself for order ActBn (kCountInput). A template
// switch of the kernels that write y.
enum Count : int { kCountNone = 0, kCountPre = 1, kCountInput = 2 };

// Whether one value counts as active: x is the input, v the pre-activation;
// act the activation after the normalization, pre the one before it.
template <int Count, typename Act, typename Pre, typename A>
FUSEDBN_HD int is_active(const Act& act, const Pre& pre, A x, A v) {
  if constexpr (Count == kCountPre) return act.active(v);
  else if constexpr (Count == kCountInput) return pre.active(x);
  else return 0;
}

// Activity of channel c from its count of active values among n > 0:
// a[c] = the fraction active; with 3 rows also the running average a[C + c]
// (NaN until the first batch; momentum in float, without contraction, so
// that CPU and GPU agree bit for bit) and a[2C + c], the number of calls in
// a row with no active value.
FUSEDBN_HD void update_activity(float* a, int64_t C, int rows, int64_t c, int64_t count, int64_t n,
                                double momentum) {
  const float frac = float(double(count) / double(n));
  a[c] = frac;
  if (rows != 3) return;
  float& avg = a[C + c];
#if defined(__CUDA_ARCH__)
  avg = avg != avg ? frac : __fadd_rn(avg, __fmul_rn(float(momentum), frac - avg));
#else
  avg = avg != avg ? frac : avg + float(momentum) * (frac - avg);
#endif
  a[2 * C + c] = count == 0 ? a[2 * C + c] + 1.0f : 0.0f;
}

// ------------------------------------------------------ per-channel constants

// Near the dtype's maximum x - mean itself overflows where eager's folded
// x * scale + (shift - mean * scale) does not. A channel whose |mean| is that
// large (beyond max * 2^-26: below it, x - mean cannot round past the
// maximum) and whose spread is too (|mean| * invstd <= 256, so x * invstd
// stays finite and folding costs at most 8 bits of xhat, as in eager) is
// normalized folded: the loops see mean 0 and the shift adjusted, and the
// backward's normalized values carry the offset mean * invstd, which the
// sums' finishing takes out (ChannelCoef::sum_gxh, dx_coefficients).
template <typename A>
FUSEDBN_HD bool fold_mean(A mean, A invstd) {
  return bn_abs(mean) > MaxOf<A>::value * A(1.0 / 67108864.0) &&
         bn_abs(double(mean) * double(invstd)) <= 256.0;
}

// What the element loops of a channel use: the mean they subtract, scale =
// weight * invstd, the shift (bias, or with a folded mean bias - mean *
// scale), invstd; hat turns x - mean into the normalized value (invstd) or,
// in-place (from the output), pre - shift [- z] into it (1 / weight); off is
// what the loops' normalized values carry beyond xhat (the folded mean's
// mean * invstd, else 0).
template <typename A>
struct ChannelCoef {
  A mean, scale, shift, invstd, hat, off;
  // sum(g * xhat) from the loops' sums of g and g * (xhat + off).
  FUSEDBN_HD double sum_gxh(double sg, double sgx) const { return sgx - double(off) * sg; }
};

template <typename A>
FUSEDBN_HD ChannelCoef<A> channel_coef(A mean, A invstd, A weight, A bias, bool from_output) {
  ChannelCoef<A> k;
  k.scale = weight * invstd;
  k.invstd = invstd;
  k.hat = from_output ? A(1) / weight : invstd;
  if (fold_mean(mean, invstd)) {
    k.mean = A(0);
    k.shift = A(double(bias) - double(mean) * double(k.scale));
    k.off = A(double(mean) * double(invstd));
  } else {
    k.mean = mean;
    k.shift = bias;
    k.off = A(0);
  }
  return k;
}

// ----------------------------------------------------------- element math

// The pre-activation (x - mean) * scale + shift [+ z] from xc = x - mean.
template <bool Res, typename A>
FUSEDBN_HD A pre_activation(A xc, A z, A scale, A shift) {
  const A pre = bn_madd(xc, scale, shift);
  if constexpr (Res) return pre + z;
  else return pre;
}

// g = act'(pre) * dy of one element and its normalized value xh = (x - mean)
// * hat, from the input v = x, or in-place (FromOut) from the output v = y:
// the derivative from y itself (act.grad_from_output), xh = (act.inverse(y)
// - shift [- z]) * hat. The sums use xh rather than x - mean: near the
// dtype's maximum x - mean overflows a float sum where xh (bounded by
// sqrt(count)) does not.
template <bool Res, bool FromOut, typename A, typename Act>
FUSEDBN_HD A grad_pre(A v, A z, A dy, A mean, A scale, A shift, A hat, const Act& act, A& xh) {
  if constexpr (FromOut) {
    A bn = act.inverse(v) - shift;
    if constexpr (Res) bn -= z;
    xh = bn * hat;
    return act.grad_from_output(dy, v);
  } else {
    const A xc = v - mean;
    xh = xc * hat;
    return act.grad(dy, pre_activation<Res>(xc, z, scale, shift));
  }
}

// With g and xh from grad_pre:
//   grad_bias = sum(g), grad_weight = sum(g * xhat)
//   training: dx = g * scale + xh * k_xh + k_const, the batch statistics' terms
//             k_xh = -scale * mean(g * xhat), k_const = -scale * mean(g)
//             (less k_xh * off for the loops' offset);
//   eval:     dx = g * scale (Train = false), which must not see xh
//             (0 * inf = NaN at an inf input).
// The coefficients of one channel from its sums over `count` values, sgx
// already sum(g * xhat) (ChannelCoef::sum_gxh).
template <typename A>
FUSEDBN_HD void dx_coefficients(bool training, const ChannelCoef<A>& k, double sg, double sgx,
                                double count, A& k_xh, A& k_const) {
  if (!training) {
    k_xh = A(0);
    k_const = A(0);
    return;
  }
  k_xh = A(-double(k.scale) * (sgx / count));
  k_const = A(-double(k.scale) * (sg / count) - double(k.off) * double(k_xh));
}

template <bool Train, typename A>
FUSEDBN_HD A dx_value(A g, A xh, A scale, A k_xh, A k_const) {
  if constexpr (Train) return g * scale + xh * k_xh + k_const;
  else return g * scale;
}

}  // namespace fusedbn
