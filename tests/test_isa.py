"""The CPU kernels exist for AVX-512, AVX2 and the x86-64 baseline, picked
at run time; FUSEDBN_CPU_ISA=baseline|avx2 caps the choice (read once per
process, so each capped run is its own subprocess). Every copy must compute
the same results as the default choice made in this process."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedbn  # noqa: F401
from helpers import ROOT, seed

# Odd channel and spatial sizes exercise the vector loops' tails; the larger
# one fills whole vectors. "columns" has planes of 81 values in two chunks
# of channels (12 and 9): the copies' thresholds for short planes as columns
# differ there (the backward takes them below 128 values on AVX-512, 64 on
# AVX2).
# (name, shape)
SHAPES = [("odd", (2, 5, 3, 7)), ("wide", (2, 19, 4, 8)), ("columns", (3, 21, 9, 9))]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=8e-3, atol=1e-3),
       "float16": dict(rtol=1e-3, atol=1e-4)}

# Runs in this process and, unchanged, in the subprocesses.
COMPUTE = textwrap.dedent("""
    import torch
    import fusedbn

    def compute(inputs):
        results = {}
        for key, (x, g, w, b, rm, rv) in inputs.items():
            _, _, dtype_name, layout, activation, mode = key.split("|")
            training = mode == "train"
            kwargs = {"negative_slope": 0.1} if activation == "leaky_relu" else {"alpha": 0.7}
            xi = x.clone().requires_grad_()
            if layout == "channels_last":
                xi = x.contiguous(memory_format=torch.channels_last).detach().requires_grad_()
            wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
            rmi, rvi = rm.clone(), rv.clone()
            out = fusedbn.batch_norm_act(xi, rmi, rvi, wi, bi, training, 0.1, 1e-5,
                                         activation, **kwargs)
            out.backward(g)
            results[key] = [out.detach().contiguous(), xi.grad.contiguous(), wi.grad, bi.grad,
                            rmi, rvi]
        return results
""")

SCRIPT = COMPUTE + textwrap.dedent("""
    import sys
    inputs = torch.load(sys.argv[1])
    torch.save({"isa": fusedbn.cpu_isa(), "results": compute(inputs)}, sys.argv[2])
""")


def _inputs():
    inputs = {}
    for shape_name, shape in SHAPES:
        for dtype_name, dtype in DTYPES.items():
            for layout in ("contiguous", "channels_last"):
                for activation in ("relu", "leaky_relu", "elu"):
                    for mode in ("train", "eval"):
                        key = "|".join(("isa", shape_name, dtype_name, layout, activation, mode))
                        seed(key)
                        C = shape[1]
                        x = (torch.randn(shape) * 1.5 + 0.5).to(dtype)
                        g = torch.randn(shape).to(dtype)
                        # Parameters in float32 with half inputs (autocast) on
                        # "eval" cases, in the input's dtype on "train" ones.
                        pdt = dtype if mode == "train" else torch.float32
                        w = (torch.rand(C) + 0.5).to(pdt)
                        b = torch.randn(C).to(pdt)
                        rm = (torch.randn(C) * 0.3).to(pdt)
                        rv = (torch.rand(C) + 0.5).to(pdt)
                        inputs[key] = (x, g, w, b, rm, rv)
    return inputs


@pytest.fixture(scope="module")
def inputs_and_reference():
    namespace = {}
    exec(compile(COMPUTE, "isa_compute", "exec"), namespace)
    inputs = _inputs()
    return inputs, namespace["compute"](inputs)


ISAS = ["baseline", "avx2", "avx512"]


def _best_isa():
    """The best copy this CPU can run, from /proc/cpuinfo (None if absent)."""
    if not os.path.exists("/proc/cpuinfo"):
        return None
    with open("/proc/cpuinfo") as f:
        flags = set(f.read().split())
    if not {"avx2", "fma", "f16c"} <= flags:
        return "baseline"
    return "avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else "avx2"


def _capped(best, cap):
    return cap if cap in ISAS and ISAS.index(cap) < ISAS.index(best) else best


def test_cpu_isa_names_the_best_copy():
    """fusedbn.cpu_isa() says which copy of the CPU kernels runs: the best
    this CPU has unless FUSEDBN_CPU_ISA caps it."""
    import fusedbn
    best = _best_isa()
    if best is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert fusedbn.cpu_isa() == _capped(best, os.environ.get("FUSEDBN_CPU_ISA"))


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_capped_isa_matches_default(isa, inputs_and_reference, tmp_path):
    inputs, reference = inputs_and_reference
    in_path, out_path, script = tmp_path / "in.pt", tmp_path / "out.pt", tmp_path / "run.py"
    torch.save(inputs, in_path)
    script.write_text(SCRIPT)
    env = dict(os.environ, FUSEDBN_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(script), str(in_path), str(out_path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = torch.load(out_path)
    # The cap took effect (a cap only lowers the choice).
    best = _best_isa()
    if best is not None:
        assert saved["isa"] == _capped(best, isa), \
            f"FUSEDBN_CPU_ISA={isa} ran the {saved['isa']} kernels on a {best} CPU"
    results = saved["results"]
    assert results.keys() == reference.keys()
    names = ("out", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")
    failures = []
    for key in reference:
        dtype_name = key.split("|")[2]
        for name, got, want in zip(names, results[key], reference[key]):
            assert got.dtype == want.dtype and got.shape == want.shape, (key, name)
            # float32 results (parameters' gradients and stats of float32
            # parameters) get float32's tolerance whatever the input dtype.
            tol = TOL["float32"] if got.dtype == torch.float32 else TOL[dtype_name]
            if not torch.allclose(got.float(), want.float(), **tol):
                diff = (got.float() - want.float()).abs().max().item()
                failures.append(f"{key} {name}: max diff {diff:.3g}")
    assert not failures, f"FUSEDBN_CPU_ISA={isa} differs from the default:\n" + "\n".join(
        failures)
