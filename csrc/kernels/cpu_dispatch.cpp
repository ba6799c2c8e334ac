#include "cpu_dispatch.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "bn_math.h"

namespace fusedbn {
// One copy of each entry point per instruction set (cpu_isa.h).
#define FUSEDBN_DECLARE_ISA(ns)                          \
  namespace ns {                                         \
  void forward(const ForwardParams& p, bool training);   \
  void backward(const BackwardParams& p);                \
  }
FUSEDBN_DECLARE_ISA(avx512)
FUSEDBN_DECLARE_ISA(avx2)
FUSEDBN_DECLARE_ISA(baseline)
#undef FUSEDBN_DECLARE_ISA

namespace cpu {
namespace {

enum class Isa { Baseline, AVX2, AVX512 };

Isa detect() {
  __builtin_cpu_init();
  Isa best = Isa::Baseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = Isa::AVX2;
  if (best == Isa::AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::AVX512;
  // Copies left out of the build (setup.py: FUSEDBN_CPU_ISAS).
#ifdef FUSEDBN_NO_AVX512
  if (best == Isa::AVX512) best = Isa::AVX2;
#endif
#ifdef FUSEDBN_NO_AVX2
  if (best == Isa::AVX2) best = Isa::Baseline;
#endif
  if (const char* cap = std::getenv("FUSEDBN_CPU_ISA")) {
    if (std::strcmp(cap, "baseline") == 0) best = Isa::Baseline;
    else if (std::strcmp(cap, "avx2") == 0 && best == Isa::AVX512) best = Isa::AVX2;
  }
  return best;
}

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

// The copy for a dtype: float64 exists in the baseline copy only (cpu_isa.h).
Isa isa_for(DType dtype) { return dtype == DType::Float64 ? Isa::Baseline : isa(); }

}  // namespace

#ifdef FUSEDBN_NO_CPU_KERNELS
// Built with FUSEDBN_CPU_ISAS=none (CI's CUDA build check): no copy at all.
[[noreturn]] static void no_cpu_kernels() {
  throw std::runtime_error("fusedbn: this build has no CPU kernels (FUSEDBN_CPU_ISAS=none)");
}
void forward(const ForwardParams&, bool) { no_cpu_kernels(); }
void backward(const BackwardParams&) { no_cpu_kernels(); }
#else
void forward(const ForwardParams& p, bool training) {
  ForwardParams q = p;
  std::vector<int64_t> counts(p.activity ? size_t(p.shape.C) : 0, 0);
  q.active_count = p.activity ? counts.data() : nullptr;
  switch (isa_for(p.dtype)) {
#ifndef FUSEDBN_NO_AVX512
    case Isa::AVX512: avx512::forward(q, training); break;
#endif
#ifndef FUSEDBN_NO_AVX2
    case Isa::AVX2: avx2::forward(q, training); break;
#endif
    default: baseline::forward(q, training); break;
  }
  // Here, in the baseline build, not in the FMA copies: the float average is
  // rounded as on the GPU (no contraction).
  if (p.activity)
    for (int64_t c = 0; c < p.shape.C; ++c)
      update_activity(p.activity, p.shape.C, p.activity_rows, c, counts[c], p.shape.count(),
                      p.activity_momentum);
}

void backward(const BackwardParams& p) {
  switch (isa_for(p.dtype)) {
#ifndef FUSEDBN_NO_AVX512
    case Isa::AVX512: return avx512::backward(p);
#endif
#ifndef FUSEDBN_NO_AVX2
    case Isa::AVX2: return avx2::backward(p);
#endif
    default: return baseline::backward(p);
  }
}
#endif

const char* isa_name() {
  switch (isa()) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace fusedbn
