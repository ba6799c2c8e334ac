"""In-place mode (inplace=True): gradients for every weight (channels whose
input cannot be recovered from the output keep it), views, and checks made
before any buffer is touched."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from types import SimpleNamespace

from helpers import apply_activation, assert_close, avoid_kink, seed

import fusedbn

FORWARD_ = torch.ops.fusedbn.forward_.default
INVERTIBLE = [("identity", {}), ("leaky_relu", {"negative_slope": 0.1}), ("elu", {"alpha": 0.7})]
INV_IDS = [a for a, _ in INVERTIBLE]
# glue.cpp: a channel keeps its input when (|b| + max|z|) / |w| > kMaxRecoveryRatio.
MAX_RATIO = 4.0


def _eager(x, rm, rv, w, b, training, activation, kw, residual=None):
    y = F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if residual is not None:
        y = y + residual
    return apply_activation(y, activation, **kw)


def _grads(fn, x, w, b, z, g):
    """Output and gradients of fn(x, w, b, z) w.r.t. leaf copies of them."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, z)]
    out = fn(*leaves)
    out.backward(g)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def _compare_inplace(x, w, b, z, activation, kw, training, dtype):
    C, device = x.shape[1], x.device
    rm = (torch.randn(C, dtype=torch.float64) * 0.1).to(device)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(device)
    g = torch.randn(x.shape, dtype=torch.float64).to(device)
    if z is None:
        # Off the kink at 0, where a rounding picks the derivative's branch.
        mod = SimpleNamespace(running_mean=rm, running_var=rv, weight=w, bias=b, eps=1e-5)
        x = avoid_kink(x.to(dtype), mod, training, margin=0.05).double()

    def run(dt, inplace):
        # 16-bit input with float32 parameters and statistics, as autocast gives.
        pdt = torch.float32 if dt in (torch.bfloat16, torch.float16) else dt

        def fn(xl, wl, bl, zl):
            stats = (rm.to(pdt).clone(), rv.to(pdt).clone())
            if not inplace:
                return _eager(xl, *stats, wl, bl, training, activation, kw, zl)
            # In place on a non-leaf: its gradient flows to the leaf.
            return fusedbn.batch_norm_act(xl.clone(), *stats, wl, bl, training, 0.1, 1e-5,
                                          activation, residual=zl, inplace=True, **kw)
        cast = [t.to(d) if t is not None else None for t, d in zip((x, w, b, z), (dt, pdt, pdt, dt))]
        return _grads(fn, *cast, g.to(dt))

    fused, eager, ref = run(dtype, True), run(dtype, False), run(torch.float64, False)
    for name, a, e, r in zip(("out", "grad_input", "grad_weight", "grad_bias", "grad_residual"),
                             fused, eager, ref):
        if a is None:
            continue
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert_close(a, e, r, name=name, compute_dtype=dtype, vs64=True)


