// The x86-64 baseline copy of the CPU kernels, forward half (cpu_isa.h).
#define FUSEDBN_CPU_HALF_FORWARD
#include "cpu_isa.h"
