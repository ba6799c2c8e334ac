"""The functional form: ``batch_norm_act``, with the arguments of
``torch.nn.functional.batch_norm`` in its order, then the activation's."""
import numbers
from typing import Optional

import torch

from . import _C
from ._reference import ACTIVATIONS, GELU_APPROXIMATIONS

ORDERS = ("bn_act", "act_bn")


def check_activation(activation: str) -> None:
    """Raise TypeError/ValueError unless ``activation`` names a supported activation."""
    if not isinstance(activation, str):
        raise TypeError(
            f"fusedbn: activation must be a string, one of {ACTIVATIONS}, "
            f"got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fusedbn: unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def check_params(activation: str, negative_slope: float = 0.01, alpha: float = 1.0,
                 min_val: float = -1.0, max_val: float = 1.0, approximate: str = "none") -> None:
    """Raise TypeError/ValueError unless the activation's parameters are valid."""
    for name, value in (("negative_slope", negative_slope), ("alpha", alpha),
                        ("min_val", min_val), ("max_val", max_val)):
        _check_number(name, value)
    if activation == "hardtanh" and not min_val <= max_val:
        raise ValueError(f"fusedbn: hardtanh needs min_val <= max_val, got min_val={min_val}, "
                         f"max_val={max_val}")
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"fusedbn: approximate must be 'none' or 'tanh', got {approximate!r}")


def check_order(order: str) -> None:
    """Raise ValueError unless ``order`` is ``"bn_act"`` or ``"act_bn"``."""
    if order not in ORDERS:
        raise ValueError(f"fusedbn: unknown order {order!r}; expected 'bn_act' (act(bn(x))) "
                         "or 'act_bn' (bn(act(x)))")


# A constant of its arguments: torch.compile calls it while tracing instead
# of breaking the graph at the C function.
@torch.compiler.assume_constant_result
def is_invertible(activation: str, negative_slope: float, alpha: float) -> bool:
    """Whether in-place mode can recover the pre-activation from the output
    (asks the C++ rule, csrc/kernels/activations.h: is_invertible)."""
    return _C.is_invertible(activation, float(negative_slope), float(alpha))


def _check_number(name, value, allow_none=False):
    # float and int first: the numbers.Real check (an ABC) costs half a
    # microsecond, seven times per call of a small layer.
    if type(value) is float or type(value) is int or (value is None and allow_none):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = "a number or None" if allow_none else "a number"
        raise TypeError(f"fusedbn: {name} must be {what}, got {type(value).__name__}")


def batch_norm_act(input: torch.Tensor, running_mean: Optional[torch.Tensor],
                   running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, training: bool = False,
                   momentum: Optional[float] = 0.1, eps: float = 1e-5, activation: str = "relu",
                   negative_slope: float = 0.01, alpha: float = 1.0, *,
                   residual: Optional[torch.Tensor] = None, inplace: bool = False,
                   num_batches_tracked: Optional[torch.Tensor] = None, order: str = "bn_act",
                   activity: Optional[torch.Tensor] = None,
                   activity_momentum: float = 0.1, min_val: float = -1.0, max_val: float = 1.0,
                   approximate: str = "none") -> torch.Tensor:
    """BatchNorm followed by an activation, in one fused kernel.

    Same semantics as ``F.batch_norm(...)`` followed by the activation:
    training uses batch statistics and, when ``running_mean``/``running_var``
    are given, updates them in place (``momentum=None`` gives the cumulative
    average, which needs ``num_batches_tracked``; that tensor is incremented in
    training when given, as ``nn.BatchNorm`` does); eval uses the running
    statistics.

    activation: ``"identity"``, ``"relu"``, ``"leaky_relu"`` (``negative_slope``),
    ``"elu"`` (``alpha``), ``"relu6"``, ``"hardtanh"`` (``min_val``, ``max_val``),
    ``"silu"``, ``"hardswish"``, ``"hardsigmoid"``, ``"gelu"`` (``approximate``:
    ``"none"`` or ``"tanh"``) or ``"mish"``, with torch.nn.functional's
    semantics, derivatives at the kinks included.

    residual: optional tensor of the input's shape and dtype added before the
    activation, ``act(bn(input) + residual)`` (ResNet's bn3 -> + identity ->
    ReLU), in the same passes; its gradient is returned too.

    inplace: write the output over ``input`` and keep only the output for the
    backward, which recovers the input by inverting the activation and the
    affine transform (weight semantics unchanged, unlike inplace_abn). Needs
    an invertible activation: identity, leaky_relu (negative_slope > 0) or
    elu (alpha > 0); the others raise. Where a weight is exactly 0 the call keeps a
    copy of the input instead. Precision: in bfloat16/float16, and for ELU
    outputs close to -alpha, the recovered input is less accurate than the
    saved one.

    order: ``"bn_act"`` (the default) computes ``act(bn(input))``;
    ``"act_bn"`` computes ``bn(act(input))``, the activation before the
    normalization, in the same passes (no residual, no in-place mode).

    activity: optional floating tensor (float32 preferably) of shape ``[C]``
    or ``[3, C]``. Row 0 is set to the fraction of each channel's values that
    are active: the activation input is positive (identity, relu, leaky_relu,
    elu, silu, gelu, mish, hardswish), or strictly inside the linear range
    (hardtanh: ``min_val < v < max_val``; relu6: ``0 < v < 6``; hardsigmoid:
    ``-3 < v < 3``). With ``order="act_bn"`` the activation input is ``input``
    itself (also with the identity, where both orders give the same output). Counted in the pass that writes the output, so it costs no
    memory traffic; an empty batch sets row 0 to NaN and leaves the others. With 3 rows, row 1 is updated to the running average
    of row 0 (``avg += activity_momentum * (frac - avg)``; a NaN average takes
    the first fraction as is) and row 2 to the number of calls in a row in
    which the channel had no active value (reset to 0 otherwise).
    """
    check_activation(activation)
    check_order(order)
    _check_number("activity_momentum", activity_momentum)
    _check_number("momentum", momentum, allow_none=True)
    _check_number("eps", eps)
    check_params(activation, negative_slope, alpha, min_val, max_val, approximate)
    args = (input, residual, weight, bias, running_mean, running_var, num_batches_tracked,
            bool(training), None if momentum is None else float(momentum), float(eps), activation,
            float(negative_slope), float(alpha), order, activity, float(activity_momentum),
            float(min_val), float(max_val), approximate)
    if inplace and torch.compiler.is_compiling():
        # How many channels the in-place op keeps the input of depends on the
        # weights' values (a data-dependent size, which a graph cannot hold
        # without a break). Compiled, in-place mode computes out of place on
        # a copy (which the backward keeps) and writes the output over the
        # input: same results and autograd semantics, inplace=False's memory.
        if order != "bn_act" or not is_invertible(activation, negative_slope, alpha):
            return torch.ops.fusedbn.forward_.default(*args)[0]  # raises the op's error
        out = torch.ops.fusedbn.forward.default(input.clone(), *args[1:])[0]
        return input.copy_(out)
    op = torch.ops.fusedbn.forward_ if inplace else torch.ops.fusedbn.forward
    return op.default(*args)[0]
