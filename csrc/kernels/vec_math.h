// Float math that GCC auto-vectorizes: exp, expm1, log1p, tanh, erf, sigmoid.
// std::exp and friends are calls into libm, so a loop that uses them stays
// scalar (glibc's vector variants need -ffast-math); these functions are plain
// float arithmetic, integer bit manipulation and mask selects (vselect), with
// no branches, tables or intrinsics, so a loop such as
// `for (i) y[i] = vexp(x[i]);` vectorizes for whatever ISA the caller targets
// (checked for SSE2, AVX2+FMA and AVX-512 by tests/test_vec_math.py).
// Compiled with -O3 and no -ffast-math; GCC may contract a*b+c into an FMA
// where the target has one: every formula here stays within its bound with or
// without contraction (results may differ in the last bit between ISAs).
//
// Max error in ulp of the float result against the double libm function,
// measured by tests/cpp/vec_math_check.cpp over every 9th float bit pattern
// plus the special values (baseline x86-64 build / -mavx2 -mfma build);
// the test asserts 1.0, 1.6, 1.0, 1.3, 1.4, 2.0 in this order:
//   vexp      0.780 / 0.780  (the max is among the denormal results)
//   vexpm1    1.497 / 1.410
//   vlog1p    0.840 / 0.749
//   vtanh     1.079 / 1.079
//   verf      1.239 / 1.224
//   vsigmoid  1.851 / 1.851
// Special values follow libm: NaN propagates, ±inf and overflow/underflow give
// the limits (denormal results are produced, not flushed), -0.0 is kept by
// expm1, log1p, tanh and erf, tanh and erf saturate to exactly ±1.
#pragma once
#include <cstdint>

#define FUSEDBN_VM inline __attribute__((always_inline))

