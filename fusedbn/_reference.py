"""The activations in Python, as torch.nn.functional defines them: the one
reference the Python side uses (the double backward in ``ops.py``, ``convert``'s
unfused fallback, the benchmark's eager contender; the kernels have theirs in
csrc/kernels/activations.h).

An activation is a name and its parameters, passed by keyword everywhere
(``**params``; the defaults are ``PARAMS``):

- ``identity``, ``relu``, ``silu``, ``hardswish``, ``hardsigmoid``, ``mish``;
- ``leaky_relu`` (``negative_slope``), ``elu`` (``alpha``);
- ``hardtanh`` (``min_val``, ``max_val``) and ``relu6`` (hardtanh from 0 to 6);
- ``gelu`` (``approximate``: ``"none"``, the erf form, or ``"tanh"``).

Derivatives at the kinks follow PyTorch: relu'(0) = 0, leaky_relu'(0) =
negative_slope, elu'(0) = alpha; hardtanh's is 0 at min_val and max_val;
hardswish's is 0 at or below -3, x / 3 + 1/2 strictly inside (-3, 3), 1 at or
above 3; hardsigmoid's 1/6 strictly inside (-3, 3), 0 elsewhere.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "relu6", "hardtanh", "silu", "hardswish",
               "hardsigmoid", "gelu", "mish")

# Every activation parameter and its default (the torch.nn defaults).
PARAMS = {"negative_slope": 0.01, "alpha": 1.0, "min_val": -1.0, "max_val": 1.0,
          "approximate": "none"}

# The parameters each activation reads.
USES = {"leaky_relu": ("negative_slope",), "elu": ("alpha",), "hardtanh": ("min_val", "max_val"),
        "gelu": ("approximate",)}

GELU_APPROXIMATIONS = ("none", "tanh")


def acc_dtype(dtype):
    """The accumulation dtype of the statistics: float64 for float64 input,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def params_of(obj):
    """The activation parameters of a module (or any object) carrying them
    as attributes, with the defaults for those it lacks."""
    return {k: getattr(obj, k, v) for k, v in PARAMS.items()}


def used_params(name, **params):
    """Only the parameters ``name`` reads (for reprs and reports)."""
    return {k: params.get(k, PARAMS[k]) for k in USES.get(name, ())}


def bounds(name, **params):
    """(lo, hi) of hardtanh / relu6 as floats."""
    if name == "relu6":
        return 0.0, 6.0
    return float(params.get("min_val", -1.0)), float(params.get("max_val", 1.0))


def functional(name, **params):
    """``(fn, args, kwargs)`` such that ``fn(y, *args, **kwargs)`` is ``name``
    applied to y (a torch.nn.functional call; identity has none and raises)."""
    p = {**PARAMS, **params}
    table = {
        "relu": (F.relu, (), {}),
        "leaky_relu": (F.leaky_relu, (p["negative_slope"],), {}),
        "elu": (F.elu, (p["alpha"],), {}),
        "relu6": (F.relu6, (), {}),
        "hardtanh": (F.hardtanh, (p["min_val"], p["max_val"]), {}),
        "silu": (F.silu, (), {}),
        "hardswish": (F.hardswish, (), {}),
        "hardsigmoid": (F.hardsigmoid, (), {}),
        "gelu": (F.gelu, (), {"approximate": p["approximate"]}),
        "mish": (F.mish, (), {}),
    }
    if name not in table:
        raise ValueError(f"fusedbn: no functional form for activation {name!r}")
    return table[name]


def activation(y, name, **params):
    """``name`` applied to y, as torch.nn.functional computes it (differentiable)."""
    if name == "identity":
        return y
    fn, args, kwargs = functional(name, **params)
    return fn(y, *args, **kwargs)


def activation_grad(dy, y, name, **params):
    """dy times the derivative of ``name`` at the pre-activation y, with torch
    ops (differentiable again: the double backward differentiates through it),
    with PyTorch's values at the kinks."""
    p = {**PARAMS, **params}
    zero = torch.zeros_like(dy)
    if name == "identity":
        return dy
    if name == "relu":
        return torch.where(y > 0, dy, zero)
    if name == "leaky_relu":
        return torch.where(y > 0, dy, dy * p["negative_slope"])
    if name == "elu":
        return torch.where(y > 0, dy, dy * p["alpha"] * torch.exp(torch.clamp(y, max=0)))
    if name in ("relu6", "hardtanh"):
        lo, hi = bounds(name, **p)
        return torch.where((y <= lo) | (y >= hi), zero, dy)
    if name == "silu":
        s = torch.sigmoid(y)
        return dy * s * (1 + y * (1 - s))
    if name == "hardswish":
        return torch.where(y <= -3, zero, torch.where(y < 3, dy * (y / 3 + 0.5), dy))
    if name == "hardsigmoid":
        # ATen's constant: 1/6 rounded to float32, in every dtype.
        return torch.where((y > -3) & (y < 3), dy * 0.1666666716337204, zero)
    if name == "gelu" and p["approximate"] == "tanh":
        beta, kappa = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(beta * (y + kappa * y * y * y))
        return dy * (0.5 * (1 + t) + 0.5 * y * (1 - t * t) * beta * (1 + 3 * kappa * y * y))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(y * math.sqrt(0.5)))
        pdf = torch.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)
        return dy * (cdf + y * pdf)
    if name == "mish":
        t = torch.tanh(F.softplus(y))
        return dy * (t + y * torch.sigmoid(y) * (1 - t * t))
    raise ValueError(f"fusedbn: unknown activation {name!r}")


def activation_module(name, inplace=False, **params):
    """The torch.nn module computing ``name`` (``nn.Identity`` for identity)."""
    p = {**PARAMS, **params}
    if name == "identity":
        return nn.Identity()
    table = {
        "relu": lambda: nn.ReLU(inplace=inplace),
        "leaky_relu": lambda: nn.LeakyReLU(p["negative_slope"], inplace=inplace),
        "elu": lambda: nn.ELU(p["alpha"], inplace=inplace),
        "relu6": lambda: nn.ReLU6(inplace=inplace),
        "hardtanh": lambda: nn.Hardtanh(p["min_val"], p["max_val"], inplace=inplace),
        "silu": lambda: nn.SiLU(inplace=inplace),
        "hardswish": lambda: nn.Hardswish(inplace=inplace),
        "hardsigmoid": lambda: nn.Hardsigmoid(inplace=inplace),
        "gelu": lambda: nn.GELU(approximate=p["approximate"]),
        "mish": lambda: nn.Mish(inplace=inplace),
    }
    if name not in table:
        raise ValueError(f"fusedbn: unknown activation {name!r}")
    return table[name]()
