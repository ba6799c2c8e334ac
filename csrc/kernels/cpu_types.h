// Element types of the CPU kernels: float and double as they are, bfloat16 and
// float16 as 16-bit storage converted to float on load and back on store.
#pragma once
#include <cstdint>
#include <cstring>

namespace fusedbn {

struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

inline __attribute__((always_inline)) float load(float v) { return v; }
inline __attribute__((always_inline)) double load(double v) { return v; }
inline __attribute__((always_inline)) float load(bf16_t v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __attribute__((always_inline)) float load(fp16_t v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}

template <typename T> inline __attribute__((always_inline)) T store(acc_t<T> v) { return v; }
template <> inline __attribute__((always_inline)) bf16_t store<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  // Round to nearest even; NaN stays a (quiet) NaN instead of rounding to inf.
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16_t{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
}
template <> inline __attribute__((always_inline)) fp16_t store<fp16_t>(float f) {
  _Float16 h = static_cast<_Float16>(f);
  fp16_t r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}

}  // namespace fusedbn
