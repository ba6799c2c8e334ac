"""fusedbn: BatchNorm fused with its activation, forward and backward.

    import fusedbn
    y = fusedbn.batch_norm_act(x, running_mean, running_var, weight, bias,
                               training=True, activation="relu")
    bn = fusedbn.BatchNormReLU2d(64)   # drop-in for nn.BatchNorm2d + nn.ReLU
"""
import torch  # noqa: F401  (loads libtorch, which the extension links against)

from . import _C  # noqa: F401  (registers the torch.ops.fusedbn operators)
from ._C import cpu_isa  # "avx512" | "avx2" | "baseline": the CPU kernels in use
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
)

__version__ = "0.1.0"

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
    "SyncBatchNormAct",
    "Fusion",
    "convert",
    "unconvert",
]
