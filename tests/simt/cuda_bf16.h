// SIMT emulation layer: __nv_bfloat16 with the explicit conversions only
// (see cuda_fp16.h). Round to nearest even, NaN kept.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  unsigned short __x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = uint32_t(h.__x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  __nv_bfloat16 r;
  if ((x & 0x7fffffffu) > 0x7f800000u)
    r.__x = static_cast<unsigned short>((x >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  else
    r.__x = static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  return r;
}
