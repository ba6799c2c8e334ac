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


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags(),
                    reason="needs an AVX-512 CPU")
def test_bf16_conversions_bit_exact(tmp_path):
    exe = tmp_path / "bf16_convert_check"
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{ROOT / 'csrc' / 'kernels'}",
                    str(ROOT / "tests" / "cpp" / "bf16_convert_check.cpp"), "-o", str(exe)],
                   check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "narrow integer path: 0 mismatches" in proc.stdout
    assert "widen: 0 mismatches" in proc.stdout


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.skipif("avx2" not in cpu_flags(), reason="needs an AVX2 CPU")
def test_bf16_narrow_avx2_bit_exact(tmp_path):
    exe = tmp_path / "bf16_avx2_check"
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{ROOT / 'csrc' / 'kernels'}",
                    str(ROOT / "tests" / "cpp" / "bf16_avx2_check.cpp"), "-o", str(exe)],
                   check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "narrow avx2: 0 mismatches of 2^32" in proc.stdout
