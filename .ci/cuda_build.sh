#!/usr/bin/env bash
# Builds the complete CUDA extension -- the kernels and their ATen glue, as
# `pip install` builds it for a user with a CUDA torch -- against the CUDA 13
# build of torch in a venv of its own, for one arch, then loads it and checks
# that every op has CUDA and AutogradCUDA kernels. No GPU is needed. Skips
# (exit 0) only when nvcc is absent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v nvcc >/dev/null; then
  echo "cuda_build: nvcc not found; skipping the CUDA build check"
  exit 0
fi
VENV="${FUSEDBN_CUDA_VENV:-$ROOT/build/venv-cuda}"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  python -m venv "$VENV"
  # torch 2.14.1 (CUDA 13) is on this machine's disk: nothing is downloaded.
  "$PY" -m pip install -q torch==2.14.1 ninja setuptools numpy
fi
OUT="$ROOT/build/cuda"
rm -rf "$OUT/lib"
cd "$ROOT"
# One arch keeps the compile short; the default list (setup.py) is 8.0;9.0.
# ptxas reports every kernel's registers and spills (checked below). No CPU
# kernels: they are torch-free, and the test stage builds all three copies
# (setup.py: FUSEDBN_CPU_ISAS). The stage's time is nvcc on the four
# cuda_kernels_<dtype>.cu, two jobs at a time (MAX_JOBS=2): about 9 minutes,
# where one translation unit for every dtype took 25.
mkdir -p "$OUT"
rm -rf "$OUT/temp"  # a cached object would hide its kernels from the report
FUSEDBN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=2 \
  FUSEDBN_CPU_ISAS=none \
  NVCC_APPEND_FLAGS="-Xptxas -v" \
  "$PY" setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" \
  > "$OUT/build.log" 2>&1 || { tail -n 60 "$OUT/build.log"; exit 1; }
python "$ROOT/.ci/ptxas_report.py" "$OUT/build.log"
# The Python package (subpackages too) beside the CUDA build's _C.
tar -C fusedbn --exclude='*.so' --exclude=__pycache__ -cf - . | tar -C "$OUT/lib/fusedbn" -xf -
cd "$OUT/lib"
"$PY" - <<'PY'
import torch
import fusedbn

assert torch.version.cuda, "not a CUDA build of torch"
missing = []
for op in ("forward", "forward_", "backward"):
    # The computed dispatch table: an alias registration (Autograd) shows up
    # under each runtime key it covers.
    table = dict(line.split(": ", 1) for line in
                 torch._C._dispatch_dump_table(f"fusedbn::{op}").splitlines() if ": " in line)
    for key in ("CPU", "CUDA", "AutogradCPU", "AutogradCUDA"):
        if not table.get(key, "").startswith("registered at"):
            missing.append(f"fusedbn::{op} for {key} ({table.get(key, 'absent')})")
assert not missing, "no kernel: " + ", ".join(missing)
print(f"cuda_build: OK (torch {torch.__version__}, every op has CUDA and AutogradCUDA kernels)")
PY
