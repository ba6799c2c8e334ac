// One copy of the CPU kernels (cpu_kernels.h): the instruction set and the
// half (forward or backward) that the including cpu_isa_<isa>_<half>.cpp
// names. Each copy is built as two units so that a build's jobs are short:
// one unit per copy took 13 minutes of a core, and three of them on two
// cores left one core idle while the last one compiled.
//
// Shared headers come first, so their inline code stays baseline and
// identical in every copy; only what cpu_kernels.h defines gets the target
// below.
#if defined(FUSEDBN_ISA_AVX512) || defined(FUSEDBN_ISA_AVX2)
#include <immintrin.h>
#endif
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "activations.h"
#include "cpu_types.h"
#include "params.h"
#if defined(FUSEDBN_ISA_AVX512)
#include "cpu_bf16_avx512.h"
#elif defined(FUSEDBN_ISA_AVX2)
#include "cpu_bf16_avx2.h"
#endif

#pragma GCC push_options
#if defined(FUSEDBN_ISA_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define FUSEDBN_CPU_F16C 1
#define FUSEDBN_CPU_AVX512 1
#define FUSEDBN_CPU_ISA avx512
#elif defined(FUSEDBN_ISA_AVX2)
#pragma GCC target("avx2,fma,f16c")
#define FUSEDBN_CPU_F16C 1
#define FUSEDBN_CPU_AVX2 1
#define FUSEDBN_CPU_ISA avx2
#else
// x86-64 baseline (SSE2): no target pragma. The only copy with float64, the
// dtype of gradient checks rather than of training (cpu_dispatch.cpp): in
// the AVX2 and AVX-512 copies its kernels were a sixth of their object code,
// and the AVX2 copy ran relu no faster, silu at most 13% faster
// (32x64x56x56, 8x512x7x7).
#define FUSEDBN_CPU_FLOAT64 1
#define FUSEDBN_CPU_ISA baseline
#endif
#include "cpu_kernels.h"
#pragma GCC pop_options
