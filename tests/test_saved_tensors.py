"""Memory claim: one BatchNormAct2d layer in training saves exactly one
full-size tensor for the backward (its input), where nn.BatchNorm2d +
nn.ReLU saves two (BatchNorm's input and ReLU's output)."""
import pytest
import torch
import torch.nn as nn

import fusedbn
from helpers import ACT_IDS, ACTIVATIONS, seed

SHAPE = (2, 3, 4, 5)


def _saved(module, x):
    """Every tensor packed for the backward by one forward of module."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return out, packed


def _full_size(packed, x):
    return [t for t in packed if t.numel() == x.numel()]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_fused_saves_only_the_input(device, act, channels_last):
    activation, kwargs = act
    seed("saved", activation, channels_last)
    x = torch.randn(SHAPE).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    mod = fusedbn.BatchNormAct2d(3, activation=activation, **kwargs).to(device).train()
    out, packed = _saved(mod, x)
    full = _full_size(packed, x)
    assert len(full) == 1, [tuple(t.shape) for t in packed]
    # ... and that one is the input itself, not a copy.
    assert full[0].data_ptr() == x.data_ptr()
    # The saved tensors are enough for the backward.
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_eager_batchnorm_relu_saves_two(device):
    """Documents the comparison: nn.BatchNorm2d + nn.ReLU keeps two full-size
    tensors (BatchNorm's input, ReLU's output)."""
    seed("saved-eager")
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    mod = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).to(device).train()
    out, packed = _saved(mod, x)
    full = _full_size(packed, x)
    assert len(full) == 2, [tuple(t.shape) for t in packed]
    assert any(t.data_ptr() == x.data_ptr() for t in full)
    assert any(t.data_ptr() == out.data_ptr() for t in full)


def test_fused_eval_saves_only_the_input(device):
    seed("saved-eval")
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    mod = fusedbn.BatchNormReLU2d(3).to(device).eval()
    _, packed = _saved(mod, x)
    assert len(_full_size(packed, x)) == 1