@pytest.mark.parametrize("activation,kw", INVERTIBLE, ids=INV_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weight", [0.0, 1e-20, 1e-6, 1e-3, 0.2, 0.26, 1.0, -0.3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_small_weight_next_to_bias(device, activation, kw, dtype, weight, training):
    """The issue's case: b = 1, |w| from 0 to 1. Before per-channel keeping,
    only w == 0 kept the input: at w = 1e-6 grad_weight was 2.4% off, at
    1e-20 it was 0."""
    seed("inplace-small-weight", activation, dtype, weight, training)
    x = (torch.randn(4, 3, 4, dtype=torch.float64) + 0.3).to(device)
    w = torch.tensor([weight, 1.0, 0.5], dtype=torch.float64, device=device)
    b = torch.tensor([1.0, -0.2, 3.0], dtype=torch.float64,
                     device=device)  # channel 2: |b|/|w| = 6, kept
    _compare_inplace(x, w, b, None, activation, kw, training, dtype)


@pytest.mark.parametrize("activation,kw", INVERTIBLE, ids=INV_IDS)
@pytest.mark.parametrize("residual_scale", [0.1, 1e3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_large_residual(device, activation, kw, residual_scale, channels_last):
    seed("inplace-residual", activation, residual_scale, channels_last)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64).to(device)
    z = (torch.randn(2, 5, 3, 3, dtype=torch.float64) * residual_scale).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        z = z.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(5, dtype=torch.float64) + 0.5).to(device)
    b = (torch.randn(5, dtype=torch.float64) * 0.1).to(device)
    _compare_inplace(x, w, b, z, activation, kw, True, torch.float32)


@pytest.mark.parametrize("with_residual", [False, True])
def test_kept_channels_follow_the_rule(device, with_residual):
    """forward_ keeps exactly the channels with (|b| + max|z|) / |w| > 4, NaN
    included, and their inputs as they were before the output overwrote them."""
    x = torch.randn(3, 6, 5).to(device)
    w = torch.tensor([1.0, 0.0, 1e-3, 0.25, float("nan"), -2.0], device=device)
    b = torch.tensor([4.0, 0.0, 0.0, 1.01, 0.0, -8.0], device=device)
    z = torch.zeros(3, 6, 5, device=device)
    z[1, 5, 2] = -0.5  # channel 5: (8 + 0.5) / 2 > 4
    expected = [1, 3, 4] + ([5] if with_residual else [])
    expected = sorted(expected + ([2] if with_residual else []))
    if with_residual:
        z[0, 2, 0] = 1.0  # channel 2: 1 / 1e-3 > 4
    x0 = x.clone()
    out, mean, invstd, kept, idx = FORWARD_(
        x, z if with_residual else None, w, b, None, None, None, True, 0.1, 1e-5, "identity",
        0.01, 1.0)
    assert out.data_ptr() == x.data_ptr()
    assert idx.dtype == torch.long and idx.tolist() == expected
    assert kept.shape == (3, len(expected), 5) and kept.is_contiguous()
    assert torch.equal(kept, x0[:, expected])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_keeps_every_channel(device, dtype):
    """Recovering xhat from an 8- or 11-bit output cannot meet eager's
    precision (glue.cpp: kept_channels), so 16-bit in-place keeps the input."""
    x = torch.randn(3, 4, 5).to(device=device, dtype=dtype)
    x0 = x.clone()
    *_, kept, idx = FORWARD_(x, None, torch.ones(4, device=device), torch.zeros(4, device=device),
                             None, None, None, True, 0.1, 1e-5, "identity", 0.01, 1.0)
    assert idx.tolist() == [0, 1, 2, 3] and torch.equal(kept, x0)


def test_no_parameters_keep_nothing(device):
    x = torch.randn(4, 3, device=device)
    *_, kept, idx = FORWARD_(x, None, None, None, None, None, None, True, 0.1, 1e-5,
                             "identity", 0.01, 1.0)
    assert idx.numel() == 0 and kept.shape == (4, 0)


# ------------------------------------------------------------------ views

def _view_cases():
    # (name, make(base) -> view of base that the op writes over)
    return [
        ("slice", lambda t: t[:, 1:4]),
        ("permute", lambda t: t.permute(0, 2, 1, 3)),
        ("view", lambda t: t.view(2, 5, 12)),
        ("select-batch", lambda t: t[1:]),
    ]


@pytest.mark.parametrize("name,make", _view_cases(), ids=[n for n, _ in _view_cases()])
@pytest.mark.parametrize("activation,kw", INVERTIBLE, ids=INV_IDS)
def test_inplace_on_view(device, name, make, activation, kw):
    """In place on a view of a tensor that needs grad works as eager in-place
    ops do: the base sees the output, gradients flow through the view."""
    seed("inplace-view", name, activation)
    leaf = torch.randn(2, 5, 3, 4, dtype=torch.float64).to(device).requires_grad_()
    C = make(leaf.detach()).shape[1]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    b = (torch.randn(C, dtype=torch.float64) * 0.2).to(device).requires_grad_()
    g = torch.randn(leaf.shape, dtype=torch.float64).to(device)

    def run(inplace):
        lf = leaf.detach().clone().requires_grad_()
        wl, bl = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        base = lf * 1.0
        v = make(base)
        rm = torch.zeros(C, dtype=torch.float64, device=device)
        rv = torch.ones(C, dtype=torch.float64, device=device)
        if inplace:
            out = fusedbn.batch_norm_act(v, rm, rv, wl, bl, True, 0.1, 1e-5, activation,
                                         inplace=True, **kw)
            assert out is v
        else:
            v.copy_(_eager(v.clone(), rm, rv, wl, bl, True, activation, kw))
        (base * g).sum().backward()
        return base.detach(), lf.grad, wl.grad, bl.grad, rm, rv

    for name_, a, e in zip(("base", "grad_leaf", "grad_w", "grad_b", "rm", "rv"),
                           run(True), run(False)):
        # float64, but 10x assert_close's rtol: in place recovers the input
        # through the inverted activation and affine map (extra roundings).
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name_}: {m}")