namespace fusedbn {

// c ? a : b through a bit mask; both a and b are computed. Use it, not a
// ternary, to select around these functions (or any float arithmetic): under
// the default -ftrapping-math GCC 12 will not speculate an operation that may
// trap out of a conditional arm, so `y > 0 ? y : alpha * vexpm1(y)` (even
// `y > 0 ? y : 0.01f * y`) keeps control flow and the loop stays scalar, and a
// ternary with a constant arm lets GCC thread the constant into a path that
// folds to an overflowing (trapping) operation, with the same result.
FUSEDBN_VM float vselect(bool c, float a, float b) {
  const uint32_t m = 0u - uint32_t(c);
  return __builtin_bit_cast(float, (__builtin_bit_cast(uint32_t, a) & m) |
                                       (__builtin_bit_cast(uint32_t, b) & ~m));
}

namespace vm_detail {

FUSEDBN_VM uint32_t bits(float x) { return __builtin_bit_cast(uint32_t, x); }
FUSEDBN_VM float from_bits(uint32_t u) { return __builtin_bit_cast(float, u); }
FUSEDBN_VM float vabs(float x) { return from_bits(bits(x) & 0x7fffffffu); }
// |m| with the sign of s (m's own sign bit is expected clear).
FUSEDBN_VM float with_sign_of(float m, float s) { return from_bits(bits(m) | (bits(s) & 0x80000000u)); }
// 2^k for -126 <= k <= 127.
FUSEDBN_VM float pow2i(int32_t k) { return from_bits(uint32_t(k + 127) << 23); }

constexpr float kLog2e = 1.44269504088896341f;
// ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 9 significant bits so k * kLn2Hi is exact
// for |k| < 2^15.
constexpr float kLn2Hi = 0x1.63p-1f;
constexpr float kLn2Lo = -2.12194440e-4f;
// Adding 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer (ties to
// even) and leaves that integer in the low mantissa bits.
constexpr float kRound = 0x1.8p23f;

// Splits x (|x| < 2^21 after the caller's clamp) as x = k ln2 + rh + rl, with
// rh = x - k kLn2Hi exact and rl = -k kLn2Lo; returns r = rh + rl rounded,
// |r| <= ln2/2 (slightly more when an FMA rounds k*log2e differently; the
// polynomial holds there too). NaN gives a meaningless k and a NaN r.
FUSEDBN_VM float reduce_ln2(float x, int32_t& k, float& rh, float& rl) {
  const float t = x * kLog2e + kRound;
  k = int32_t(bits(t) - bits(kRound));
  const float kf = t - kRound;
  rh = x - kf * kLn2Hi;
  rl = -(kf * kLn2Lo);
  return rh + rl;
}

// P(r) with expm1(r) = r + r^2 P(r) on |r| <= ln2/2; weighted minimax fit,
// relative error of the whole expression below 4e-11 (far under rounding).
FUSEDBN_VM float expm1_poly(float r) {
  float p = 0x1.a1b3a2p-13f;
  p = p * r + 0x1.6d904cp-10f;
  p = p * r + 0x1.111080p-7f;
  p = p * r + 0x1.555488p-5f;
  p = p * r + 0x1.555556p-3f;
  return p * r + 0.5f;
}

}  // namespace vm_detail

// exp(x). Inputs are clamped to [-150, 100] (NaN passes), which is already past
// underflow to 0 and overflow to inf; the scale 2^k is applied as two factors
// so k = 128 (results near FLT_MAX) and k < -126 (denormal results) work.
FUSEDBN_VM float vexp(float x) {
  using namespace vm_detail;
  float xc = vselect(x > 100.f, 100.f, x);
  xc = vselect(xc < -150.f, -150.f, xc);
  int32_t k;
  float rh, rl;
  const float r = reduce_ln2(xc, k, rh, rl);
  // exp(r) = 1 + rh + (rl + r^2 P(r)); 1 + rh is split into its rounded sum
  // and the exact error (Fast2Sum, |rh| < 1) so only the last addition rounds
  // at the result's precision: 0.99 ulp without the split, 0.78 with.
  const float s = 1.f + rh;
  const float y = s + (((1.f - s) + rh) + (rl + (r * r) * expm1_poly(r)));
  const int32_t k1 = k >> 1;
  return y * pow2i(k1) * pow2i(k - k1);
}

// expm1(x) = 2^k (expm1(r) + 1) - 1 = 2 (2^(k-1) expm1(r) + (2^(k-1) - 1/2)).
// 2^(k-1) - 1/2 is exact for every k that matters, so one rounding joins the
// two terms; the halving keeps 2^(k-1) finite up to k = 128, the final doubling
// overflows to inf on its own. |x| < 2^-25 returns x (expm1(x) rounds to x
// there), which keeps -0.0 and denormals exact.
FUSEDBN_VM float vexpm1(float x) {
  using namespace vm_detail;
  float xc = vselect(x > 89.f, 89.f, x);
  xc = vselect(xc < -30.f, -30.f, xc);
  int32_t k;
  float rh, rl;
  const float r = reduce_ln2(xc, k, rh, rl);
  const float e = r + (r * r) * expm1_poly(r);
  const float h = pow2i(k - 1);
  const float y = 2.f * (h * e + (h - 0.5f));
  return vselect(vabs(x) < 0x1p-25f, x, y);
}

// log1p(x), after musl's log1pf: u = 1 + x rounded, c = 1 + x - u exactly
// (Fast2Sum, the operands ordered by magnitude), u = 2^k m with
// m in [sqrt(2)/2, sqrt(2)), f = m - 1 exact, then
// log1p(x) = k ln2 + log1p(f) + c/u with log1p(f) = f - f^2/2 + s (f^2/2 + R(s^2)),
// s = f / (2 + f) and fdlibm's logf coefficients for R.
FUSEDBN_VM float vlog1p(float x) {
  using namespace vm_detail;
  const float u = 1.f + x;
  const float c = vselect(x < 1.f, x - (u - 1.f), 1.f - (u - x)) / u;
  const uint32_t iu = bits(u) + (0x3f800000u - 0x3f3504f3u);
  const int32_t k = int32_t(iu >> 23) - 0x7f;
  const float f = from_bits((iu & 0x007fffffu) + 0x3f3504f3u) - 1.f;
  const float s = f / (2.f + f);
  const float z = s * s, w = z * z;
  const float t1 = w * (0xccce13.0p-25f + w * 0xf89e26.0p-26f);
  const float t2 = z * (0xaaaaaa.0p-24f + w * 0x91e9ee.0p-25f);
  const float hfsq = 0.5f * f * f;
  const float dk = float(k);
  float y = s * (hfsq + (t1 + t2)) + (dk * kLn2Lo + c) - hfsq + f + dk * kLn2Hi;
  // u's exponent field is garbage for u = 0, inf, NaN and negative u; those
  // cases, and |x| < 2^-24 where log1p(x) rounds to x (keeps -0.0), are selected.
  y = vselect(vabs(x) < 0x1p-24f, x, y);
  y = vselect(x == -1.f, -__builtin_inff(), y);
  y = vselect(x < -1.f, __builtin_nanf(""), y);
  y = vselect(x == __builtin_inff(), x, y);
  return y;
}

// tanh(a), a = |x|: a + a z P(z), z = a^2, for a < 0.625 (minimax fit,
// 0.003 ulp); else 1 - 2 / (exp(2a) + 1), the rounding error dl of
// d = exp(2a) + 1 kept (Fast2Sum) and applied as 2/(d + dl) = q - q dl (q/2),
// q = 2/d. One formula alone fails near 0 (e/(e + 2) from expm1 reaches 2.3
// ulp) or loses the relative precision (1 - q). a is clamped to 9.5, past
// which tanh rounds to 1; the sign is put back as a bit (-0.0 stays -0.0).
FUSEDBN_VM float vtanh(float x) {
  using namespace vm_detail;
  float a = vabs(x);
  a = vselect(a > 9.5f, 9.5f, a);
  const float z = a * a;
  float p = 0x1.18e1e0p-9f;
  p = p * z - 0x1.0bf4fep-7f;
  p = p * z + 0x1.638b58p-6f;
  p = p * z - 0x1.b9ee90p-5f;
  p = p * z + 0x1.111066p-3f;
  p = p * z - 0x1.555554p-2f;
  const float small = a + a * (z * p);
  const float e = vexp(2.f * a);
  const float d = e + 1.f;
  const float dl = (e - d) + 1.f;
  const float q = 2.f / d;
  const float large = 1.f - (q - q * dl * (0.5f * q));
  return with_sign_of(vselect(a < 0.625f, small, large), x);
}

// erf(x): erf(a) = a + a z P(z) + a c0, z = a^2, c0 = 2/sqrt(pi) - 1, for
// a = |x| < 0.875 (so erf rounds once at full size), and
// erf(a) = 1 - erfc(a) = 1 - exp(g(a) - a^2) for 0.875 <= a <= 4, where
// g(a) = log(erfc(a)) + a^2 is smooth (fitted in a - 2.4375, weighted by
// erfc / erf, the factor by which an error in the exponent reaches erf).
// Both are computed and one selected. |x| is clamped to 4, past which erf
// rounds to 1; the sign is put back as a bit so -0.0 stays -0.0.
FUSEDBN_VM float verf(float x) {
  using namespace vm_detail;
  float a = vabs(x);
  a = vselect(a > 4.f, 4.f, a);
  const float z = a * a;
  float p = 0x1.6e6a12p-14f;
  p = p * z - 0x1.af4372p-11f;
  p = p * z + 0x1.555134p-8f;
  p = p * z - 0x1.b81c18p-6f;
  p = p * z + 0x1.ce2ea4p-4f;
  p = p * z - 0x1.812746p-2f;
  p = p * z + 0x1.06eba8p-3f;
  const float small = a + a * p;
  const float v = a - 2.4375f;
  float g = -0x1.571decp-16f;
  g = g * v + 0x1.47b53ap-14f;
  g = g * v - 0x1.ceb29ap-12f;
  g = g * v + 0x1.300e62p-9f;
  g = g * v - 0x1.75bf9ep-7f;
  g = g * v + 0x1.dcbbf6p-5f;
  g = g * v - 0x1.7075bep-2f;
  g = g * v - 0x1.88d856p+0f;
  const float large = 1.f - vexp(g - z);
  return with_sign_of(vselect(a < 0.875f, small, large), x);
}

// sigmoid(x) = 1 / (1 + exp(-x)) computed as exp(-|x|) / (1 + exp(-|x|)) for
// x < 0, so it reaches the denormals instead of 1 / inf = 0 below x = -88.7.
// The rounding error dl of d = 1 + e is kept (Fast2Sum, e <= 1) and applied as
// n / (d + dl) = q - q dl / d with 1/d = q (x >= 0) or 1 - q (x < 0).
FUSEDBN_VM float vsigmoid(float x) {
  using namespace vm_detail;
  const float e = vexp(-vabs(x));
  const float d = 1.f + e;
  const float dl = (1.f - d) + e;
  const bool neg = x < 0.f;
  const float q = vselect(neg, e, 1.f) / d;
  return q - q * dl * vselect(neg, 1.f - q, q);
}

}  // namespace fusedbn

#undef FUSEDBN_VM
