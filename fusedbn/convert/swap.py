"""BatchNorm <-> fused module, for ``fusedbn.convert`` and ``unconvert``.

The fused module *shares* the BatchNorm's parameter and buffer tensors
(weight, bias, running_mean, running_var, num_batches_tracked: same objects,
so an optimizer built before the conversion keeps working) and copies eps,
momentum, affine, track_running_stats and the train/eval flag; device and
dtype are those of the shared tensors. Other instance attributes (a qconfig,
a tag, ...) move along. No state_dict key changes in either direction.
"""
import torch.nn as nn

from ..modules import BatchNormAct2d
from .patterns import _BN_BUFFERS, _BN_PARAMS, _BN_TO_FUSED, _FUSED_TO_BN

_MARK = "_fusedbn_source"        # on a fused module convert created: how to undo it
_OWNED = "_fusedbn_fused"        # on a graph-rewritten module: relative paths it fused
_CONSTANTS = "_fusedbn_constants"  # on a graph-rewritten module: tensor constants fx added


def _share_state(dst, src):
    for name in _BN_PARAMS:
        dst._parameters[name] = src._parameters[name]
    for name in _BN_BUFFERS:
        dst._buffers[name] = src._buffers[name]
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    dst.train(src.training)


# Attributes beyond these are the user's (a qconfig, a tag, ...) and move along;
# a torch.compile'd call (Module.compile) does not.
_NOT_CARRIED = {"_compiled_call_impl"}
_BN_ATTRS = frozenset(nn.BatchNorm2d(1, device="meta").__dict__) | _NOT_CARRIED
_FUSED_ATTRS = frozenset(BatchNormAct2d(1, device="meta").__dict__) | {_MARK} | _NOT_CARRIED


def _to_fused(bn, activation, params, mark):
    """params: only those the activation reads (the fused module's defaults
    stand for the others)."""
    cls = _BN_TO_FUSED[type(bn)]
    fused = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                activation=activation, device="meta", bias=bn.bias is not None or not bn.affine,
                **params)
    _share_state(fused, bn)
    for k, v in bn.__dict__.items():
        if k not in _BN_ATTRS:
            fused.__dict__[k] = v
    fused.__dict__[_MARK] = mark
    return fused


def _to_bn(fused):
    cls = next(bn for f, bn in _FUSED_TO_BN if isinstance(fused, f))
    bn = cls(fused.num_features, fused.eps, fused.momentum, fused.affine,
             fused.track_running_stats, device="meta",
             bias=fused.bias is not None or not fused.affine)
    _share_state(bn, fused)
    for k, v in fused.__dict__.items():
        if k not in _FUSED_ATTRS:
            bn.__dict__[k] = v
    return bn

