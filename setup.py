"""Build of fusedbn's C++ (and, where available, CUDA) extension.

FUSEDBN_CUDA=1 forces the CUDA build, FUSEDBN_CUDA=0 forbids it; unset, CUDA
is built when torch has CUDA and a CUDA toolkit (nvcc and its headers) is
found. Build with `pip install --no-build-isolation .` so the extension
compiles against the torch already installed (see README).
"""
import glob
import os
import shutil
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The CUDA toolkit's folder: CUDA_HOME / CUDA_PATH when set, else the
    folder of the nvcc on PATH. That nvcc may be a wrapper script outside the
    toolkit (torch would then guess its parent folder and miss the headers):
    ask it where its toolkit is."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        try:
            # A dry run prints the toolkit nvcc runs from ("#$ TOP=...").
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    candidates.append(os.path.normpath(line.split("=", 1)[1].strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if usable_toolkit(home):
            return home
    return None


def usable_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime_api.h"))


def want_cuda():
    flag = os.environ.get("FUSEDBN_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    import torch

    home = find_cuda_home()
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} has no CUDA"
    elif not usable_toolkit(home):
        problem = ("no CUDA toolkit found (nvcc with include/cuda_runtime_api.h; set CUDA_HOME)"
                   if home is None else f"CUDA_HOME={home} has no bin/nvcc or "
                   "include/cuda_runtime_api.h")
    if problem:
        if flag in ("1", "on", "true", "yes"):
            raise RuntimeError(f"FUSEDBN_CUDA=1 but {problem}")
        if torch.version.cuda is not None:
            print(f"fusedbn: building for CPU only: {problem}")
        return False
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a GPU to ask, torch's arch detection fails: build for the
        # Ampere and Hopper data-center GPUs.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return True


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


WITH_CUDA = want_cuda()
from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is settled)

# The CPU kernel copies' units (two per instruction set, cpu_isa.h) first,
# longest first: ninja starts the jobs of a fresh build in this order, so the
# short ones fill in at the end. The forward halves are the longer, the
# baseline copy's (the only one with float64) the longest: the six took 36
# minutes of CPU here (AVX2 EPYC, g++ 12).
sources = [f"csrc/kernels/cpu_isa_{isa}_{half}.cpp" for half in ("forward", "backward")
           for isa in ("baseline", "avx512", "avx2")] + [
    "csrc/module.cpp", "csrc/ops.cpp", "csrc/glue.cpp", "csrc/autograd.cpp",
    "csrc/kernels/cpu_dispatch.cpp"] + rel("csrc/cpu/*.cpp")
define_macros = []
# FUSEDBN_CPU_ISAS (e.g. "baseline"): which copies of the CPU kernels to
# build besides the baseline one (default all: baseline, avx2, avx512); the
# others are left out and never chosen at run time. "none" builds no CPU
# kernels at all: the CPU ops then raise. CI's CUDA build check uses it: the
# CPU kernels are torch-free, and its test stage builds all three copies.
_isas = os.environ.get("FUSEDBN_CPU_ISAS", "baseline,avx2,avx512").replace(" ", "").split(",")


def drop_copy(isa):
    for half in ("forward", "backward"):
        sources.remove(f"csrc/kernels/cpu_isa_{isa}_{half}.cpp")


for _isa in ("avx2", "avx512"):
    if _isa not in _isas:
        drop_copy(_isa)
        define_macros.append((f"FUSEDBN_NO_{_isa.upper()}", None))
if _isas == ["none"]:
    drop_copy("baseline")
    define_macros.append(("FUSEDBN_NO_CPU_KERNELS", None))
# -fno-trapping-math: no code here reads the floating-point exception flags,
# and without it GCC keeps `y > 0 ? y : y * slope` (any select whose arm does
# float arithmetic) as a branch, so such loops stay scalar.
# -g0: Python's default flags ask for debug info, which for the kernel
# templates' thousands of instantiations costs compile time and 150 MB of
# objects per instruction set.
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-g0"]
Extension = cpp_extension.CppExtension
extra_compile_args = {"cxx": cxx_flags}
if WITH_CUDA:
    Extension = cpp_extension.CUDAExtension
    # Torch-free kernels (csrc/kernels/*.cu) and their ATen glue (csrc/cuda/).
    sources += rel("csrc/kernels/*.cu") + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
    # One .cu per dtype (cuda_kernels_<dtype>.cu), compiled as separate jobs:
    # --threads compiles each one's GPU targets in parallel, --split-compile
    # optimizes its kernels in parallel (0: one
    # thread per CPU).
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "--threads", "4",
                                  "--split-compile", "0"]
    define_macros.append(("FUSEDBN_WITH_CUDA", None))

setup(
    ext_modules=[
        Extension(
            "fusedbn._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
