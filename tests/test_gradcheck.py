"""torch.autograd.gradcheck (and a few gradgradchecks) of batch_norm_act in
float64, inputs kept off the activation's kink."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fusedbn
from helpers import ACT_IDS, ACTIVATIONS, avoid_kink, seed

SHAPE = (2, 3, 2, 3)


class _Stats:
    """Just what avoid_kink needs to know of a module."""

    def __init__(self, rm, rv, w, b, eps):
        self.running_mean, self.running_var, self.weight, self.bias, self.eps = rm, rv, w, b, eps


def _inputs(activation, training, channels_last, key, device):
    seed("gradcheck", activation, training, channels_last, key)
    C = SHAPE[1]
    x = torch.randn(SHAPE, dtype=torch.float64) * 1.5 + 0.3
    w = torch.rand(C, dtype=torch.float64) + 0.5
    b = torch.randn(C, dtype=torch.float64) * 0.3
    rm = torch.randn(C, dtype=torch.float64) * 0.3
    rv = torch.rand(C, dtype=torch.float64) + 0.5
    x, w, b, rm, rv = (t.to(device) for t in (x, w, b, rm, rv))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if activation != "identity":
        # Normalized (pre-activation) values at least 2e-2 away from 0, far
        # beyond what gradcheck's eps=1e-6 perturbation can move them.
        x = avoid_kink(x, _Stats(rm, rv, w, b, 1e-5), training, margin=2e-2)
    if channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)
    return x, w, b, rm, rv


def _fn(rm, rv, training, activation, kwargs):
    def f(x, w, b):
        # Fresh running statistics per call: forward updates them in place.
        return fusedbn.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                      activation, **kwargs)
    return f


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_gradcheck(device, act, training, channels_last):
    activation, kwargs = act
    x, w, b, rm, rv = _inputs(activation, training, channels_last, "gc", device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert gradcheck(_fn(rm, rv, training, activation, kwargs), args, eps=1e-6, atol=1e-5,
                     rtol=1e-4)


@pytest.mark.parametrize("wrt", ["input", "weight", "bias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_single_input(device, wrt, training):
    """Gradient with respect to one tensor at a time (the others constant):
    exercises the backward's output_mask."""
    activation, kwargs = ACTIVATIONS[2]
    x, w, b, rm, rv = _inputs(activation, training, False, wrt, device)
    tensors = {"input": x, "weight": w, "bias": b}
    tensors[wrt].requires_grad_()
    f = _fn(rm, rv, training, activation, kwargs)
    assert gradcheck(lambda t: f(*[t if k == wrt else v for k, v in tensors.items()]),
                     (tensors[wrt],), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_without_affine(device, training):
    activation, kwargs = ACTIVATIONS[3]
    x, _, _, rm, rv = _inputs(activation, training, False, "noaffine", device)
    f = _fn(rm, rv, training, activation, kwargs)
    assert gradcheck(lambda t: f(t, None, None), (x.requires_grad_(),), eps=1e-6, atol=1e-5,
                     rtol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", [ACTIVATIONS[1], ACTIVATIONS[3]], ids=["relu", "elu"])
def test_gradgradcheck(device, act, training):
    """Double backward (the backward op has its own autograd formula)."""
    activation, kwargs = act
    x, w, b, rm, rv = _inputs(activation, training, False, "gg", device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert gradgradcheck(_fn(rm, rv, training, activation, kwargs), args, eps=1e-6, atol=1e-4,
                         rtol=1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_zero_size_batch(device, training):
    """Double backward through an empty batch: zero second-order gradients,
    as eager BatchNorm gives (never NaN)."""
    seed("gg-empty", training)
    f64 = dict(dtype=torch.float64, device=device)
    rm, rv = torch.zeros(3, **f64), torch.ones(3, **f64)
    results = []
    for fn in (lambda x, w, b: fusedbn.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training,
                                                      activation="relu"),
               lambda x, w, b: torch.relu(torch.nn.functional.batch_norm(
                   x, rm.clone(), rv.clone(), w, b, training))):
        x = torch.randn(0, 3, 2, 2, **f64, requires_grad=True)
        w = torch.rand(3, **f64).add(0.5).requires_grad_()
        b = torch.randn(3, **f64, requires_grad=True)
        g = torch.randn(0, 3, 2, 2, **f64, requires_grad=True)
        _, gw, gb = torch.autograd.grad(fn(x, w, b), (x, w, b), g, create_graph=True)
        gg = torch.autograd.grad(gw.sum() + gb.sum(), (w,), allow_unused=True)[0]
        results.append(torch.zeros(3, **f64) if gg is None else gg.detach())
    fused, eager = results
    assert torch.isfinite(fused).all(), f"second-order weight gradient {fused} (eager {eager})"
    torch.testing.assert_close(fused, eager)
