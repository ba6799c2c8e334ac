"""The activations in Python, as torch.nn.functional defines them: the one
reference the Python side uses (the double backward in ``ops.py``, ``convert``'s
unfused fallback, the benchmark's eager contender; the kernels have theirs in
csrc/kernels/activations.h).

Activations: ``identity``, ``relu``, ``leaky_relu`` (``negative_slope``),
``elu`` (``alpha``). Derivatives at the kink follow PyTorch: the slope-1 branch
is taken only where the pre-activation is > 0 (relu'(0) = 0, leaky_relu'(0) =
negative_slope, elu'(0) = alpha).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def acc_dtype(dtype):
    """The accumulation dtype of the statistics: float64 for float64 input,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def functional(activation, negative_slope=0.01, alpha=1.0):
    """``(fn, args)`` such that ``fn(y, *args)`` is ``activation`` applied to y
    (a torch.nn.functional call; identity has none and raises here)."""
    if activation == "relu":
        return F.relu, ()
    if activation == "leaky_relu":
        return F.leaky_relu, (negative_slope,)
    if activation == "elu":
        return F.elu, (alpha,)
    raise ValueError(f"fusedbn: no functional form for activation {activation!r}")


def activation(y, name, negative_slope=0.01, alpha=1.0):
    """``name`` applied to y, as torch.nn.functional computes it (differentiable)."""
    if name == "identity":
        return y
    fn, args = functional(name, negative_slope, alpha)
    return fn(y, *args)


def activation_grad(dy, y, name, negative_slope=0.01, alpha=1.0):
    """dy times the derivative of ``name`` at the pre-activation y, with torch
    ops (differentiable again: the double backward differentiates through it)."""
    if name == "identity":
        return dy
    if name == "relu":
        return torch.where(y > 0, dy, torch.zeros_like(dy))
    if name == "leaky_relu":
        return torch.where(y > 0, dy, dy * negative_slope)
    if name == "elu":
        return torch.where(y > 0, dy, dy * alpha * torch.exp(torch.clamp(y, max=0)))
    raise ValueError(f"fusedbn: unknown activation {name!r}")


def activation_module(name, negative_slope=0.01, alpha=1.0, inplace=False):
    """The torch.nn module computing ``name`` (``nn.Identity`` for identity)."""
    if name == "identity":
        return nn.Identity()
    if name == "relu":
        return nn.ReLU(inplace=inplace)
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope, inplace=inplace)
    if name == "elu":
        return nn.ELU(alpha, inplace=inplace)
    raise ValueError(f"fusedbn: unknown activation {name!r}")
