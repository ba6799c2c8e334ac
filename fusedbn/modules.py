"""Drop-in modules: ``nn.BatchNormNd`` followed by an activation.

Parameters, buffers and state_dict keys are those of ``nn.BatchNormNd`` (the
classes derive from its base), so a state_dict saved from ``nn.BatchNorm2d``
loads as is.
"""
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import batch_norm_act, check_activation


class _BatchNormAct(_BatchNorm):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, activation="relu", negative_slope=0.01, alpha=1.0,
                 device=None, dtype=None, *, bias=True, inplace=False):
        check_activation(activation)
        if inplace and not (activation == "identity"
                            or (activation == "leaky_relu" and negative_slope > 0)
                            or (activation == "elu" and alpha > 0)):
            raise ValueError(
                "fusedbn: inplace=True needs an invertible activation ('identity', 'leaky_relu' "
                "with negative_slope > 0, 'elu' with alpha > 0): in-place mode keeps only the "
                "output and recovers the input from it, and ReLU maps every negative input to 0.")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, bias=bias)
        self.activation = activation
        self.negative_slope = negative_slope
        self.alpha = alpha
        self.inplace = inplace

    def forward(self, input, residual=None):
        """act(bn(input) [+ residual]); residual has the input's shape and dtype."""
        self._check_input_dim(input)
        # Exactly nn.BatchNorm's choices: batch statistics in training and
        # when no running statistics exist; buffers passed only when used.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        counts = self.training and self.track_running_stats
        return batch_norm_act(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight, self.bias, use_batch_stats, self.momentum, self.eps,
            self.activation, self.negative_slope, self.alpha,
            residual=residual, inplace=self.inplace,
            num_batches_tracked=self.num_batches_tracked if counts else None)

    def extra_repr(self):
        s = super().extra_repr() + f", activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        elif self.activation == "elu":
            s += f", alpha={self.alpha}"
        if self.inplace:
            s += ", inplace=True"
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


def _relu_variant(base, doc):
    class _Cls(base):
        __doc__ = doc

        def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                     track_running_stats=True, device=None, dtype=None, *, bias=True):
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             "relu", device=device, dtype=dtype, bias=bias)
    return _Cls


BatchNormReLU1d = _relu_variant(BatchNormAct1d, "``nn.BatchNorm1d`` + ``nn.ReLU``.")
BatchNormReLU2d = _relu_variant(BatchNormAct2d, "``nn.BatchNorm2d`` + ``nn.ReLU``.")
BatchNormReLU3d = _relu_variant(BatchNormAct3d, "``nn.BatchNorm3d`` + ``nn.ReLU``.")
for _cls, _name in ((BatchNormReLU1d, "BatchNormReLU1d"), (BatchNormReLU2d, "BatchNormReLU2d"),
                    (BatchNormReLU3d, "BatchNormReLU3d")):
    _cls.__name__ = _cls.__qualname__ = _name
