// Checks the float math of csrc/kernels/vec_math.h against the double libm
// functions, through loops that the compiler vectorizes for whatever ISA the
// build targets (tests/test_vec_math.py builds this baseline and -mavx2 -mfma).
// (a) A sweep over every STRIDE-th float bit pattern (STRIDE odd, so every low
//     mantissa pattern occurs; argv[1], default 41); runs of 65533 values so the
//     loops' scalar tails are exercised too.
// (b) Special values and the bit patterns around each function's thresholds.
// The error is |got - ref| / ulp(ref) with ref the double result and ulp the
// float spacing at ref (2^-149 among the denormals; inf counts as 2^128). NaN
// must give NaN, a ref that overflows in float the same infinity, a zero ref a zero of the
// same sign. Prints the max ulp per function with its argument, then a timing
// of the vectorized loops against std:: loops over 1M floats (information
// only). Exits 1 when a bound or a special value fails.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "vec_math.h"

using namespace fusedbn;

// One loop per function; tests/test_vec_math.py checks with -fopt-info-vec
// that each VEC_LOOP line is reported vectorized.
#define VEC_LOOP(name, f)                                                              \
  __attribute__((noinline)) void name(const float* __restrict x, float* __restrict y, \
                                      int64_t n) {                                    \
    for (int64_t i = 0; i < n; ++i) y[i] = f(x[i]);                                   \
  }
VEC_LOOP(loop_vexp, vexp)
VEC_LOOP(loop_vexpm1, vexpm1)
VEC_LOOP(loop_vlog1p, vlog1p)
VEC_LOOP(loop_vtanh, vtanh)
VEC_LOOP(loop_verf, verf)
VEC_LOOP(loop_vsigmoid, vsigmoid)
// ELU as the kernels will write it: the select goes through vselect.
static inline float elu(float v) { return vselect(v > 0.f, v, 1.5f * vexpm1(v)); }
VEC_LOOP(loop_elu, elu)
// END_VEC_LOOPS

static float std_sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }
#define STD_LOOP(name, f)                                                              \
  __attribute__((noinline)) void name(const float* __restrict x, float* __restrict y, \
                                      int64_t n) {                                    \
    for (int64_t i = 0; i < n; ++i) y[i] = f(x[i]);                                   \
  }
STD_LOOP(loop_exp, std::exp)
STD_LOOP(loop_expm1, std::expm1)
STD_LOOP(loop_log1p, std::log1p)
STD_LOOP(loop_tanh, std::tanh)
STD_LOOP(loop_erf, std::erf)
STD_LOOP(loop_sigmoid, std_sigmoid)

static double ref_sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }
static double ref_exp(double v) { return std::exp(v); }
static double ref_expm1(double v) { return std::expm1(v); }
static double ref_log1p(double v) { return std::log1p(v); }
static double ref_tanh(double v) { return std::tanh(v); }
static double ref_erf(double v) { return std::erf(v); }

using Loop = void (*)(const float*, float*, int64_t);

struct Fn {
  const char* name;
  Loop vec, lib;
  double (*ref)(double);
  double bound;  // max ulp allowed, the figure documented in vec_math.h
  // Inputs for the timing, a typical BatchNorm output range.
  float lo, hi;
  // Results of the check.
  double max_ulp = 0;
  float worst_x = 0;
  long long special_bad = 0;
};

static Fn fns[] = {
    {"vexp", loop_vexp, loop_exp, ref_exp, 1.0, -10.f, 10.f},
    {"vexpm1", loop_vexpm1, loop_expm1, ref_expm1, 1.6, -10.f, 10.f},
    {"vlog1p", loop_vlog1p, loop_log1p, ref_log1p, 1.0, -0.9f, 10.f},
    {"vtanh", loop_vtanh, loop_tanh, ref_tanh, 1.3, -10.f, 10.f},
    {"verf", loop_verf, loop_erf, ref_erf, 1.4, -10.f, 10.f},
    {"vsigmoid", loop_vsigmoid, loop_sigmoid, ref_sigmoid, 2.0, -10.f, 10.f},
};

