// bfloat16 <-> float conversion of whole arrays with AVX-512, for the
// AVX-512 copy of the CPU kernels (and tests/test_bf16_convert.py). Each
// function carries its own target, so the header compiles in any translation
// unit; callers must have checked that the CPU has AVX-512 (F, BW, VL, DQ).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu_types.h"

namespace fusedbn {

#define FUSEDBN_AVX512 "avx512f,avx512bw,avx512vl,avx512dq"
#define FUSEDBN_AVX512_INLINE inline __attribute__((always_inline, target(FUSEDBN_AVX512)))

// Whole 16-value vectors with masked tails: the plain loops leave up to 15
// values per run to scalar code, which on runs of a few hundred values (a
// 14x14 plane) cost as much as the vectors.
FUSEDBN_AVX512_INLINE __mmask16 bf16_tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}

// The shifts and conversions below are the zero-masking forms with every
// lane set: GCC 12 warns (-Wmaybe-uninitialized) on the plain forms, whose
// headers pass an undefined vector as the merge source.
constexpr __mmask16 kAll16 = 0xffff;

// store<bf16_t> on 16 values: round to nearest even; NaN quieted, not rounded.
FUSEDBN_AVX512_INLINE __m256i bf16_round(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll16, u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_maskz_srli_epi32(kAll16, _mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_fpclass_ps_mask(v, 0x81);  // quiet | signalling NaN
  r = _mm512_mask_or_epi32(r, nan, _mm512_maskz_srli_epi32(kAll16, u, 16), _mm512_set1_epi32(0x40));
  return _mm512_maskz_cvtepi32_epi16(kAll16, r);
}

// vcvtneps2bf16 (AVX512-BF16) rounds and quiets NaN as bf16_round does but
// flushes denormal inputs to zero: when the run holds one, it is narrowed
// again by bf16_round, so the result is bf16_round's bit for bit. (Testing
// each vector and branching instead cost a third of the speed.)
__attribute__((target(FUSEDBN_AVX512 ",avx512bf16"), noinline)) inline void bf16_narrow_native(
    const float* src, bf16_t* dst, int64_t n) {
  __mmask16 denormal = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = bf16_tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, src + i);
    denormal |= _mm512_fpclass_ps_mask(v, 0x20);
    _mm256_mask_storeu_epi16(dst + i, m, __m256i(_mm512_cvtneps_pbh(v)));
  }
  if (denormal)
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = bf16_tail_mask(n - i);
      _mm256_mask_storeu_epi16(dst + i, m, bf16_round(_mm512_maskz_loadu_ps(m, src + i)));
    }
}

inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// dst[i] = store<bf16_t>(src[i]), i < n.
FUSEDBN_AVX512_INLINE void bf16_narrow_avx512(const float* src, bf16_t* dst, int64_t n) {
  if (cpu_has_avx512_bf16()) return bf16_narrow_native(src, dst, n);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = bf16_tail_mask(n - i);
    _mm256_mask_storeu_epi16(dst + i, m, bf16_round(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

// dst[i] = load(src[i]), i < n. (The kernels widen bfloat16 in registers now;
// tests/test_bf16_convert.py checks this against load() bit for bit.)
FUSEDBN_AVX512_INLINE void bf16_widen_avx512(const bf16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = bf16_tail_mask(n - i);
    const __m512i h = _mm512_maskz_cvtepu16_epi32(m, _mm256_maskz_loadu_epi16(m, src + i));
    _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(m, h, 16)));
  }
}

#undef FUSEDBN_AVX512_INLINE
#undef FUSEDBN_AVX512

}  // namespace fusedbn
