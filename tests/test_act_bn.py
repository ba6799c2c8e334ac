"""order="act_bn": what is specific to BatchNorm(act(x)) -- the functional
form against F.batch_norm(act(x)), the backward op called directly, the
identity making both orders one op, relu telling them apart. (Its matrix
against eager, configurations, gradcheck, opcheck, compile and errors are in
the concern files, with the order as one of their parameters.)"""
import pytest
import torch
import torch.nn.functional as F

import fusedbn
from helpers import (ACT_IDS, ACTIVATIONS, SHAPES, apply_activation, assert_close,
                     both_branches, make_fused, make_input, off_kink, op_args, output_mask, seed,
                     step)

FORWARD = torch.ops.fusedbn.forward.default
BACKWARD = torch.ops.fusedbn.backward.default

NONLINEAR = ACTIVATIONS[1:]
NONLINEAR_IDS = ACT_IDS[1:]
NAMES = ("out", "grad_input", "grad_weight", "grad_bias")


@pytest.mark.parametrize("act", NONLINEAR, ids=NONLINEAR_IDS)
def test_functional_matches_eager(device, act):
    """batch_norm_act(order="act_bn") vs F.batch_norm(act(x)): output and the
    running statistics (updated in place), num_batches_tracked, no stats."""
    activation, kwargs = act
    seed("act_bn-functional", activation)
    x = off_kink(both_branches(make_input((3, 4, 5), device=device)), activation=activation,
                 **kwargs)
    w, b = (torch.rand(4) + 0.5).to(device), torch.randn(4).to(device)
    rm, rv = torch.randn(4).to(device), (torch.rand(4) + 0.5).to(device)
    nbt = torch.tensor(4, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    a = apply_activation(x, activation, **kwargs)
    for training in (True, False):
        out = fusedbn.batch_norm_act(x, rm, rv, w, b, training, 0.2, 1e-4, activation,
                                     num_batches_tracked=nbt, order="act_bn", **kwargs)
        exp = F.batch_norm(a, rm2, rv2, w, b, training, 0.2, 1e-4)
        assert_close(out, exp, name=f"out (training={training})")
        assert_close(rm, rm2, name="running_mean")
        assert_close(rv, rv2, name="running_var")
    assert nbt.item() == 5
    out = fusedbn.batch_norm_act(x, None, None, w, b, True, activation=activation,
                                 order="act_bn", **kwargs)
    assert_close(out, F.batch_norm(a, None, None, w, b, True), name="out (no stats)")
    out = fusedbn.batch_norm_act(x, None, None, None, None, True, activation=activation,
                                 order="act_bn", **kwargs)
    assert_close(out, F.batch_norm(a, None, None, None, None, True), name="out (no affine)")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contiguous"),
                                          (torch.float64, "channels_last"),
                                          (torch.bfloat16, "strided")],
                         ids=["float32", "float64-cl", "bfloat16-strided"])
def test_identity_orders_identical(device, dtype, layout, training):
    """With the identity both orders are the same BatchNorm: bitwise equal
    outputs, gradients and running statistics."""
    seed("act_bn-identity", dtype, layout, training)
    mods = [make_fused(4, 3, "identity", {}, dtype=dtype, order=o, device=device)
            for o in ("bn_act", "act_bn")]
    mods[1].load_state_dict(mods[0].state_dict())
    x = make_input(SHAPES[4], dtype, layout, device=device)
    g = torch.randn(x.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    (r0, r1) = [step(m, x, g, training) for m in mods]
    for name, a, b in zip(NAMES, r0, r1):
        assert torch.equal(a, b), name
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(mods[0], name), getattr(mods[1], name)), name


def test_orders_differ_for_relu(device):
    """The order is honoured: bn(relu(x)) is not relu(bn(x))."""
    seed("act_bn-differ")
    x = make_input(SHAPES[4], device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    outs = [fusedbn.batch_norm_act(x, rm.clone(), rv.clone(), training=True, activation="relu",
                                   order=o) for o in ("bn_act", "act_bn")]
    assert (outs[0] >= 0).all() and (outs[1] < 0).any()
    torch.testing.assert_close(outs[1], F.batch_norm(F.relu(x), None, None, training=True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_op_matches_eager_autograd(device, training):
    """torch.ops.fusedbn.backward with its trailing order="act_bn" argument,
    called directly with the forward op's saved statistics."""
    seed("act_bn-bwd-op", training)
    activation, kwargs = ACTIVATIONS[3]
    x = off_kink(make_input((2, 3, 4, 5), torch.float64, device=device))
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    g = torch.randn(x.shape, dtype=torch.float64)
    w, b, rm, rv, g = (t.to(device) for t in (w, b, rm, rv, g))
    vals = dict(weight=w, bias=b, running_mean=rm.clone(), running_var=rv.clone(),
                training=training, momentum=0.1, eps=1e-5, activation=activation,
                negative_slope=0.01, alpha=kwargs["alpha"], order="act_bn")
    _, save_mean, save_invstd = FORWARD(*op_args(FORWARD, input=x, **vals))
    gi, gw, gb = BACKWARD(*op_args(
        BACKWARD, grad_out=g, input=x, weight=w, bias=b, save_mean=save_mean,
        save_invstd=save_invstd, training=training, activation=activation, negative_slope=0.01,
        alpha=kwargs["alpha"], output_mask=output_mask(BACKWARD), order="act_bn"))[:3]
    xe, we, be = (t.clone().requires_grad_() for t in (x, w, b))
    F.batch_norm(F.elu(xe, kwargs["alpha"]), rm.clone(), rv.clone(), we, be, training, 0.1,
                 1e-5).backward(g)
    assert_close(gi, xe.grad, name="grad_input")
    assert_close(gw, we.grad, name="grad_weight")
    assert_close(gb, be.grad, name="grad_bias")