static float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Error of got in ulp of ref; special cases go to `bad` instead.
static void score(Fn& fn, float x, float got, bool report) {
  const double ref = fn.ref(double(x));
  bool bad = false;
  double err = 0;
  if (std::isnan(ref) || std::isnan(got)) {
    bad = std::isnan(ref) != std::isnan(got);
  } else if (std::isinf(float(ref))) {  // overflow: the same infinity
    bad = got != float(ref);
  } else if (ref == 0) {
    bad = got != 0 || std::signbit(got) != std::signbit(ref);
  } else {
    int e;
    std::frexp(ref, &e);  // |ref| in [2^(e-1), 2^e)
    const double ulp = std::ldexp(1.0, std::max(e - 1, -126) - 23);
    const double g = std::isinf(got) ? std::copysign(0x1p128, double(got)) : double(got);
    err = std::fabs(g - ref) / ulp;
  }
  if (bad) {
    if (fn.special_bad++ < 5 || report)
      std::printf("  %s(%a = %.9g) = %a, expected %a\n", fn.name, x, x, got, ref);
  }
  if (err > fn.max_ulp) {
    fn.max_ulp = err;
    fn.worst_x = x;
  }
}

static void check(Fn& fn, const std::vector<float>& x, std::vector<float>& y) {
  fn.vec(x.data(), y.data(), int64_t(x.size()));
  for (size_t k = 0; k < x.size(); ++k) score(fn, x[k], y[k], false);
}

static std::vector<float> special_values() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {0.f, -0.f, inf, -inf, std::nanf(""), -std::nanf(""),
                          from_bits(0x7f800001u), from_bits(0xffc00001u),
                          std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(), 1.f, -1.f, 0.5f, 2.f};
  // Thresholds: overflow and underflow of exp / expm1, where the results turn
  // denormal, where tanh, erf and sigmoid saturate, where the small-argument
  // selects switch, the reduction boundaries k = 0 / 1 and erf's split at 1.
  const float edges[] = {88.7228394f, 88.3762626f, -87.3365479f, -103.972084f, -103.278931f,
                         -17.3286800f, 9.01091290f, 9.5f,        3.9192059f,   4.f,
                         0x1p-25f,     0x1p-24f,    0.34657359f, 1.03972077f,  1.f,
                         0.99999994f,  -0.29289322f, 0.41421356f, 0x1p-12f,    1e-3f,
                         16777216.f,   33554432.f};
  for (float e : edges) {
    uint32_t u;
    std::memcpy(&u, &e, 4);
    for (int d = -64; d <= 64; ++d) {
      v.push_back(from_bits(u + uint32_t(d)));
      v.push_back(-from_bits(u + uint32_t(d)));
    }
  }
  // Every float of magnitude below 2^-120 (denormals, near-zero behaviour).
  for (uint32_t u = 0; u < 0x03800000u; u += 97) {
    v.push_back(from_bits(u));
    v.push_back(-from_bits(u));
  }
  return v;
}

static double time_loop(Loop f, const std::vector<float>& x, std::vector<float>& y) {
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    f(x.data(), y.data(), int64_t(x.size()));
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return best;
}

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 41;
  const size_t run = 65533;
  std::vector<float> x, y(run);
  x.reserve(run);
  // (a) the sweep
  for (uint64_t u = 0; u < (uint64_t(1) << 32);) {
    x.clear();
    for (; x.size() < run && u < (uint64_t(1) << 32); u += stride) x.push_back(from_bits(uint32_t(u)));
    for (Fn& fn : fns) check(fn, x, y);
  }
  // (b) special values, scored alike; each input also alone (scalar tail)
  const std::vector<float> sv = special_values();
  y.resize(sv.size());
  for (Fn& fn : fns) {
    check(fn, sv, y);
    for (float s : {0.f, -0.f, std::nanf("")}) {
      float out;
      fn.vec(&s, &out, 1);
      score(fn, s, out, false);
    }
  }

  int status = 0;
  std::printf("sweep of every %llu-th float, %zu special values\n", (unsigned long long)stride,
              sv.size());
  for (const Fn& fn : fns) {
    const bool ok = fn.max_ulp <= fn.bound && fn.special_bad == 0;
    std::printf("%-9s max %.3f ulp (bound %.1f) at x = %.9g, special failures %lld  %s\n",
                fn.name, fn.max_ulp, fn.bound, fn.worst_x, fn.special_bad, ok ? "ok" : "FAIL");
    if (!ok) status = 1;
  }

  // Timing, for information: 1M floats, best of 7 runs.
  const size_t n = size_t(1) << 20;
  std::vector<float> tx(n), ty(n);
  std::mt19937 gen(0);
  for (const Fn& fn : fns) {
    std::uniform_real_distribution<float> dist(fn.lo, fn.hi);
    for (float& v : tx) v = dist(gen);
    const double tv = time_loop(fn.vec, tx, ty), tl = time_loop(fn.lib, tx, ty);
    std::printf("time %-9s vectorized %.3f ms, std:: %.3f ms, ratio %.1fx\n", fn.name, tv, tl,
                tl / tv);
  }
  return status;
}
