"""order="act_bn": BatchNorm(act(x)) -- the activation first, then the
normalization, no activation after it -- against eager act + nn.BatchNormNd:
outputs, gradients and running statistics, gradcheck / gradgradcheck,
opcheck, torch.compile, and the combinations it refuses."""
import contextlib
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import fusedbn
from helpers import (ACT_IDS, ACTIVATIONS, ALL_DTYPES, LOW_DTYPES, SHAPES, CompileNet,
                     EagerBNAct, EagerCompileNet, apply_activation, assert_close, clone_layout, compare_buffers, eager_like,
                     make_fused, make_input, op_args, output_mask, run_step, seed, step,
                     sync_buffers)

FORWARD = torch.ops.fusedbn.forward.default
BACKWARD = torch.ops.fusedbn.backward.default

NONLINEAR = ACTIVATIONS[1:]
NONLINEAR_IDS = ACT_IDS[1:]
DTYPE_IDS = [str(d).replace("torch.", "") for d in ALL_DTYPES]
NAMES = ("out", "grad_input", "grad_weight", "grad_bias")
ORDER_ERROR = r"order='act_bn'"

# A subset of helpers.RANK_LAYOUTS: every rank, both dense layouts (the
# non-dense "strided" one, computed on a contiguous copy, is in
# test_module_configs).
RANK_LAYOUTS = [(2, "contiguous"), (3, "nlc"), (4, "contiguous"), (4, "channels_last"),
                (5, "channels_last")]
RL_IDS = [f"{r}d-{lay}" for r, lay in RANK_LAYOUTS]


class EagerActBN(EagerBNAct):
    """The reference for order="act_bn": the activation, then eager
    nn.BatchNormNd (``.bn``, so the helpers' bn_of / sync_buffers apply)."""

    def forward(self, x):
        return self.bn(apply_activation(x, self.activation, self.negative_slope, self.alpha))


def eager_act_bn(mod, dtype=None):
    e = eager_like(mod, dtype)
    return EagerActBN(e.bn, e.activation, e.negative_slope, e.alpha)


def off_kink(x, margin=1e-3):
    """x with the elements within ``margin`` of 0 moved to +-0.0625, in x's
    own layout. With order="act_bn" the activation's kink is at the input's
    0 (not at the BatchNorm output's, as helpers.avoid_kink assumes)."""
    near = x.detach().double().abs() < margin
    if not near.any():
        return x
    x = clone_layout(x)
    with torch.no_grad():
        x[near] = torch.where(x.double()[near] < 0, -0.0625, 0.0625).to(x.dtype)
    return x


