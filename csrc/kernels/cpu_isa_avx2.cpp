// The CPU kernels compiled for one instruction set (see cpu_kernels.h).
// Shared headers come first, so their inline code stays baseline and identical
// in every copy; only what cpu_kernels.h defines gets the target below.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "activations.h"
#include "cpu_bf16_avx2.h"
#include "cpu_types.h"
#include "params.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FUSEDBN_CPU_F16C 1
#define FUSEDBN_CPU_AVX2 1
#define FUSEDBN_CPU_ISA avx2
#include "cpu_kernels.h"
#pragma GCC pop_options
