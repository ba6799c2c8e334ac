// The x86-64 baseline copy of the CPU kernels, backward half (cpu_isa.h).
#define FUSEDBN_CPU_HALF_BACKWARD
#include "cpu_isa.h"
