// Checks the AVX-512 bfloat16 conversions of csrc/kernels/cpu_bf16_avx512.h
// against the scalar reference of cpu_types.h (load / store<bf16_t>, the
// conversions torch uses: round to nearest even, NaN quieted): narrowing on
// every one of the 2^32 float bit patterns, by both the AVX512-BF16 path
// (when the CPU has it) and the integer one, and widening on all 2^16
// bfloat16 patterns. Run lengths vary so the masked tails are exercised.
// Prints the number of mismatches per path and exits non-zero on any.
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu_bf16_avx512.h"

using namespace fusedbn;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void narrow_integer(const float* s,
                                                                                  bf16_t* d,
                                                                                  int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = bf16_tail_mask(n - i);
    _mm256_mask_storeu_epi16(d + i, m, bf16_round(_mm512_maskz_loadu_ps(m, s + i)));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void widen(const bf16_t* s, float* d,
                                                                         int64_t n) {
  bf16_widen_avx512(s, d, n);
}

int main() {
  const int64_t chunk = int64_t(1) << 16;
  std::vector<float> src(chunk);
  std::vector<bf16_t> ref(chunk), got(chunk);
  const bool native = cpu_has_avx512_bf16();
  unsigned long long bad_int = 0, bad_native = 0, bad_widen = 0;
  for (uint64_t base = 0; base < (uint64_t(1) << 32); base += chunk) {
    for (int64_t k = 0; k < chunk; ++k) {
      // Chunk j holds the patterns whose low 16 bits are j: neighbours differ
      // in their high bits (their bfloat16), so a value stored in the wrong
      // place of a run shows.
      const uint32_t u = uint32_t(k) << 16 | uint32_t(base >> 16);
      std::memcpy(&src[k], &u, 4);
      ref[k] = store<bf16_t>(src[k]);
    }
    // Runs of 1..61 values, so every tail length occurs.
    const int64_t run = 1 + int64_t((base >> 16) % 61);
    for (int pass = 0; pass < (native ? 2 : 1); ++pass) {
      for (int64_t o = 0; o < chunk; o += run) {
        const int64_t n = std::min(run, chunk - o);
        if (pass == 0) narrow_integer(src.data() + o, got.data() + o, n);
        else bf16_narrow_native(src.data() + o, got.data() + o, n);
      }
      unsigned long long& bad = pass == 0 ? bad_int : bad_native;
      for (int64_t k = 0; k < chunk; ++k) bad += got[k].bits != ref[k].bits;
    }
  }
  std::vector<bf16_t> h(chunk);
  std::vector<float> w(chunk);
  for (int64_t k = 0; k < chunk; ++k) h[k].bits = uint16_t(k);
  for (int64_t o = 0; o < chunk; o += 37) widen(h.data() + o, w.data() + o, std::min<int64_t>(37, chunk - o));
  for (int64_t k = 0; k < chunk; ++k) {
    const float r = load(h[k]);
    bad_widen += std::memcmp(&r, &w[k], 4) != 0;
  }
  std::printf("narrow integer path: %llu mismatches of 2^32\n", bad_int);
  if (native) std::printf("narrow avx512_bf16 path: %llu mismatches of 2^32\n", bad_native);
  else std::printf("narrow avx512_bf16 path: not checked (CPU lacks AVX512-BF16)\n");
  std::printf("widen: %llu mismatches of 2^16\n", bad_widen);
  return (bad_int || bad_native || bad_widen) ? 1 : 0;
}