@contextlib.contextmanager
def single_thread():
    """Run the eager references on one thread: on these tiny tensors their
    parallel regions only cost time (a lot of it on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def both_branches(x):
    """x shifted per channel so that 30% to 70% of each channel's values are
    negative: both branches of the activation well populated. (An input with
    almost no positive value makes relu(x) a spike of one value among zeros,
    whose float32 BatchNorm backward is ill-conditioned: fusedbn's float32
    grad_input is then a few times further from float64 than eager's, and the
    elementwise float32 tolerance fails on rounding, not on a wrong formula;
    also with order="bn_act" on such data.)"""
    C = x.shape[1]
    xd = x.detach().double()
    flat = xd.transpose(0, 1).reshape(C, -1)
    q = torch.linspace(0.3, 0.7, C, dtype=torch.float64, device=x.device)
    shift = torch.stack([torch.quantile(flat[c], q[c]) for c in range(C)])
    y = clone_layout(x)
    with torch.no_grad():
        y.copy_((xd - shift.view([1, C] + [1] * (x.dim() - 2))).to(x.dtype))
    return y


def compare_act_bn(fused, ref, ref64, x, training):
    """One forward + backward on fused, eager (same dtypes) and the float64
    eager reference, judged by helpers.assert_close; then the running
    statistics. The references first take fused's buffers."""
    sync_buffers(fused, ref, ref64)
    x = off_kink(both_branches(x))
    g = torch.randn(x.shape, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    res_f = step(fused, x, g, training)
    with single_thread():
        res_e = step(ref, x, g, training)
        res_64 = step(ref64, x.double(), g.double(), training)
    for name, a, e, r in zip(NAMES, res_f, res_e, res_64):
        assert_close(a, e, r, name=name, compute_dtype=x.dtype)
    compare_buffers(fused, ref, ref64, x.dtype)
    return res_f


def _setup(rank, activation, kwargs, dtype, param_dtype=None, device="cpu", **mod_kwargs):
    C = SHAPES[rank][1]
    fused = make_fused(rank, C, activation, kwargs, dtype=dtype, param_dtype=param_dtype,
                       order="act_bn", device=device, **mod_kwargs)
    assert fused.order == "act_bn"
    return fused, eager_act_bn(fused), eager_act_bn(fused, torch.float64)


# ------------------------------------------------------------ vs eager

@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS, ids=RL_IDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_matrix(device, act, dtype, rank, layout):
    """A training step (batch statistics, running statistics updated), then
    an eval step with the running statistics just updated."""
    activation, kwargs = act
    seed("act_bn", activation, dtype, rank, layout)
    fused, ref, ref64 = _setup(rank, activation, kwargs, dtype, device=device)
    for training in (True, False):
        x = make_input(SHAPES[rank], dtype, layout, device=device)
        out = compare_act_bn(fused, ref, ref64, x, training)[0]
        if layout == "channels_last":
            fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
            assert out.is_contiguous(memory_format=fmt)
    assert fused.num_batches_tracked.item() == 1


CONFIGS = {
    "affine_false": dict(affine=False),
    "bias_false": dict(bias=False),
    "nostats": dict(track_running_stats=False),
    "momentum_none": dict(momentum=None),
    "eps_1e-3": dict(eps=1e-3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_module_configs(device, config, dtype):
    # One layout per activation, "strided" (non-dense: a contiguous copy) included.
    for (activation, kwargs), layout in zip(NONLINEAR, ("contiguous", "channels_last", "strided")):
        seed("act_bn-config", activation, config, dtype)
        fused, ref, ref64 = _setup(4, activation, kwargs, dtype, device=device, **CONFIGS[config])
        for training in (True, True, False):
            compare_act_bn(fused, ref, ref64,
                           make_input(SHAPES[4], dtype, layout, device=device), training)


@pytest.mark.parametrize("rank,layout", [(3, "nlc"), (4, "channels_last")], ids=["3d-nlc", "4d-cl"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=["bfloat16", "float16"])
def test_mixed_float32_params_low_precision_input(device, dtype, rank, layout):
    """Module in float32, input in bf16/fp16 (what autocast produces)."""
    for activation, kwargs in NONLINEAR:
        seed("act_bn-mixed", activation, dtype, rank, layout)
        fused, ref, ref64 = _setup(rank, activation, kwargs, dtype, param_dtype=torch.float32,
                                   device=device)
        for training in (True, False):
            x = make_input(SHAPES[rank], dtype, layout, device=device)
            out, gi, gw, _ = compare_act_bn(fused, ref, ref64, x, training)
            assert out.dtype == gi.dtype == dtype and gw.dtype == torch.float32
            assert fused.running_mean.dtype == torch.float32


@pytest.mark.parametrize("act", NONLINEAR, ids=NONLINEAR_IDS)
def test_functional_matches_eager(device, act):
    """batch_norm_act(order="act_bn") vs F.batch_norm(act(x)): output and the
    running statistics (updated in place), num_batches_tracked, no stats."""
    activation, kwargs = act
    seed("act_bn-functional", activation)
    x = off_kink(both_branches(make_input((3, 4, 5), device=device)))
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


def test_momentum_none_is_cumulative_average_of_activated_input(device):
    seed("act_bn-cma")
    mod = make_fused(4, 3, "relu", {}, momentum=None, order="act_bn", device=device)
    xs = [make_input((2, 3, 3, 3), device=device) for _ in range(3)]
    for x in xs:
        mod(x)
    a = [F.relu(x).double() for x in xs]
    dims = (0, 2, 3)
    torch.testing.assert_close(mod.running_mean.double(),
                               torch.stack([t.mean(dims) for t in a]).mean(0), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(mod.running_var.double(),
                               torch.stack([t.var(dims, unbiased=True) for t in a]).mean(0),
                               rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("cls,rank", [(fusedbn.BatchNormReLU1d, 3), (fusedbn.BatchNormReLU2d, 4),
                                      (fusedbn.BatchNormReLU3d, 5)],
                         ids=["ReLU1d", "ReLU2d", "ReLU3d"])
def test_relu_variants(device, cls, rank):
    seed("act_bn-relu-variant", rank)
    C = SHAPES[rank][1]
    fused = cls(C, order="act_bn").to(device)
    assert fused.order == "act_bn" and fused.activation == "relu"
    assert "order=act_bn" in repr(fused)
    with torch.no_grad():
        fused.weight.copy_(torch.rand(C) + 0.5)
        fused.bias.copy_(torch.randn(C))
    ref, ref64 = eager_act_bn(fused), eager_act_bn(fused, torch.float64)
    for training in (True, False):
        compare_act_bn(fused, ref, ref64, make_input(SHAPES[rank], device=device), training)
    # The default order stays bn_act.
    assert cls(C).order == "bn_act" and "order" not in repr(cls(C))


def test_state_dict_is_nn_batchnorm():
    mod = fusedbn.BatchNormAct2d(3, activation="elu", alpha=0.5, order="act_bn")
    ref = nn.BatchNorm2d(3)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(mod.state_dict(), strict=True)
    mod.load_state_dict(ref.state_dict(), strict=True)


# ------------------------------------------------------ gradcheck

def _gc_inputs(activation, training, channels_last, key, device):
    seed("act_bn-gradcheck", activation, training, channels_last, key)
    shape, C = (2, 3, 2, 3), 3
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(device)
    # The kink is at the input's 0: keep every value 2e-2 away from it, far
    # beyond gradcheck's eps=1e-6 perturbation.
    x = off_kink(x, margin=2e-2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(C, dtype=torch.float64) + 0.5
    b = torch.randn(C, dtype=torch.float64) * 0.3
    rm = torch.randn(C, dtype=torch.float64) * 0.3
    rv = torch.rand(C, dtype=torch.float64) + 0.5
    return (x,) + tuple(t.to(device) for t in (w, b, rm, rv))


def _gc_fn(rm, rv, training, activation, kwargs):
    def f(x, w, b):
        # Fresh running statistics per call: forward updates them in place.
        return fusedbn.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5,
                                      activation, order="act_bn", **kwargs)
    return f


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", NONLINEAR, ids=NONLINEAR_IDS)
def test_gradcheck(device, act, training, channels_last):
    activation, kwargs = act
    x, w, b, rm, rv = _gc_inputs(activation, training, channels_last, "gc", device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert gradcheck(_gc_fn(rm, rv, training, activation, kwargs), args, eps=1e-6, atol=1e-5,
                     rtol=1e-4)


@pytest.mark.parametrize("channels_last,training", [(False, True), (True, True), (False, False)],
                         ids=["contiguous-train", "channels_last-train", "contiguous-eval"])
@pytest.mark.parametrize("act", NONLINEAR, ids=NONLINEAR_IDS)
def test_gradgradcheck(device, act, channels_last, training):
    """Double backward: the backward op's autograd formula
    (ops.backward_reference with order="act_bn")."""
    activation, kwargs = act
    x, w, b, rm, rv = _gc_inputs(activation, training, channels_last, "gg", device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert gradgradcheck(_gc_fn(rm, rv, training, activation, kwargs), args, eps=1e-6, atol=1e-4,
                         rtol=1e-3)


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


# ------------------------------------------------------------ opcheck

# (training, activation, kwargs, running stats?, affine?)
OP_CASES = [
    (True, "relu", {}, True, True),
    (False, "leaky_relu", {"negative_slope": 0.1}, True, True),
    (True, "elu", {"alpha": 0.7}, False, True),
    (False, "elu", {"alpha": 0.7}, True, False),
]
OP_IDS = [f"{'train' if t else 'eval'}-{a}-{'stats' if s else 'nostats'}-"
          f"{'affine' if w else 'noaffine'}" for t, a, _, s, w in OP_CASES]


def _op_forward_args(layout, requires_grad, training, activation, kwargs, stats, affine, device):
    """Forward op arguments by name, fresh buffers (forward mutates them)."""
    C = 3
    shape = (0, C, 2, 3) if layout == "zero_size" else (2, C, 2, 3)
    x = off_kink((torch.randn(shape) + 0.3).to(device))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return dict(
        input=x.requires_grad_(requires_grad),
        weight=(torch.rand(C) + 0.5).to(device).requires_grad_(requires_grad) if affine else None,
        bias=torch.randn(C).to(device).requires_grad_(requires_grad) if affine else None,
        running_mean=torch.randn(C).to(device) if stats else None,
        running_var=(torch.rand(C) + 0.5).to(device) if stats else None,
        num_batches_tracked=torch.tensor(3, dtype=torch.long, device=device) if stats else None,
        training=training, momentum=0.1, eps=1e-5, activation=activation,
        negative_slope=kwargs.get("negative_slope", 0.01), alpha=kwargs.get("alpha", 1.0),
        order="act_bn")


@pytest.mark.parametrize("layout,requires_grad", [("contiguous", False), ("channels_last", True),
                                                  ("zero_size", True)],
                         ids=["contiguous-nograd", "channels_last-grad", "zero_size-grad"])
@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
def test_opcheck_forward(device, case, layout, requires_grad):
    training, activation, kwargs, stats, affine = case
    seed("act_bn-opcheck-fwd", training, activation, layout, requires_grad)
    fwd = _op_forward_args(layout, requires_grad, training, activation, kwargs, stats, affine,
                           device)
    opcheck(FORWARD, op_args(FORWARD, **fwd))


@pytest.mark.parametrize("case,requires_grad", [(OP_CASES[0], True), (OP_CASES[1], False)],
                         ids=[OP_IDS[0] + "-grad", OP_IDS[1] + "-nograd"])
def test_opcheck_backward(device, case, requires_grad):
    training, activation, kwargs, stats, affine = case
    seed("act_bn-opcheck-bwd", training, activation, requires_grad)
    fwd = _op_forward_args("channels_last", False, training, activation, kwargs, stats, affine,
                           device)
    with torch.no_grad():
        out, save_mean, save_invstd = FORWARD(*op_args(FORWARD, **fwd))
    grad_out = torch.randn_like(out)
    if requires_grad:
        for t in (grad_out, fwd["input"], fwd["weight"], fwd["bias"]):
            t.requires_grad_()
    opcheck(BACKWARD, op_args(
        BACKWARD, grad_out=grad_out, input=fwd["input"], weight=fwd["weight"], bias=fwd["bias"],
        save_mean=save_mean, save_invstd=save_invstd, training=training, activation=activation,
        negative_slope=fwd["negative_slope"], alpha=fwd["alpha"],
        output_mask=output_mask(BACKWARD), order="act_bn"))


# ------------------------------------------------------- torch.compile

def test_compile_fullgraph_train_step_matches_eager(device):
    torch._dynamo.reset()
    seed("act_bn-compile")
    net = CompileNet("elu", alpha=0.7, order="act_bn").to(device)
    eager_fused, eager_nn = copy.deepcopy(net), EagerCompileNet(net)
    compiled = torch.compile(copy.deepcopy(net), fullgraph=True, backend="aot_eager")
    x = (torch.randn(2, 3, 6, 6) + 0.3).to(device).contiguous(memory_format=torch.channels_last)
    tol = dict(rtol=1e-4, atol=1e-5)
    try:
        for i, training in enumerate((True, True, False)):
            for m in (compiled, eager_fused, eager_nn):
                m.train(training)
            g = torch.randn(2, 2, 6, 6).to(device)
            res_c = run_step(compiled, x + i, g)
            for other, what in ((run_step(eager_fused, x + i, g), "eager fusedbn"),
                                (run_step(eager_nn, x + i, g), "eager nn")):
                torch.testing.assert_close(res_c[0], other[0], **tol, msg=f"{i} out vs {what}")
                torch.testing.assert_close(res_c[1], other[1], **tol, msg=f"{i} gx vs {what}")
                assert res_c[2].keys() == other[2].keys()
                for n in res_c[2]:
                    torch.testing.assert_close(res_c[2][n], other[2][n], **tol,
                                               msg=f"{i} grad {n} vs {what}")
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                for other in (eager_fused.bn, eager_nn.bn):
                    torch.testing.assert_close(getattr(compiled.bn, name), getattr(other, name),
                                               rtol=1e-5, atol=1e-6, msg=f"{i} {name}")
        assert compiled.bn.num_batches_tracked.item() == 2
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------- errors

C = 3


def _fn_args(device, **over):
    seed("act_bn-errors")
    a = dict(input=torch.randn(2, C, 4), running_mean=torch.randn(C),
             running_var=torch.rand(C) + 0.5, weight=torch.rand(C) + 0.5, bias=torch.randn(C),
             training=True, num_batches_tracked=torch.tensor(7), activation="relu",
             order="act_bn")
    a.update(over)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}


def _call(a):
    a = dict(a)
    return fusedbn.batch_norm_act(a.pop("input"), a.pop("running_mean"), a.pop("running_var"),
                                  **a)


def _snapshot(*tensors):
    return [t.clone() for t in tensors]


def _assert_unchanged(tensors, snap, what="buffer"):
    for t, s in zip(tensors, snap):
        assert torch.equal(t, s), f"{what} changed by a failed call: {s} -> {t}"


def _buffers(a):
    return [a["running_mean"], a["running_var"], a["num_batches_tracked"], a["input"]]


@pytest.mark.parametrize("act", NONLINEAR, ids=NONLINEAR_IDS)
def test_act_bn_with_residual_raises(device, act):
    activation, kwargs = act
    for training in (True, False):
        a = _fn_args(device, residual=torch.randn(2, C, 4), activation=activation,
                     training=training, **kwargs)
        snap = _snapshot(*_buffers(a))
        with pytest.raises(ValueError, match=ORDER_ERROR):
            _call(a)
        _assert_unchanged(_buffers(a), snap)


@pytest.mark.parametrize("act", [ACTIVATIONS[2], ACTIVATIONS[3]], ids=["leaky_relu", "elu"])
def test_act_bn_inplace_raises(device, act):
    """Invertible activations (which inplace=True otherwise accepts): the
    input is not overwritten, the buffers not updated."""
    activation, kwargs = act
    a = _fn_args(device, inplace=True, activation=activation, **kwargs)
    snap = _snapshot(*_buffers(a))
    with pytest.raises(ValueError, match=ORDER_ERROR):
        _call(a)
    _assert_unchanged(_buffers(a), snap)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_module_act_bn_inplace_raises_at_construction(act):
    activation, kwargs = act
    with pytest.raises(ValueError, match=ORDER_ERROR):
        fusedbn.BatchNormAct2d(C, activation=activation, order="act_bn", inplace=True, **kwargs)
    with pytest.raises(ValueError, match=ORDER_ERROR):
        fusedbn.BatchNormReLU2d(C, order="act_bn", inplace=True)


@pytest.mark.parametrize("act", NONLINEAR, ids=NONLINEAR_IDS)
def test_module_act_bn_residual_raises(device, act):
    activation, kwargs = act
    mod = fusedbn.BatchNormAct2d(C, activation=activation, order="act_bn", **kwargs).to(device)
    x, z = torch.randn(2, C, 3, 3, device=device), torch.randn(2, C, 3, 3, device=device)
    for training in (True, False):
        mod.train(training)
        snap = {k: v.clone() for k, v in mod.named_buffers()}
        with pytest.raises(ValueError, match=ORDER_ERROR):
            mod(x, z)
        for k, v in mod.named_buffers():
            assert torch.equal(v, snap[k]), f"{k} changed by a failed call"


BAD_ORDERS = ["act-bn", "ACT_BN", "bn", "", "relu"]
BOTH_ORDERS = r"unknown order .*'bn_act'.*'act_bn'"


@pytest.mark.parametrize("order", BAD_ORDERS)
def test_unknown_order_functional(device, order):
    for training in (True, False):
        a = _fn_args(device, order=order, training=training)
        snap = _snapshot(*_buffers(a))
        with pytest.raises(ValueError, match=BOTH_ORDERS) as info:
            _call(a)
        assert repr(order) in str(info.value)
        _assert_unchanged(_buffers(a), snap)


def test_unknown_order_not_a_string(device):
    a = _fn_args(device, order=None)
    snap = _snapshot(*_buffers(a))
    with pytest.raises((ValueError, TypeError), match=r"order"):
        _call(a)
    _assert_unchanged(_buffers(a), snap)


@pytest.mark.parametrize("order", BAD_ORDERS)
def test_unknown_order_module(order):
    with pytest.raises(ValueError, match=BOTH_ORDERS):
        fusedbn.BatchNormAct2d(C, order=order)
    with pytest.raises(ValueError, match=BOTH_ORDERS):
        fusedbn.BatchNormReLU1d(C, order=order)


def test_unknown_order_module_at_call_time(device):
    mod = fusedbn.BatchNormAct2d(C).to(device)
    mod.order = "act_then_bn"
    snap = {k: v.clone() for k, v in mod.named_buffers()}
    with pytest.raises(ValueError, match=BOTH_ORDERS):
        mod(torch.randn(2, C, 3, 3, device=device))
    for k, v in mod.named_buffers():
        assert torch.equal(v, snap[k]), f"{k} changed by a failed call"


def test_unknown_order_ops(device):
    """The C++ operators check the order themselves (callers of
    torch.ops.fusedbn.* skip the Python checks)."""
    a = _fn_args(device)
    snap = _snapshot(*_buffers(a))
    vals = {k: v for k, v in a.items() if k != "order"}
    vals.update(momentum=0.1, eps=1e-5, negative_slope=0.01, alpha=1.0)
    with pytest.raises(ValueError, match=BOTH_ORDERS):
        FORWARD(*op_args(FORWARD, order="bnact", **vals))
    _assert_unchanged(_buffers(a), snap)
    x = a["input"]
    with pytest.raises(ValueError, match=BOTH_ORDERS):
        BACKWARD(*op_args(BACKWARD, grad_out=torch.randn_like(x), input=x, weight=a["weight"],
                          bias=a["bias"], save_mean=torch.zeros(C, device=device),
                          save_invstd=torch.ones(C, device=device),
                          training=True, activation="relu", negative_slope=0.01, alpha=1.0,
                          output_mask=output_mask(BACKWARD), order="bnact"))


def test_backward_op_act_bn_refuses_residual_and_from_output(device):
    x = torch.randn(2, C, 4, device=device)
    ones, zeros = torch.ones(C, device=device), torch.zeros(C, device=device)
    common = dict(grad_out=torch.randn_like(x), input=x, weight=ones,
                  bias=zeros, save_mean=zeros, save_invstd=ones,
                  training=True, activation="leaky_relu", negative_slope=0.1, alpha=1.0,
                  output_mask=output_mask(BACKWARD), order="act_bn")
    with pytest.raises(ValueError, match=ORDER_ERROR):
        BACKWARD(*op_args(BACKWARD, residual=torch.randn_like(x), **common))
    with pytest.raises(ValueError, match=ORDER_ERROR):
        BACKWARD(*op_args(BACKWARD, from_output=True, **common))


def test_error_message_names_the_order(device):
    """The messages say what order='act_bn' computes, so the user sees why."""
    with pytest.raises(ValueError) as info:
        _call(_fn_args(device, residual=torch.randn(2, C, 4)))
    assert re.search(r"residual", str(info.value)), str(info.value)
