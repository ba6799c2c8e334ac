"""Drop-in modules: ``nn.BatchNormNd`` followed by an activation.

Parameters, buffers and state_dict keys are those of ``nn.BatchNormNd`` (the
classes derive from its base), so a state_dict saved from ``nn.BatchNorm2d``
loads as is. The activity buffers of ``track_activity=True`` are not part of
the state_dict.
"""
from typing import Any, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.types import Device

from ._reference import params_of, used_params
from .functional import (_check_number, batch_norm_act, check_activation, check_order,
                         check_params, is_invertible)


_MISSING = object()


class _BatchNormAct(_BatchNorm):
    """Keyword-only options beyond ``nn.BatchNormNd``'s:

    min_val, max_val: hardtanh's range; approximate: gelu's form (``"none"``
    or ``"tanh"``). (``negative_slope`` and ``alpha``, of leaky_relu and elu,
    may also be passed by position after ``activation``.)

    inplace: write the output over the input (invertible activations only;
    see ``batch_norm_act``).
    order: ``"bn_act"`` -> ``act(bn(x))`` (default), ``"act_bn"`` -> ``bn(act(x))``.
    bias_init: the initial shift beta (``reset_parameters`` sets the bias to
    it; default 0 as in PyTorch). A small positive value such as 0.01 is a
    common recommendation for units that feed a ReLU: it starts more of them
    in the active branch.
    track_activity: in every forward (training and eval) the kernel also
    counts, per channel, the active values (see ``batch_norm_act``: the
    activation input is positive, or inside the linear range of hardtanh,
    relu6 and hardsigmoid). Kept in the buffer ``activity`` (float32 [3, C],
    not in the state_dict), read through ``active_fraction`` (last batch),
    ``active_fraction_avg`` (exponential average, factor
    ``activity_momentum``, starting from the first batch; NaN before it) and
    ``inactive_steps`` (per channel, how many forwards in a row it had no
    active value). ``fusedbn.diagnostics.report(model)`` tabulates them.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, activation: str = "relu",
                 negative_slope: float = 0.01, alpha: float = 1.0, device: Device = None,
                 dtype: Optional[torch.dtype] = None, *, bias: bool = True, inplace: bool = False,
                 order: str = "bn_act", bias_init: float = 0.0, track_activity: bool = False,
                 activity_momentum: float = 0.1, min_val: float = -1.0, max_val: float = 1.0,
                 approximate: str = "none") -> None:
        check_activation(activation)
        check_params(activation, negative_slope, alpha, min_val, max_val, approximate)
        check_order(order)
        _check_number("activity_momentum", activity_momentum)
        if not 0 <= activity_momentum <= 1:
            raise ValueError(f"fusedbn: activity_momentum must be in [0, 1], got {activity_momentum}")
        if inplace and order == "act_bn":
            raise ValueError("fusedbn: inplace=True is not supported with order='act_bn'")
        if inplace and not is_invertible(activation, negative_slope, alpha):
            raise ValueError(
                "fusedbn: inplace=True needs an invertible activation ('identity', 'leaky_relu' "
                "with negative_slope > 0, 'elu' with alpha > 0): in-place mode keeps only the "
                f"output and recovers the input from it, and {activation} maps several inputs "
                "to the same output.")
        self.bias_init = float(bias_init)  # read by reset_parameters, called below
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, bias=bias)
        self.activation = activation
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.min_val = min_val
        self.max_val = max_val
        self.approximate = approximate
        self.inplace = inplace
        self.order = order
        self.track_activity = track_activity
        self.activity_momentum = activity_momentum
        if track_activity:
            self._register_activity_buffers(device)

    def _register_activity_buffers(self, device=None):
        activity = torch.zeros(3, self.num_features, dtype=torch.float32, device=device)
        activity[1] = float("nan")  # no batch seen yet
        self.register_buffer("activity", activity, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # module.to(bfloat16) & co. would convert the activity counters too;
        # they stay float32 (a bfloat16 streak stops counting at 256).
        super()._apply(fn, *args, **kwargs)
        a = getattr(self, "activity", None)
        if a is not None and a.dtype != torch.float32:
            self.activity = a.float()
        return self

    @property
    def active_fraction(self) -> torch.Tensor:
        return self.activity[0]

    @property
    def active_fraction_avg(self) -> torch.Tensor:
        return self.activity[1]

    @property
    def inactive_steps(self) -> torch.Tensor:
        return self.activity[2].long()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.affine and self.bias is not None and getattr(self, "bias_init", 0.0):
            with torch.no_grad():
                self.bias.fill_(self.bias_init)

    def forward(self, input: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """act(bn(input) [+ residual]); residual has the input's shape and dtype."""
        if isinstance(input, torch.fx.Proxy):
            leaf = self._fx_leaf(input, residual)
            if leaf is not None:
                return leaf
        else:
            # (A traced forward has no rank to check: the op checks it.)
            self._check_input_dim(input)
        running_mean, running_var, weight, bias, num_batches_tracked = self._state()
        # Exactly nn.BatchNorm's choices: batch statistics in training and
        # when no running statistics exist; buffers passed only when used.
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        counts = self.training and self.track_running_stats
        out = batch_norm_act(
            input,
            running_mean if pass_buffers else None,
            running_var if pass_buffers else None,
            weight, bias, use_batch_stats, self.momentum, self.eps,
            self.activation, self.negative_slope, self.alpha,
            residual=residual, inplace=self.inplace,
            num_batches_tracked=num_batches_tracked if counts else None,
            order=self.order, activity=self.activity if self.track_activity else None,
            activity_momentum=self.activity_momentum, min_val=self.min_val,
            max_val=self.max_val, approximate=self.approximate)
        return out

    def _state(self):
        """(running_mean, running_var, weight, bias, num_batches_tracked), read
        from the module's dicts: as attributes each goes through a failed
        lookup and nn.Module.__getattr__ (~1.5 us, 10 us per call of a small
        layer). A name not in its dict (a parametrization's property, say)
        is read as an attribute."""
        buffers, params = self._buffers, self._parameters
        got = (buffers.get("running_mean", _MISSING), buffers.get("running_var", _MISSING),
               params.get("weight", _MISSING), params.get("bias", _MISSING),
               buffers.get("num_batches_tracked", _MISSING))
        if all(v is not _MISSING for v in got):
            return got
        names = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")
        return tuple(getattr(self, n) if v is _MISSING else v for n, v in zip(names, got))

    def _fx_leaf(self, input, residual):
        """Under torch.fx tracing, one call_module node, as nn.BatchNorm2d gets:
        the module keeps choosing batch or running statistics by its mode when
        the graph runs (tracing through forward would fix the mode the trace
        saw). The traced root itself has no path; its forward is traced."""
        tracer = input.tracer
        try:
            path = tracer.path_of_module(self)
        except NameError:
            return None
        if not path:
            return None
        kwargs = {} if residual is None else {"residual": residual}
        return tracer.create_proxy("call_module", path, (input,), kwargs)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation}"
        for k, v in used_params(self.activation, **params_of(self)).items():
            s += f", {k}={v}"
        if self.inplace:
            s += ", inplace=True"
        if self.order != "bn_act":
            s += f", order={self.order}"
        if self.bias_init:
            s += f", bias_init={self.bias_init}"
        if self.track_activity:
            s += ", track_activity=True"
        return s