def _stats(device):
    return (torch.zeros(3, device=device), torch.ones(3, device=device),
            torch.tensor(5, dtype=torch.long, device=device))


def _assert_untouched(rm, rv, nbt):
    assert torch.equal(rm, torch.zeros(3, device=rm.device))
    assert torch.equal(rv, torch.ones(3, device=rv.device))
    assert nbt.item() == 5


@pytest.mark.parametrize("case", ["leaf", "expanded", "unbind-view", "nograd-view",
                                  "overlapping-weight"])
def test_forbidden_inplace_raises_before_touching_buffers(device, case):
    """Where PyTorch refuses an in-place write, the error comes before the
    running statistics, num_batches_tracked or the input change."""
    rm, rv, nbt = _stats(device)
    w = torch.ones(3, device=device, requires_grad=True)
    if case == "leaf":
        x = torch.randn(4, 3, device=device, requires_grad=True)
        err = "leaf Variable that requires grad"
    elif case == "expanded":
        x = torch.randn(1, 3, device=device).expand(4, 3)
        err = "more than one element of the written-to tensor"
    elif case == "unbind-view":
        x = torch.randn(2, 4, 3, device=device, requires_grad=True).clone().unbind(0)[0]
        err = "returns multiple views"
    elif case == "nograd-view":
        base = torch.randn(4, 3, device=device, requires_grad=True).clone()
        with torch.no_grad():
            x = base[1:]
        err = "no_grad mode"
    else:
        storage = torch.randn(5, 3, device=device)
        x = storage[1:]
        w = storage[2].detach()
        err = "unsupported operation"
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match=err):
        fusedbn.batch_norm_act(x, rm, rv, w, None, True, 0.1, 1e-5, "leaky_relu",
                               inplace=True, num_batches_tracked=nbt)
    _assert_untouched(rm, rv, nbt)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("activation,with_weight", [("leaky_relu", True), ("elu", False)],
                         ids=["leaky_relu-weight", "elu-no_weight"])
def test_double_backward_through_inplace_still_raises(device, activation, with_weight):
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64, device=device, requires_grad=True) if with_weight
         else None)
    y = fusedbn.batch_norm_act(x * 1.0, None, None, w, None, True, 0.1, 1e-5, activation,
                               inplace=True)
    (gx,) = torch.autograd.grad(y.pow(2).sum() if not with_weight else y.sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through inplace=True"):
        gx.sum().backward()


def test_module_inplace_on_leaf_and_reused_input_raise_pytorch_errors(device):
    fused = fusedbn.BatchNormAct2d(4, activation="elu", inplace=True).to(device)
    leaf = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fused(leaf)
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    h = x * 2
    other = (h * h).sum()  # saves h for its backward
    out = fused(h)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + out.sum()).backward()


def test_inplace_keeps_only_the_output(device):
    seed("inplace-saved")
    fused = fusedbn.BatchNormAct2d(4, activation="leaky_relu", inplace=True).to(device)
    x = torch.randn(3, 4, 5, 5).to(device).requires_grad_()
    h = x * 1
    full = []

    def pack(t):
        if t.numel() == h.numel():
            full.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused(h)
    assert full == [y.data_ptr()]


def test_module_zero_weight_falls_back_to_the_input(device):
    seed("inplace-w0")
    ref = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
        ref.weight[1] = 0
    fused = fusedbn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.1,
                                   inplace=True).double()
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(device), fused.to(device)
    x = (torch.randn(3, 4, 5, 3, dtype=torch.float64) * 2 + 1).to(device)
    xr, leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = apply_activation(ref(xr), "leaky_relu", negative_slope=0.1)
    y = fused(leaf * 1)
    y_ref.sum().backward()
    y.sum().backward()
    assert_close(y, y_ref, name="out")
    assert_close(leaf.grad, xr.grad, name="grad_input")
    assert_close(fused.weight.grad, ref.weight.grad, name="grad_weight")
