// The AVX2 copy of the CPU kernels, backward half (cpu_isa.h).
#define FUSEDBN_ISA_AVX2
#define FUSEDBN_CPU_HALF_BACKWARD
#include "cpu_isa.h"
