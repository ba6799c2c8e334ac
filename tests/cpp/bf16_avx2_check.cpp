// Checks the AVX2 bfloat16 narrowing of csrc/kernels/cpu_bf16_avx2.h against
// the scalar reference of cpu_types.h (store<bf16_t>: round to nearest even,
// NaN quieted) on every one of the 2^32 float bit patterns. Run lengths vary
// so the 16-value body, the 8-value step and the scalar tail all occur.
// Prints the number of mismatches and exits non-zero on any.
#include <cstdio>
#include <cstring>
#include <vector>

#include "cpu_bf16_avx2.h"

using namespace fusedbn;

__attribute__((target("avx2"), noinline)) void narrow(const float* s, bf16_t* d, int64_t n) {
  bf16_narrow_avx2(s, d, n);
}

int main() {
  const int64_t chunk = int64_t(1) << 16;
  std::vector<float> src(chunk);
  std::vector<bf16_t> ref(chunk), got(chunk);
  unsigned long long bad = 0;
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
    for (int64_t o = 0; o < chunk; o += run)
      narrow(src.data() + o, got.data() + o, std::min(run, chunk - o));
    for (int64_t k = 0; k < chunk; ++k) bad += got[k].bits != ref[k].bits;
  }
  std::printf("narrow avx2: %llu mismatches of 2^32\n", bad);
  return bad ? 1 : 0;
}
