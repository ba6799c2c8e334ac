"""Build of fusedbn's C++ (and, where available, CUDA) extension.

FUSEDBN_CUDA=1 forces the CUDA build, FUSEDBN_CUDA=0 forbids it; unset, CUDA
is built when torch has CUDA and nvcc is found. Build with
`pip install --no-build-isolation .` so the extension compiles against the
torch already installed (see README).
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    flag = os.environ.get("FUSEDBN_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    available = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if flag in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError("FUSEDBN_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    return available


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


sources = ["csrc/ops.cpp", "csrc/glue.cpp", "csrc/autograd.cpp"] + rel("csrc/cpu/*.cpp") + rel("csrc/kernels/*.cpp")
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
define_macros = []
Extension = cpp_extension.CppExtension
extra_compile_args = {"cxx": cxx_flags}
if want_cuda():
    Extension = cpp_extension.CUDAExtension
    # Torch-free kernels (csrc/kernels/*.cu) and their ATen glue (csrc/cuda/).
    sources += rel("csrc/kernels/*.cu") + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
    # --threads: the one .cu holds every kernel; compile its GPU targets in parallel.
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "--threads", "4"]
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
