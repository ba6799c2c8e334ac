// float -> bfloat16 narrowing of whole arrays with AVX2, for the AVX2 copy of
// the CPU kernels (and tests/test_bf16_convert.py). GCC vectorizes
// store<bf16_t> inside the kernels' loops too, but there, beside the
// arithmetic, its rounding and NaN test spill ymm registers (16 of them in
// AVX2): computing outputs into a float buffer and narrowing it with this
// loop is faster (kernels alone, 64x256x14x14 eval 1.3x). Each function
// carries its own target, so the header compiles in any translation unit;
// callers must have checked that the CPU has AVX2.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu_types.h"

namespace fusedbn {

#define FUSEDBN_AVX2_INLINE inline __attribute__((always_inline, target("avx2")))

// store<bf16_t> on 8 values, in the low 16 bits of 32-bit lanes: round to
// nearest even; NaN quieted, not rounded.
FUSEDBN_AVX2_INLINE __m256i bf16_round8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7fff));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}

// dst[i] = store<bf16_t>(src[i]), i < n.
FUSEDBN_AVX2_INLINE void bf16_narrow_avx2(const float* src, bf16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = bf16_round8(_mm256_loadu_ps(src + i));
    const __m256i b = bf16_round8(_mm256_loadu_ps(src + i + 8));
    // packus interleaves the 128-bit halves (a0 b0 a1 b1); the permute puts
    // them in order (a0 a1 b0 b1).
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8));
  }
  if (i + 8 <= n) {
    const __m256i a = bf16_round8(_mm256_loadu_ps(src + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(a, a), 0xd8)));
    i += 8;
  }
  for (; i < n; ++i) dst[i] = store<bf16_t>(src[i]);
}

#undef FUSEDBN_AVX2_INLINE

}  // namespace fusedbn