class BatchNormAct1d(_BatchNormAct):
    """``nn.BatchNorm1d`` + activation over (N, C) or (N, C, L) input."""

    def _check_input_dim(self, input):
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNormAct2d(_BatchNormAct):
    """``nn.BatchNorm2d`` + activation over (N, C, H, W) input."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNormAct3d(_BatchNormAct):
    """``nn.BatchNorm3d`` + activation over (N, C, D, H, W) input."""

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


def _shorthand(name, base, activation, doc):
    class _Cls(base):
        __doc__ = doc

        def __init__(self, num_features: int, eps: float = 1e-5,
                     momentum: Optional[float] = 0.1, affine: bool = True,
                     track_running_stats: bool = True, device: Device = None,
                     dtype: Optional[torch.dtype] = None, *, bias: bool = True,
                     **options: Any) -> None:
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             activation, device=device, dtype=dtype, bias=bias, **options)
    _Cls.__name__ = _Cls.__qualname__ = name
    return _Cls


BatchNormReLU1d = _shorthand("BatchNormReLU1d", BatchNormAct1d, "relu",
                             "``nn.BatchNorm1d`` + ``nn.ReLU``.")
BatchNormReLU2d = _shorthand("BatchNormReLU2d", BatchNormAct2d, "relu",
                             "``nn.BatchNorm2d`` + ``nn.ReLU``.")
BatchNormReLU3d = _shorthand("BatchNormReLU3d", BatchNormAct3d, "relu",
                             "``nn.BatchNorm3d`` + ``nn.ReLU``.")
# Conv -> BatchNorm -> SiLU is the block of EfficientNet and the YOLO family.
BatchNormSiLU1d = _shorthand("BatchNormSiLU1d", BatchNormAct1d, "silu",
                             "``nn.BatchNorm1d`` + ``nn.SiLU``.")
BatchNormSiLU2d = _shorthand("BatchNormSiLU2d", BatchNormAct2d, "silu",
                             "``nn.BatchNorm2d`` + ``nn.SiLU``.")
BatchNormSiLU3d = _shorthand("BatchNormSiLU3d", BatchNormAct3d, "silu",
                             "``nn.BatchNorm3d`` + ``nn.SiLU``.")
