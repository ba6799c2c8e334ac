// The AVX2 copy of the CPU kernels, forward half (cpu_isa.h).
#define FUSEDBN_ISA_AVX2
#define FUSEDBN_CPU_HALF_FORWARD
#include "cpu_isa.h"
