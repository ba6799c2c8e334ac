#!/usr/bin/env bash
# The kernels alone for every activation: kernel_bench.cpp compiled once per
# activation functor (-DFUSEDBN_ONLY_ACT; parameters value-initialized, e.g.
# a slope of 0, which costs what any slope costs), then each build on the
# same shapes, float32, bfloat16 and float16, both layouts. Prints kernel_bench's
# table per activation, each row prefixed with the activation.
#
#   bash benchmarks/activation_sweep.sh [threads] [NxCxS ...]
#
# Why: every single-layer and model benchmark of issue 16 ran relu, and a
# change that left the backward of leaky_relu, hardtanh, elu, silu, gelu and
# mish scalar (2-7x slower) went unseen for four sessions. A row far above
# relu's (an activation with one compare should cost what relu costs) is the
# thing to look at. Builds take ~40 s each, two at a time; the machine must be
# otherwise quiet while the timings run.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
shift || true
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(8x512x49 64x256x196)
out=$(mktemp -d)
# Every activation functor activations.h defines, so a new one is swept too.
mapfile -t acts < <(sed -n 's/^struct \([A-Za-z0-9]*Act\) {$/\1/p' csrc/kernels/activations.h |
                    grep -vx IdentityAct)
build() {
  g++ -O3 -std=c++17 -fopenmp -fno-math-errno -fno-trapping-math -DFUSEDBN_ONLY_ACT="$1" \
    -Icsrc/kernels benchmarks/kernel_bench.cpp -o "$out/kb_$1"
}
for ((i = 0; i < ${#acts[@]}; i += 2)); do
  build "${acts[i]}" &
  if ((i + 1 < ${#acts[@]})); then build "${acts[i + 1]}"; fi
  wait
done
for a in "${acts[@]}"; do
  "$out/kb_$a" "$threads" "" "${shapes[@]}" | grep '^| [fb]' | sed "s/^/| ${a%Act} /"
done
rm -rf "$out"
