"""torch.autograd.gradcheck (and a few gradgradchecks) of batch_norm_act in
float64, inputs kept off the activation's kink: both orders, the residual."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fusedbn
from helpers import ACT_IDS, ACTIVATIONS, Stats, avoid_kink, off_kink, seed

SHAPE = (2, 3, 2, 3)
# gradcheck's finite differences in float64 (inputs kept off the kink).
GC_TOL = dict(eps=1e-6, atol=1e-5, rtol=1e-4)
GG_TOL = dict(eps=1e-6, atol=1e-4, rtol=1e-3)
NONLINEAR = ACTIVATIONS[1:]
# (activation, order): every activation with order="bn_act", the nonlinear
# ones with "act_bn" (with the identity both orders are the same op).
ACT_ORDERS = ([(a, "bn_act") for a in ACTIVATIONS] + [(a, "act_bn") for a in NONLINEAR])
ACT_ORDER_IDS = [f"{a[0]}-{o}" if o != "bn_act" else a[0] for a, o in ACT_ORDERS]


def _inputs(activation, training, channels_last, key, device, order="bn_act", kwargs=None):
    kwargs = kwargs or {}
    seed("gradcheck" if order == "bn_act" else "act_bn-gradcheck", activation, training,
         channels_last, key)
    C = SHAPE[1]
    x = torch.randn(SHAPE, dtype=torch.float64) * 1.5 + 0.3
    w = torch.rand(C, dtype=torch.float64) + 0.5
    b = torch.randn(C, dtype=torch.float64) * 0.3
    rm = torch.randn(C, dtype=torch.float64) * 0.3
    rv = torch.rand(C, dtype=torch.float64) + 0.5
    x, w, b, rm, rv = (t.to(device) for t in (x, w, b, rm, rv))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # Activation inputs at least 2e-2 away from the kink, far beyond what
    # gradcheck's eps=1e-6 perturbation can move them: the normalized values
    # for order="bn_act", the input itself for "act_bn".
    if order == "act_bn":
        x = off_kink(x, margin=2e-2, activation=activation, **kwargs)
    elif activation != "identity":
        stats = Stats(rm, rv, w, b, 1e-5)
        stats.activation = activation
        stats.__dict__.update(kwargs)  # the activation's parameters, as a module has them
        x = avoid_kink(x, stats, training, margin=2e-2)
    if channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)
    return x, w, b, rm, rv


def _fn(rm, rv, training, activation, kwargs, order="bn_act"):
    def f(x, w, b):
        # Fresh running statistics per call: forward updates them in place.
        return fusedbn.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                      activation, order=order, **kwargs)
    return f


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act,order", ACT_ORDERS, ids=ACT_ORDER_IDS)
def test_gradcheck(device, act, order, training, channels_last):
    activation, kwargs = act
    x, w, b, rm, rv = _inputs(activation, training, channels_last, "gc", device, order, kwargs)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert gradcheck(_fn(rm, rv, training, activation, kwargs, order), args, **GC_TOL)


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
                     (tensors[wrt],), **GC_TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_without_affine(device, training):
    activation, kwargs = ACTIVATIONS[3]
    x, _, _, rm, rv = _inputs(activation, training, False, "noaffine", device)
    f = _fn(rm, rv, training, activation, kwargs)
    assert gradcheck(lambda t: f(t, None, None), (x.requires_grad_(),), **GC_TOL)


# (activation, order, channels_last, training)
# (The double backward's formula is _reference.activation_grad: every
# activation's, in training.)
GG_CASES = ([(a, "bn_act", False, t) for a in (ACTIVATIONS[1], ACTIVATIONS[3]) for t in (True, False)]
            + [(a, "bn_act", False, True) for a in ACTIVATIONS[4:]]
            + [(a, "act_bn", cl, t) for a in NONLINEAR
               for cl, t in ((False, True), (True, True), (False, False))])


@pytest.mark.parametrize("act,order,channels_last,training", GG_CASES,
                         ids=[f"{a[0]}-{o}-{'channels_last' if cl else 'contiguous'}-"
                              f"{'train' if t else 'eval'}" for a, o, cl, t in GG_CASES])
def test_gradgradcheck(device, act, order, channels_last, training):
    """Double backward (the backward op has its own autograd formula;
    ops.backward_reference with order="act_bn" too)."""
    activation, kwargs = act
    x, w, b, rm, rv = _inputs(activation, training, channels_last, "gg", device, order, kwargs)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert gradgradcheck(_fn(rm, rv, training, activation, kwargs, order), args, **GG_TOL)


@pytest.mark.parametrize("activation,kw", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck_with_residual(device, activation, kw, training):
    """The residual's gradient too; gradcheck's default tolerances."""
    seed("gradgrad-residual", activation, training)
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(3, 4, 5, dtype=torch.float64).to(device).requires_grad_()
    z = torch.randn(3, 4, 5, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).to(device).requires_grad_()
    rm, rv = torch.zeros(4, **f64), torch.ones(4, **f64)

    def f(x, z, w, b):
        return fusedbn.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                      activation, residual=z, **kw)

    assert gradcheck(f, (x, z, w, b))
    assert gradgradcheck(f, (x, z, w, b), atol=1e-5)


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
