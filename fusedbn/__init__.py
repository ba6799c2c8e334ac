"""fusedbn: BatchNorm fused with its activation, forward and backward.

    import fusedbn
    y = fusedbn.batch_norm_act(x, running_mean, running_var, weight, bias,
                               training=True, activation="relu")
    bn = fusedbn.BatchNormReLU2d(64)   # drop-in for nn.BatchNorm2d + nn.ReLU
"""
import torch  # noqa: F401  (loads libtorch, which the extension links against)

from . import _C  # noqa: F401  (registers the torch.ops.fusedbn operators)
from ._C import cpu_isa  # "avx512" | "avx2" | "baseline": the CPU kernels (float64: baseline)
from . import ops  # noqa: F401  (fake kernels and autograd for them)
from . import diagnostics  # noqa: F401
from .convert import Fusion, convert, unconvert
from .distributed import SyncBatchNormAct
from .functional import ACTIVATIONS, ORDERS, batch_norm_act
from .modules import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    BatchNormSiLU1d,
    BatchNormSiLU2d,
    BatchNormSiLU3d,
)


def _version():
    """pyproject.toml's [project] version: from the installed distribution's
    metadata, else (an in-tree checkout that was never installed) from the
    pyproject.toml next to the package."""
    from importlib import metadata
    import os
    import re

    try:
        return metadata.version("fusedbn")
    except metadata.PackageNotFoundError:
        pass
    table = None
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "pyproject.toml"), encoding="utf-8") as f:
            for line in f:
                header = re.match(r"\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
                if header:
                    table = header.group(1).strip()
                    continue
                m = re.match(r'\s*version\s*=\s*"([^"]+)"', line)
                if m and table == "project":
                    return m.group(1)
    except OSError:
        pass
    return "0+unknown"


__version__ = _version()
del _version

__all__ = [
    "cpu_isa",
    "ACTIVATIONS",
    "ORDERS",
    "diagnostics",
    "batch_norm_act",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "BatchNormSiLU1d",
    "BatchNormSiLU2d",
    "BatchNormSiLU3d",
    "SyncBatchNormAct",
    "Fusion",
    "convert",
    "unconvert",
]
