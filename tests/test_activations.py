"""What is particular to each activation: the derivative at the kinks,
inf/NaN, the float32 transcendental functions over a wide range, the
parameters' errors, the modules' shorthands and torch.fx tracing. (The
forward/backward matrix, act_bn, residual, gradcheck, opcheck and compile
run every activation through tests/helpers.py: ACTIVATIONS.)"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedbn
from fusedbn import _reference
from helpers import ACT_IDS, ACTIVATIONS, assert_close, kinks, seed

NONLINEAR = ACTIVATIONS[1:]
NONLINEAR_IDS = ACT_IDS[1:]


def _identity_bn(C, dtype, device):
    """Eval BatchNorm that is exactly the identity: mean 0, var 1, eps 0,
    weight 1, bias 0, so the pre-activation is the input itself."""
    ones = torch.ones(C, dtype=dtype, device=device)
    zeros = torch.zeros(C, dtype=dtype, device=device)
    return zeros, ones, ones.clone(), zeros.clone()


def _fused_and_eager(x, activation, kw):
    """(output, input gradient) of fusedbn and of eager F.batch_norm + the
    activation, with the identity BatchNorm, for a gradient of ones."""
    rm, rv, w, b = _identity_bn(x.shape[1], x.dtype, x.device)
    xf = x.clone().requires_grad_()
    yf = fusedbn.batch_norm_act(xf, rm, rv, w, b, False, 0.1, 0.0, activation, **kw)
    yf.backward(torch.ones_like(yf))
    xe = x.clone().requires_grad_()
    ye = _reference.activation(F.batch_norm(xe, rm, rv, w, b, False, 0.1, 0.0), activation, **kw)
    ye.backward(torch.ones_like(ye))
    return (yf.detach(), xf.grad), (ye.detach(), xe.grad)


PIECEWISE = [(a, kw) for a, kw in ACTIVATIONS
             if a in ("relu", "leaky_relu", "relu6", "hardtanh", "hardswish", "hardsigmoid")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("act", PIECEWISE, ids=[a for a, _ in PIECEWISE])
def test_value_and_derivative_at_the_kinks(device, act, dtype):
    """At each kink (and just beside it) the output and the derivative are
    PyTorch's exactly: relu6/hardtanh's derivative is 0 at both bounds,
    hardswish's is 0 at -3 and 1 at 3, hardsigmoid's 1/6 only strictly inside
    (-3, 3)."""
    activation, kw = act
    pts = []
    for k in kinks(activation, **kw) + (-3.0, 3.0, 0.0, 6.0):
        v = torch.tensor(k, dtype=dtype)
        pts += [v.item(), torch.nextafter(v, v - 1).item(), torch.nextafter(v, v + 1).item()]
    x = torch.tensor(pts, dtype=dtype, device=device).view(1, -1, 1)
    (yf, gf), (ye, ge) = _fused_and_eager(x, activation, kw)
    assert torch.equal(yf, ye), (x, yf, ye)
    assert torch.equal(gf, ge), (x, gf, ge)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", NONLINEAR, ids=NONLINEAR_IDS)
def test_nonfinite_values(device, act, dtype):
    """inf, -inf and NaN pre-activations give eager's outputs and
    derivatives (NaN where eager gives NaN), or float64 eager's where eager
    in the dtype gives NaN for a defined value (gelu(inf) in float32)."""
    activation, kw = act
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 0.5],
                     dtype=dtype, device=device).view(1, -1, 1)
    (yf, gf), (ye, ge) = _fused_and_eager(x, activation, kw)
    _, (y64, g64) = _fused_and_eager(x.double(), activation, kw)
    for name, a, e, r in (("out", yf, ye, y64), ("grad", gf, ge, g64)):
        if name == "grad" and activation == "elu":
            continue  # eager's vectorized and scalar ELU disagree at NaN (test_extreme_values)
        same = lambda u, v: ((u == v) | (u.isnan() & v.isnan())  # noqa: E731
                             | ((u - v).abs() <= 1e-6 * v.abs()))
        ok = same(a, e) | same(a.double(), r)
        assert ok.all(), (name, x.flatten(), a.flatten(), e.flatten(), r.flatten())


@pytest.mark.parametrize("act", [a for a in NONLINEAR if a[0] in
                                 ("elu", "silu", "gelu", "mish")],
                         ids=[i for a, i in zip(NONLINEAR, NONLINEAR_IDS) if a[0] in
                              ("elu", "silu", "gelu", "mish")])
def test_float32_transcendentals_across_the_range(device, act):
    """The float32 kernels' exp/expm1/log1p/tanh/erf (vec_math.h on the CPU)
    over pre-activations from -30 to 30, including the saturated tails: the
    output and derivative within 2x eager's own error against float64 (plus
    a floor of a float32 rounding of the value's scale)."""
    activation, kw = act
    seed("transcendentals", activation)
    x32 = torch.cat([torch.linspace(-30, 30, 6001), torch.randn(4000) * 4]).view(1, -1, 1)
    (yf, gf), (ye, ge) = _fused_and_eager(x32.to(device), activation, kw)
    _, (y64, g64) = _fused_and_eager(x32.double().to(device), activation, kw)
    xd = x32.double().to(device)
    out_terms, grad_terms = _term_scales(xd, activation)
    for name, a, e, r, terms in (("out", yf, ye, y64, out_terms), ("grad", gf, ge, g64, grad_terms)):
        err = (a.double() - r).abs()
        eager_err = (e.double() - r).abs()
        # A float32 rounding of the largest term the formula adds up: its
        # conditioning (the derivatives cross 0; gelu's 1 + erf cancels).
        floor = 2 ** -23 * terms + 1e-38
        bad = err > 2 * eager_err + floor
        assert not bad.any(), (name, x32[bad][:5], a[bad][:5], e[bad][:5], r[bad][:5])


