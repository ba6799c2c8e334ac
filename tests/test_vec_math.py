"""The vectorizable float math of csrc/kernels/vec_math.h: every function within
its documented ulp bound of the double libm function over a sweep of the float
bit patterns and the special values, built for the baseline ISA and for
AVX2+FMA (where GCC contracts into FMAs); and every loop over them reported
vectorized by GCC, for SSE2, AVX2 and AVX-512 alike."""
import pathlib
import re
import shutil
import subprocess

import pytest

from helpers import cpu_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "vec_math_check.cpp"
# The extension's flags (setup.py), so the code checked is the code shipped.
CXXFLAGS = ["-O3", "-fno-math-errno", "-std=c++17", f"-I{ROOT / 'csrc' / 'kernels'}"]
# The bounds documented in vec_math.h, and checked by vec_math_check.cpp itself.
BOUNDS = {"vexp": 1.0, "vexpm1": 1.6, "vlog1p": 1.0, "vtanh": 1.3, "verf": 1.4, "vsigmoid": 2.0}
ISAS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@needs_gxx
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_vec_math_accuracy(isa, tmp_path):
    if isa == "avx2" and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("needs an AVX2+FMA CPU")
    exe = tmp_path / "vec_math_check"
    subprocess.run(["g++", *CXXFLAGS, *ISAS[isa], str(SOURCE), "-o", str(exe)], check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, bound in BOUNDS.items():
        m = re.search(rf"^{name} +max ([0-9.]+) ulp \(bound ([0-9.]+)\).*special failures (\d+)",
                      proc.stdout, re.M)
        assert m, f"no result line for {name}:\n{proc.stdout}"
        assert float(m.group(2)) == bound, f"{name}: the C++ bound differs from {bound}"
        assert float(m.group(1)) <= bound and m.group(3) == "0", m.group(0)


@needs_gxx
@pytest.mark.parametrize("isa", list(ISAS))
def test_vec_math_loops_vectorize(isa):
    """Compile only (any CPU): GCC reports each VEC_LOOP vectorized."""
    lines = SOURCE.read_text().splitlines()
    first = next(i for i, s in enumerate(lines, 1) if s.startswith("VEC_LOOP("))
    last = next(i for i, s in enumerate(lines, 1) if s.startswith("// END_VEC_LOOPS"))
    loops = {i for i in range(first, last) if lines[i - 1].startswith("VEC_LOOP(")}
    proc = subprocess.run(["g++", *CXXFLAGS, *ISAS[isa], "-S", "-o", "/dev/null",
                           "-fopt-info-vec-optimized", str(SOURCE)],
                          capture_output=True, text=True, check=True)
    done = {int(m.group(1)) for m in
            re.finditer(r"vec_math_check\.cpp:(\d+):\d+: optimized: loop vectorized", proc.stderr)}
    assert loops and loops <= done, (sorted(loops - done), proc.stderr)
