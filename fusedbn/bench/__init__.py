"""Self-check and benchmark of fusedbn against eager PyTorch: ``python -m fusedbn.bench``.

The run, in order (everything on stdout is markdown; progress goes to stderr):

1. **Header** (``machine.py``): command line, git commit, machine (CPU model,
   cores, torch version and thread count, the CPU ISA fusedbn dispatches to,
   last-level cache, GPU), date.
2. **Self-check** (``check.py``) on small shapes, float32/bfloat16, both
   layouts, every activation: the fusedbn module against eager
   ``nn.BatchNorm2d`` + the activation -- output, input/weight/bias gradients
   (training and eval), running statistics and ``num_batches_tracked``. One
   PASS/FAIL line per (device, dtype, layout, activation); any FAIL ends the
   run with exit status 1 before anything is timed.
3. **Benchmark** (``run.py``) on each device (CPU, and CUDA when available)
   over ResNet-50 BatchNorm shapes x layouts x dtypes x activations x modes:
   the contenders and modes of ``contenders.py``, timed as ``timing.py`` says,
   bandwidth under the pass model of ``passes.py``; tables, CSV and plot from
   ``report.py``.
4. **Memory report** (``memory.py``): autograd-saved bytes and peak memory of
   one training step of a small ResNet-like stack (conv3x3 -> BN -> ReLU
   blocks), fusedbn vs eager.

The command line is ``cli.py``; shared settings and input generation
``common.py``.
"""
from .cli import main

__all__ = ["main"]
