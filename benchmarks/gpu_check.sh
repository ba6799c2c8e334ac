#!/usr/bin/env bash
# The first-GPU check, in one command (about 10 minutes, estimated, on an H100/H200
# with torch+CUDA, nvcc and ninja; nothing is downloaded):
#   1. build fusedbn for this GPU's architecture only;
#   2. the cuda half of the test suite (pytest -m cuda: every test that takes
#      the device fixture of tests/conftest.py, run on CUDA, plus
#      tests/test_cpu_cuda_agreement.py: CUDA vs eager on the GPU and vs
#      fusedbn's CPU kernels), in two runs that each fit the 300 s a step
#      gets: the agreement matrix and the randomized differential cases, then
#      everything else (~4 minutes together, estimated, not yet measured; the
#      heaviest single items are the torch.compile tests, which build Triton
#      kernels with inductor). tests/test_cuda_simt.py is the CPU emulation of
#      the kernels: not part of it;
#   3. compute-sanitizer memcheck and racecheck on a small representative run;
#   4. python -m fusedbn.bench on CUDA at the ResNet-50 shapes, both layouts,
#      float32 and bfloat16, against eager and torch.compile (CUDA events,
#      inputs cycled through a pool >= 2x L2, achieved GB/s vs a device copy);
#   5. benchmarks/results/<date>-cuda-<gpu>-bench.md with device, commit, commands, tables
#      (and a copy under $OUT when the device tool provides it).
# Without a GPU it prints what it would run and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."

have_gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo none)
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 9.0)
date_=$(date -u +%Y-%m-%d)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
report="benchmarks/results/${date_}-cuda-${gpu}-bench.md"

steps=(
  "FUSEDBN_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=\$(nproc) pip install --no-build-isolation --no-deps -e ."
  "python -m pytest -q -m cuda tests/test_cpu_cuda_agreement.py tests/test_differential.py"
  "python -m pytest -q -m cuda --ignore=tests/test_cuda_simt.py --ignore=tests/test_cpu_cuda_agreement.py --ignore=tests/test_differential.py tests"
  "compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_run.py"
  "compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitizer_run.py"
  "python -m fusedbn.bench --device cuda --shapes resnet50 --dtypes float32,bfloat16 --layouts contiguous,channels_last --activations relu --modes forward-train,forward+backward,eval,backward --compile --rounds 5 --no-activity --md $report --csv ${report%.md}.csv"
)

if [[ "$have_gpu" != 1 ]]; then
  echo "gpu_check: no CUDA device here; on one it would run, in order:"
  for s in "${steps[@]}"; do echo "  $s"; done
  exit 0
fi

status=0
{
  echo "# fusedbn on $gpu ($date_)"
  echo
  echo "- commit: $commit"
  echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- torch $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), $(nvcc --version | tail -1)"
  echo "- command: benchmarks/gpu_check.sh"
  echo
} > "$report"
for s in "${steps[@]}"; do
  echo "== $s" | tee -a "$report"
  start=$(date +%s)
  out=$(eval "timeout 300 $s" 2>&1)
  rc=$?
  echo "$out" | tail -40
  [[ $s == python\ -m\ fusedbn.bench* ]] || { echo '```'; echo "$out" | tail -15; echo '```'; } >> "$report"
  echo "exit $rc after $(( $(date +%s) - start )) s" | tee -a "$report"
  echo >> "$report"
  [[ $rc == 0 ]] || status=1
done
if [[ -n "${OUT:-}" ]]; then
  cp "$report" "${report%.md}.csv" "$OUT/" 2>/dev/null
fi
echo "gpu_check: report in $report (exit $status)"
exit $status
