"""Extreme values (issue 12): data near the dtype's maximum, +-inf and NaN in a
channel, the eval backward at non-finite inputs, and the in-place ELU
backward where the output saturated at -alpha.

Reference: eager F.batch_norm + activation in the same dtype, judged against
a float64 eager reference. Where eager's result is finite fusedbn's must be
finite and within the suite's tolerance rule (at most 2x eager's own error
against float64); where eager gives inf/NaN fusedbn must give the same
pattern."""
import pytest
import torch
import torch.nn.functional as F

from helpers import ACT_IDS, ACTIVATIONS, ALL_DTYPES, apply_activation, assert_close, seed

import fusedbn

ACTS = ACTIVATIONS


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _eager(x, rm, rv, w, b, training, activation, kw, momentum=0.1, eps=1e-5):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return apply_activation(y, activation, **kw)


def _run(fn, x, rm, rv, w, b, g):
    """Forward + backward of fn on a leaf copy of x (same strides) and of the
    parameters; returns the output, running stats and the three gradients."""
    xi = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    with torch.no_grad():
        xi.copy_(x)
    xi.requires_grad_(True)
    wi = w.detach().clone().requires_grad_(True)
    bi = b.detach().clone().requires_grad_(True)
    rm, rv = rm.clone(), rv.clone()
    out = fn(xi, rm, rv, wi, bi)
    out.backward(g)
    return dict(out=out.detach(), running_mean=rm, running_var=rv, grad_input=xi.grad,
                grad_weight=wi.grad, grad_bias=bi.grad)


# Relative tolerance for a value eager got wrong (inf/NaN where float64 is
# finite in the tested dtype): fusedbn may then be right instead.
# float32: channels with |mean| near the maximum are normalized folded, as
# eager does (cpu_kernels.h: fold_mean), and lose the digits of mean * invstd.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _check(name, actual, expected, ref64, dtype=None, atol=1e-6):
    """Where eager is finite: finite and within the suite's rule. Where eager
    is inf/NaN: the same inf/NaN, unless eager overflowed where the float64
    reference (rounded to the dtype) is finite and fusedbn is close to it
    (relative to the computation's dtype, the input's, plus atol), or eager
    is NaN where the float64 reference has fusedbn's value."""
    assert actual.dtype == expected.dtype, name
    a, e = actual.detach(), expected.detach()
    r = ref64.detach().to(a.dtype)
    same = (a.isnan() & e.isnan()) | (a == e)
    rtol = RTOL[dtype or a.dtype]
    better = r.isfinite() & a.isfinite() & ((a.double() - ref64).abs()
                                            <= rtol * ref64.abs() + atol)
    # eager NaN where eager in float64 has a value, fusedbn's (gelu(inf) in
    # float32: ATen's float erf gives NaN at inf).
    as64 = e.isnan() & (a.double() == ref64)
    bad = ~e.isfinite() & ~same & ~better & ~as64
    assert not bad.any(), f"{name}: inf/NaN pattern\n{a}\nvs eager\n{e}\nfloat64\n{ref64}"
    assert a[e.isfinite()].isfinite().all(), f"{name}: non-finite where eager is finite\n{a}\n{e}"
    mask = e.isfinite() & ref64.isfinite()
    assert_close(a[mask], e[mask], ref64[mask], name=name, vs64=True)


