// SIMT emulation layer: __half with the explicit conversions only (torch
// builds with __CUDA_NO_HALF_CONVERSIONS__, so the kernels may not rely on
// implicit ones: here there are none). Round to nearest even, NaN kept.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  unsigned short __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16;
  const uint32_t e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    if (m == 0) {
      bits = sign;
    } else {  // subnormal: m * 2^-24, exact in float
      float f = float(m) * 5.9604644775390625e-08f;
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  uint32_t h;
  if (ax > 0x7f800000u) {
    h = 0x7e00u | ((ax >> 13) & 0x3ffu);  // NaN stays a (quiet) NaN
  } else if (ax >= 0x47800000u) {
    h = 0x7c00u;  // >= 2^16 (and inf): inf; [65520, 65536) rounds up below
  } else if (ax < 0x38800000u) {  // below 2^-14: subnormal or zero
    if (ax <= 0x33000000u) {
      h = 0;  // <= 2^-25: rounds to 0 (the tie to even)
    } else {
      const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
      const uint32_t shift = 126 - e;  // 14..24
      uint32_t q = m >> shift;
      const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
      if (rem > half || (rem == half && (q & 1u))) ++q;
      h = q;
    }
  } else {
    h = (ax - 0x38000000u) >> 13;
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into inf
  }
  __half r;
  r.__x = static_cast<unsigned short>(sign | h);
  return r;
}
