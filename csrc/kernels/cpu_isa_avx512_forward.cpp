// The AVX-512 copy of the CPU kernels, forward half (cpu_isa.h).
#define FUSEDBN_ISA_AVX512
#define FUSEDBN_CPU_HALF_FORWARD
#include "cpu_isa.h"