def _grad_like(x):
    g = torch.randn(x.shape, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    return _layout(g, "channels_last" if x.is_contiguous(memory_format=torch.channels_last)
                   and not x.is_contiguous() else "contiguous")


def _compare(x, w, b, rm, rv, training, activation, kw, g=None, skip=None, atol=None):
    """Runs fusedbn, eager and eager in float64 on the same data; skip: the
    elements (bool mask by result name) left out of the comparison; atol:
    _check's absolute tolerance by result name, where not 1e-6."""
    if g is None:
        g = _grad_like(x)

    def fused(xi, rmi, rvi, wi, bi):
        return fusedbn.batch_norm_act(xi, rmi, rvi, wi, bi, training=training,
                                      activation=activation, **kw)

    def eager(xi, rmi, rvi, wi, bi):
        return _eager(xi, rmi, rvi, wi, bi, training, activation, kw)

    rf = _run(fused, x, rm, rv, w, b, g)
    re = _run(eager, x, rm, rv, w, b, g)
    r64 = _run(eager, x.double(), rm.double(), rv.double(), w.double(), b.double(), g.double())
    for name in rf:
        keep = ~skip[name] if skip and name in skip else torch.ones_like(rf[name], dtype=torch.bool)
        tol = atol[name][keep] if atol and name in atol else 1e-6
        _check(name, rf[name][keep], re[name][keep], r64[name][keep], x.dtype, tol)
    return rf, re


def _params(C, dtype, device):
    pdt = dict(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(**pdt)
    b = (torch.randn(C, dtype=torch.float64) * 0.5).to(**pdt)
    rm = (torch.randn(C, dtype=torch.float64) * 0.5).to(**pdt)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(**pdt)
    return w, b, rm, rv


# ------------------------------------------------------- near the maximum

def test_near_max_issue_example(device):
    x = torch.tensor([[1e38], [2e38], [1.5e38], [1.2e38]], device=device)
    rm, rv = torch.zeros(1, device=device), torch.ones(1, device=device)
    y = fusedbn.batch_norm_act(x, rm, rv, None, None, training=True, activation="identity")
    rme, rve = torch.zeros(1, device=device), torch.ones(1, device=device)
    F.batch_norm(x, rme, rve, None, None, True)
    # (Eager's output is all zeros here, float64's is not.)
    y64 = F.batch_norm(x.double(), None, None, None, None, True)
    assert torch.isfinite(y).all(), y
    assert_close(y, y64.float(), name="out vs float64")
    # Relative only: the mean is ~1e38, where any absolute tolerance is 0.
    torch.testing.assert_close(rm, rme, rtol=1e-5, atol=0)
    assert rv.item() == rve.item() == float("inf")


# Values per channel around `big` with a spread of a tenth of it, so sums of
# x and of squared deviations overflow the dtype (float: per L1 block too)
# while eager's statistics stay finite.
NEAR_MAX = {torch.float32: 1.4e38, torch.bfloat16: 1.4e38, torch.float16: 3e4,
            torch.float64: 1e300}


def _near_max_input(shape, dtype, layout, big, device):
    C = shape[1]
    view = [1, C] + [1] * (len(shape) - 2)
    sign = torch.tensor([1.0, -1.0, 1.0])[:C].view(view).double()
    x = (torch.rand(shape, dtype=torch.float64) - 0.5) * 0.4 + 1.0
    return _layout((x * sign * big).to(device=device, dtype=dtype), layout)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,kw", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 1, 2), (6, 3, 4, 5), (2, 3, 72, 72)],
                         ids=["small", "columns", "blocks"])
def test_near_max(device, shape, dtype, layout, activation, kw, training):
    seed("near-max", shape, dtype, layout, activation, training)
    big = NEAR_MAX[dtype]
    x = _near_max_input(shape, dtype, layout, big, device)
    w, b, rm, rv = _params(shape[1], dtype, device)
    if not training:
        # Running statistics of the data's scale, within the parameter dtype.
        rm = rm * big
        rv = rv * (big * big if dtype == torch.float16 else big)
    # Channels normalized folded (|mean| * invstd up to 256) carry the offset
    # mean * invstd in each normalized value, rounded in the computation's
    # dtype: grad_weight = sum(g * xhat) may be off by eps * offset * sum|g|
    # (as much as the float sums' order moves it: 1.2e-4 relative here).
    g = _grad_like(x)
    xd, dims = x.double(), [d for d in range(x.dim()) if d != 1]
    mean, var = (xd.mean(dims), xd.var(dims, unbiased=False)) if training else (rm, rv)
    offset = mean.double().abs() / (var.double() + 1e-5).sqrt()
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    atol = 1e-6 + eps * offset * g.double().abs().sum(dims)
    _compare(x, w, b, rm, rv, training, activation, kw, g=g, atol={"grad_weight": atol})


# ---------------------------------------------------- +-inf / NaN (training)

# Channel 0: +inf, 1: -inf, 2: NaN, 3: +inf and -inf, 4: finite.
def _nonfinite_input(shape, dtype, layout, where, device):
    x = torch.randn(shape, dtype=torch.float64)
    n, s = where
    flat = x.view(shape[0], shape[1], -1)
    flat[n, 0, s] = float("inf")
    flat[n, 1, s] = float("-inf")
    flat[n, 2, s] = float("nan")
    flat[n, 3, s] = float("inf")
    flat[0, 3, 0] = float("-inf")
    return _layout(x.to(device=device, dtype=dtype), layout)


@pytest.mark.parametrize("activation,kw", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 2, 2), (6, 5, 4, 5), (2, 5, 72, 72)],
                         ids=["small", "columns", "blocks"])
def test_nonfinite_train(device, shape, dtype, layout, activation, kw):
    seed("nonfinite", shape, dtype, layout, activation)
    S = shape[2] * shape[3]
    # The value in the last block of the last plane: merged into finite moments.
    x = _nonfinite_input(shape, dtype, layout, (shape[0] - 1, S - 1), device)
    w, b, rm, rv = _params(shape[1], dtype, device)
    rf, re = _compare(x, w, b, rm, rv, True, activation, kw, skip=_elu_nan_skip(x, activation, True))
    rm_f = rf["running_mean"]
    assert rm_f[0] == float("inf") and rm_f[1] == float("-inf")
    assert rm_f[2].isnan() and rm_f[3].isnan() and rm_f[4].isfinite()
    assert rf["running_var"][:4].isnan().all() and rf["running_var"][4].isfinite()
    assert rf["out"][:, 4].isfinite().all()