def _term_scales(x, activation):
    """The magnitudes of the terms each formula sums, for the output and the
    derivative, in float64."""
    s = torch.sigmoid(x)
    if activation == "silu":
        return x.abs() * s, s * (1 + x.abs() * (1 - s))
    if activation == "mish":
        t = torch.tanh(F.softplus(x))
        return (x * t).abs(), t.abs() + x.abs() * s * (1 - t * t)
    if activation == "gelu":
        pdf = torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
        return x.abs(), 1 + x.abs() * pdf
    return x.abs(), torch.exp(x.clamp(max=0)) + (x > 0)  # elu


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(activation="hardtanh", min_val=2.0, max_val=1.0), ValueError, "min_val <= max_val"),
    (dict(activation="gelu", approximate="fast"), ValueError, "approximate must be"),
    (dict(activation="hardtanh", min_val="a"), TypeError, "min_val must be a number"),
    (dict(activation="swish"), ValueError, "unknown activation 'swish'"),
])
def test_parameter_errors(device, kwargs, exc, match):
    x = torch.randn(4, 3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(exc, match=match):
        fusedbn.batch_norm_act(x, rm.clone(), rv.clone(), training=True, **kwargs)
    with pytest.raises(exc, match=match):
        fusedbn.BatchNormAct1d(3, **kwargs)


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a[0] not in
                                 ("identity", "leaky_relu", "elu")],
                         ids=[i for a, i in zip(ACTIVATIONS, ACT_IDS) if a[0] not in
                              ("identity", "leaky_relu", "elu")])
def test_inplace_refused(device, act):
    """None of the new activations is one-to-one: in-place mode raises the
    same error as relu, before anything is written."""
    activation, kw = act
    x = torch.randn(4, 3, 5, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    before = (x.clone(), rm.clone(), rv.clone())
    with pytest.raises(ValueError, match="needs an invertible activation"):
        fusedbn.batch_norm_act(x, rm, rv, training=True, activation=activation, inplace=True, **kw)
    assert torch.equal(x, before[0]) and torch.equal(rm, before[1]) and torch.equal(rv, before[2])
    with pytest.raises(ValueError, match="needs an invertible activation"):
        fusedbn.BatchNormAct1d(3, activation=activation, inplace=True, **kw)
    assert not fusedbn.functional.is_invertible(activation, 0.01, 1.0)


def test_relu6_ignores_min_max(device):
    """relu6 is hardtanh(0, 6) whatever min_val/max_val say (as nn.ReLU6)."""
    x = torch.randn(4, 3, 5, device=device) * 5
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    a = fusedbn.batch_norm_act(x, rm, rv, activation="relu6", min_val=-2.0, max_val=1.0)
    b = fusedbn.batch_norm_act(x, rm, rv, activation="hardtanh", min_val=0.0, max_val=6.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls,act,eager", [
    (fusedbn.BatchNormSiLU2d, "silu", nn.SiLU),
    (fusedbn.BatchNormSiLU1d, "silu", nn.SiLU),
    (fusedbn.BatchNormReLU2d, "relu", nn.ReLU),
])
def test_shorthands(device, cls, act, eager):
    seed("shorthand", cls.__name__)
    C = 4
    mod = cls(C, momentum=0.2).to(device)
    assert mod.activation == act and type(mod).__name__ == cls.__name__
    bn = (nn.BatchNorm2d if "2d" in cls.__name__ else nn.BatchNorm1d)(C, momentum=0.2).to(device)
    x = torch.randn((3, C, 5, 5) if "2d" in cls.__name__ else (3, C, 7), device=device)
    assert_close(mod(x), eager()(bn(x)), name="out")
    assert_close(mod.running_var, bn.running_var, name="running_var")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace(device, training):
    """A fused module traces with torch.fx as nn.BatchNorm2d does, as one
    call_module node: the graph computes what the model computes, and keeps
    following the modules' train/eval mode afterwards. The rank check stays
    for eager calls."""
    seed("fx", training)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fusedbn.BatchNormAct2d(4, activation="hardswish"),
                          nn.Conv2d(4, 4, 1), fusedbn.BatchNormReLU2d(4)).to(device)
    model.train(training)
    traced = torch.fx.symbolic_trace(model)  # shares the model's parameters and buffers
    x = torch.randn(2, 3, 6, 6, device=device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    got = traced(x)
    assert_close(got, expected, name="traced out")
    for k, v in traced.state_dict().items():
        assert torch.equal(v, after[k]), k
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "2", "3"], calls
    # The other mode, without tracing again.
    traced.train(not training)
    model.train(not training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    model.load_state_dict(before)
    assert_close(traced(x), expected, name="traced out, other mode")
    # A fused module as the traced root: its forward is traced (in its mode).
    root = fusedbn.BatchNormReLU2d(4).to(device).eval()
    h = torch.randn(2, 4, 3, 3, device=device)
    assert_close(torch.fx.symbolic_trace(root)(h), root(h), name="traced root")
    with pytest.raises(ValueError, match="expected 4D input"):
        fusedbn.BatchNormReLU2d(3).to(device)(torch.randn(2, 3, device=device))
