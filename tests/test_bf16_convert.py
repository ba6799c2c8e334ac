"""The AVX-512 bfloat16 conversions (csrc/kernels/cpu_bf16_avx512.h) and the
AVX2 narrowing (cpu_bf16_avx2.h) agree bit for bit with the scalar reference
on every float, including NaN, infinities and denormals, which vcvtneps2bf16
alone would flush to zero."""
import pathlib
import shutil
import subprocess

import pytest

from helpers import cpu_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def run_check(tmp_path, name):
    """Builds tests/cpp/<name>.cpp, runs it, and returns its output (it must exit 0)."""
    exe = tmp_path / name
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{ROOT / 'csrc' / 'kernels'}",
                    str(ROOT / "tests" / "cpp" / f"{name}.cpp"), "-o", str(exe)], check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@needs_gxx
@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags(),
                    reason="needs an AVX-512 CPU")
def test_bf16_conversions_bit_exact(tmp_path):
    out = run_check(tmp_path, "bf16_convert_check")
    assert "narrow integer path: 0 mismatches" in out
    assert "widen: 0 mismatches" in out


@needs_gxx
@pytest.mark.skipif("avx2" not in cpu_flags(), reason="needs an AVX2 CPU")
def test_bf16_narrow_avx2_bit_exact(tmp_path):
    assert "narrow avx2: 0 mismatches of 2^32" in run_check(tmp_path, "bf16_avx2_check")