# Eager's derivative at a NaN pre-activation depends on where the element
# falls, the vectorized body or the scalar tail: ELU NaN or dy, hardtanh /
# relu6 0 or dy, hardswish NaN or dy. fusedbn always gives the scalar tail's
# dy (its comparisons with NaN are false).
NAN_AMBIGUOUS = ("elu", "relu6", "hardtanh", "hardswish")


def _elu_nan_skip(x, activation, training):
    """For the NAN_AMBIGUOUS activations the gradients that see a NaN
    pre-activation are left out: in training every element of a channel
    holding inf/NaN (its statistics are NaN), in eval the NaN elements."""
    if activation not in NAN_AMBIGUOUS:
        return None
    nan_pre = ~x.isfinite() if training else x.isnan()
    chans = nan_pre.flatten(2).any(-1).any(0)
    if training:
        nan_pre = chans.view(1, -1, *[1] * (x.dim() - 2)).expand(x.shape)
    return dict(grad_input=nan_pre, grad_bias=chans, grad_weight=chans)


# ------------------------------------------------ eval backward at inf/NaN

@pytest.mark.parametrize("activation,kw", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_nonfinite_eval_backward(device, dtype, layout, activation, kw):
    seed("nonfinite-eval", dtype, layout, activation)
    shape = (2, 5, 3, 4)
    x = _nonfinite_input(shape, dtype, layout, (1, 5), device)
    w, b, rm, rv = _params(shape[1], dtype, device)
    rf, re = _compare(x, w, b, rm, rv, False, activation, kw, skip=_elu_nan_skip(x, activation, False))
    # The input gradient only depends on x through the activation's slope.
    if activation in ("identity", "leaky_relu"):
        assert rf["grad_input"].isfinite().all()


# ------------------------------------------- in-place ELU, saturated output

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_inplace_elu_saturated(device, dtype, layout, training):
    seed("elu-saturated", dtype, layout, training)
    shape, C, alpha = (4, 3, 8, 8), 3, 1.0
    x = _layout(torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype), layout)
    pdt = dict(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    # Channel 0 saturates entirely, channel 1 partly, channel 2 not at all
    # (pre-activations down to about -150, -50 and 0 at worst).
    w = torch.tensor([1.0, 20.0, 0.5], **pdt)
    b = torch.tensor([-150.0, -10.0, 1.0], **pdt)
    rm = torch.zeros(C, **pdt)
    rv = torch.ones(C, **pdt)
    g = _layout(torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype), layout)

    def fused(xi, rmi, rvi, wi, bi):
        # In-place needs a non-leaf input.
        return fusedbn.batch_norm_act(xi.clone(), rmi, rvi, wi, bi, training=training,
                                      activation="elu", alpha=alpha, inplace=True)

    def eager(xi, rmi, rvi, wi, bi):
        return _eager(xi, rmi, rvi, wi, bi, training, "elu", {"alpha": alpha})

    rf = _run(fused, x, rm, rv, w, b, g)
    re = _run(eager, x, rm, rv, w, b, g)
    r64 = _run(eager, x.double(), rm.double(), rv.double(), w.double(), b.double(), g.double())
    low = dtype in (torch.bfloat16, torch.float16)
    for name in ("out", "running_mean", "running_var", "grad_weight", "grad_bias"):
        a, e, r = rf[name], re[name], r64[name]
        assert a.isfinite().all(), f"{name}: {a}"
        if low and name.startswith("grad"):
            # In-place in 16 bits the input is recovered from a rounded
            # output (a few bits near -alpha; -alpha itself below about -6
            # in bfloat16, where the gradient is lost): finite and roughly
            # right is what the output allows.
            err, err_e = (a.double() - r).abs().max(), (e.double() - r).abs().max()
            assert err <= 2 * err_e + 0.05 * r.abs().max() + 1e-3, f"{name}: {a} vs {r}"
            continue
        _check(name, a, e, r, dtype)
    dx = rf["grad_input"]
    assert dx.isfinite().all(), dx
    if low:
        return
    # Where the output saturated at -alpha the input is lost, and with batch
    # statistics so is its part of dx (the mean/variance terms). Elsewhere,
    # and everywhere in eval (dx = dy * elu'(pre) * scale = 0 there), dx
    # matches.
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    if training:
        keep = rf["out"].double() > -alpha * (1 - 1e-2)
    _check("grad_input", dx[keep], re["grad_input"][keep], r64["grad_input"][keep])
