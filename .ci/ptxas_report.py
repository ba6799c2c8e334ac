"""Registers and spills of every CUDA kernel, from a build log made with
NVCC_APPEND_FLAGS="-Xptxas -v" (.ci/cuda_build.sh). The data kernels are
launched with __launch_bounds__(256, 2) (cuda_kernels.cuh: kMinBlocks), so
two blocks must fit an SM: at most 128 registers. Prints the heaviest
kernels and every spill; fails when a kernel needs more than 128 registers
or the log holds no kernel at all."""
import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'\n"
                   r"ptxas info\s+: Function properties for \S+\n\s*(\d+) bytes stack frame, "
                   r"(\d+) bytes spill stores, (\d+) bytes spill loads\n"
                   r"ptxas info\s+: Used (\d+) registers")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return [re.sub(r"\(.*", "", d).replace("fusedbn::", "") for d in out.stdout.splitlines()]


def main(path):
    with open(path) as f:
        log = f.read()
    rows = [(int(regs), int(st), name, arch) for name, arch, _, st, _, regs in ENTRY.findall(log)]
    if not rows:
        sys.exit(f"ptxas_report: no kernel in {path} (was -Xptxas -v passed?)")
    names = demangle([r[2] for r in rows])
    rows = sorted(((r[0], r[1], n, r[3]) for r, n in zip(rows, names)), reverse=True)
    spills = [r for r in rows if r[1] > 0]
    print(f"ptxas_report: {len(rows)} kernels, {len(spills)} spill; heaviest:")
    for regs, st, name, arch in rows[:5]:
        print(f"  {regs:4d} registers  {arch}  {name}")
    for regs, st, name, arch in spills:
        print(f"  spill {st:4d} bytes  {regs:4d} registers  {arch}  {name}")
    over = [r for r in rows if r[0] > 128]
    if over:
        sys.exit(f"ptxas_report: {len(over)} kernels need more than 128 registers "
                 f"(two blocks of 256 no longer fit an SM)")


if __name__ == "__main__":
    main(sys.argv[1])
