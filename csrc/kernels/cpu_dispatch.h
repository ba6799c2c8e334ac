// Entry points of the CPU kernels. Each forwards to the copy compiled for the
// best instruction set this CPU has (AVX-512, AVX2 + FMA, or x86-64 baseline);
// the environment variable FUSEDBN_CPU_ISA=avx512|avx2|baseline caps the choice.
#pragma once
#include "params.h"

namespace fusedbn {
namespace cpu {

// training: batch statistics into p.mean/p.invstd, running stats updated,
// output written. Eval: p.mean/p.invstd are read, output written.
void forward(const ForwardParams& p, bool training);
void backward(const BackwardParams& p);
const char* isa_name();

}  // namespace cpu
}  // namespace fusedbn
