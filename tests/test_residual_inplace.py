"""Residual fusion act(bn(x) + z), in-place activated BatchNorm, and double
backward, against eager nn.BatchNormNd + add + activation."""
import pytest
import torch
import torch.nn as nn

from helpers import ACTIVATIONS, EAGER_MODULES, FUSED_MODULES, apply_activation, seed

import fusedbn

INVERTIBLE = [(a, kw) for a, kw in ACTIVATIONS if a != "relu"]
# "wide": 83 channels (the channels-last loops' chunks of 64, 16 and 1) and
# planes of 81 values (the contiguous backward's plane-by-plane sums).
SHAPES = {2: (6, 3), 4: (3, 4, 5, 3), "wide": (3, 83, 9, 9)}


def _pair(rank, activation, kw, dtype, inplace=False, device="cpu"):
    C = SHAPES[rank][1]
    rank = len(SHAPES[rank])
    ref = EAGER_MODULES[rank](C).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    fused = FUSED_MODULES[rank](C, activation=activation, inplace=inplace, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device), fused.to(device)


def _inputs(rank, dtype, channels_last, device="cpu"):
    x = (torch.randn(SHAPES[rank], dtype=torch.float64) * 2 + 1).to(device=device, dtype=dtype)
    z = torch.randn(SHAPES[rank], dtype=torch.float64).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, z


def _tol(dtype):
    return dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)


CASES = [(rank, cl) for rank in (2, 4, "wide") for cl in ((False,) if rank == 2 else (False, True))]


@pytest.mark.parametrize("activation,kw", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank,channels_last", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_residual_matches_eager(device, activation, kw, dtype, rank, channels_last, training):
    seed("residual", activation, dtype, rank, channels_last, training)
    ref, fused = _pair(rank, activation, kw, dtype, device=device)
    ref.train(training)
    fused.train(training)
    x, z = _inputs(rank, dtype, channels_last, device)
    xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()
    xf, zf = x.clone().requires_grad_(), z.clone().requires_grad_()
    y_ref = apply_activation(ref(xr) + zr, activation, **kw)
    y = fused(xf, zf)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    tol = _tol(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(xf.grad, xr.grad, **tol)
    torch.testing.assert_close(zf.grad, zr.grad, **tol)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, **tol)
    torch.testing.assert_close(fused.running_var, ref.running_var, **tol)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_residual_only_residual_grad(device):
    seed("residual-z-only")
    _, fused = _pair(4, "relu", {}, torch.float32, device=device)
    x, z = _inputs(4, torch.float32, False, device)
    zf = z.clone().requires_grad_()
    for p in fused.parameters():
        p.requires_grad_(False)
    y = fused(x, zf)
    (g,) = torch.autograd.grad(y.sum(), zf)
    pre = fused.weight.view(1, -1, 1, 1) * (x - x.mean((0, 2, 3), keepdim=True)) \
        / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + fused.eps) \
        + fused.bias.view(1, -1, 1, 1) + z
    torch.testing.assert_close(g, (pre > 0).float(), atol=0, rtol=0)


@pytest.mark.parametrize("activation,kw", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_with_residual(device, activation, kw, training):
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

    assert torch.autograd.gradcheck(f, (x, z, w, b))
    assert torch.autograd.gradgradcheck(f, (x, z, w, b), atol=1e-5)


@pytest.mark.parametrize("activation,kw", INVERTIBLE, ids=[a for a, _ in INVERTIBLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank,channels_last", CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_inplace_matches_eager(device, activation, kw, dtype, rank, channels_last, training,
                               residual):
    seed("inplace", activation, dtype, rank, channels_last, training, residual)
    ref, fused = _pair(rank, activation, kw, dtype, inplace=True, device=device)
    ref.train(training)
    fused.train(training)
    x, z = _inputs(rank, dtype, channels_last, device)
    xr = x.clone().requires_grad_()
    zr = z.clone().requires_grad_() if residual else None
    y_ref = apply_activation(ref(xr) + (zr if residual else 0), activation, **kw)
    leaf = x.clone().requires_grad_()
    zf = z.clone().requires_grad_() if residual else None
    h = leaf * 1  # an intermediate the layer may overwrite
    y = fused(h, zf)
    assert y.data_ptr() == h.data_ptr()
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    tol = _tol(dtype) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(leaf.grad, xr.grad, **tol)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, **tol)
    if residual:
        torch.testing.assert_close(zf.grad, zr.grad, **tol)
    torch.testing.assert_close(fused.running_mean, ref.running_mean, **tol)


def test_inplace_keeps_only_the_output(device):
    seed("inplace-saved")
    fused = FUSED_MODULES[4](4, activation="leaky_relu", inplace=True).to(device)
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


def test_inplace_zero_weight_falls_back_to_the_input(device):
    seed("inplace-w0")
    ref, fused = _pair(4, "leaky_relu", {"negative_slope": 0.1}, torch.float64, inplace=True,
                       device=device)
    with torch.no_grad():
        ref.weight[1] = 0
        fused.weight[1] = 0
    x, _ = _inputs(4, torch.float64, False, device)
    xr, leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = apply_activation(ref(xr), "leaky_relu", negative_slope=0.1)
    y = fused(leaf * 1)
    y_ref.sum().backward()
    y.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(leaf.grad, xr.grad)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad)


def test_inplace_refuses_relu(device):
    with pytest.raises(ValueError, match="ReLU"):
        fusedbn.BatchNormAct2d(4, inplace=True)
    with pytest.raises(ValueError, match="invertible"):
        fusedbn.batch_norm_act(torch.randn(2, 4, 3, 3, device=device), None, None, training=True,
                               inplace=True)
    with pytest.raises(ValueError, match="invertible"):
        fusedbn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.0, inplace=True)


def test_inplace_on_leaf_and_reused_input_raise_pytorch_errors(device):
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


def test_inplace_double_backward_says_unsupported(device):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = fusedbn.batch_norm_act(x * 1, None, None, training=True, activation="elu", inplace=True)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through inplace"):
        g.sum().backward()


def test_residual_shape_mismatch_is_refused(device):
    x = torch.randn(2, 4, 3, 3, device=device)
    with pytest.raises(ValueError, match="residual has shape"):
        fusedbn.batch_norm_act(x, None, None, training=True,
                               residual=torch.randn(2, 4, 3, 2, device=device))
    with pytest.raises(TypeError, match="residual dtype"):
        fusedbn.batch_norm_act(x, None, None, training=True,
                               residual=torch.randn(2, 4, 3, 3, device=device).double())
