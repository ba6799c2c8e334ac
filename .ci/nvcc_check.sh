#!/usr/bin/env bash
# Compiles the torch-free CUDA kernels (csrc/kernels/*.cu) for
# sm_80 and sm_90 with every warning an error, so kernel code can be checked on
# machines without a GPU or a CUDA build of torch. The defines are the ones
# torch's CUDAExtension passes, so implicit half/bfloat16 conversions fail
# here as they would in the real build. Skips (exit 0) only when nvcc is absent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  echo "nvcc_check: nvcc not found; skipping the CUDA compile check"
  exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "nvcc_check: $("$NVCC" --version | tail -n 1)"
for cu in "$ROOT"/csrc/kernels/*.cu; do
"$NVCC" -c "$cu" -o "$TMP/$(basename "$cu" .cu).o" \
  -I "$ROOT/csrc" \
  -std=c++17 -O3 --expt-relaxed-constexpr --threads 2 \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
  -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_90,code=sm_90 \
  -Werror all-warnings \
  -Xcompiler -Wall,-Wextra,-Werror \
  "$@"
done
echo "nvcc_check: OK (sm_80, sm_90, no warnings)"
