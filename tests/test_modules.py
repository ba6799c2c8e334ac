"""The modules as drop-ins for nn.BatchNormNd (+ activation): parameters,
buffers, state_dict both ways, repr, dtype/mode switches."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedbn
from helpers import (ACT_IDS, ACTIVATIONS, apply_activation, assert_close, compare_steps, eager_like, make_input,
                     seed)

PAIRS = [(fusedbn.BatchNormAct1d, nn.BatchNorm1d, (4, 3, 5)),
         (fusedbn.BatchNormAct2d, nn.BatchNorm2d, (2, 3, 4, 4)),
         (fusedbn.BatchNormAct3d, nn.BatchNorm3d, (2, 3, 2, 3, 3))]
PAIR_IDS = ["1d", "2d", "3d"]


def _randomize(bn):
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features))
        bn.running_mean.copy_(torch.randn(bn.num_features))
        bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
        bn.num_batches_tracked.fill_(11)
    return bn


@pytest.mark.parametrize("fused_cls,nn_cls,shape", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_state_dict_from_nn_loads_strict_and_matches(device, act, fused_cls, nn_cls, shape):
    activation, kwargs = act
    seed("sd-from-nn", activation, shape)
    ref = _randomize(nn_cls(3)).to(device)
    mod = fused_cls(3, activation=activation, **kwargs).to(device)
    result = mod.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(shape).to(device)
    for training in (False, True):
        ref.train(training)
        mod.train(training)
        assert_close(mod(x), apply_activation(ref(x), activation, **kwargs), name="out")
        for name, buf in ref.named_buffers():
            # Tighter than assert_close's atol: the running statistics are one
            # rounding of the batch's, near 1 in size.
            torch.testing.assert_close(getattr(mod, name), buf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused_cls,nn_cls,shape", PAIRS, ids=PAIR_IDS)
def test_state_dict_to_nn_loads_strict(device, fused_cls, nn_cls, shape):
    seed("sd-to-nn", shape)
    mod = _randomize(fused_cls(3, activation="identity")).to(device)
    mod.train()(torch.randn(shape).to(device))  # a training step, so the buffers are its own
    ref = nn_cls(3).to(device)
    ref.load_state_dict(mod.state_dict(), strict=True)
    for (n1, t1), (n2, t2) in zip(mod.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2
        assert torch.equal(t1, t2), n1
    x = torch.randn(shape).to(device)
    mod.eval()
    ref.eval()
    # Tighter than assert_close's atol: eval with an identity is one affine map.
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, dict(activation="elu", alpha=0.5, order="act_bn")],
                         ids=["bn_act", "act_bn"])
@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(track_running_stats=False),
                                    dict(bias=False), dict(momentum=None)],
                         ids=["default", "affine_false", "no_stats", "bias_false", "momentum_none"])
@pytest.mark.parametrize("fused_cls,nn_cls,shape", PAIRS, ids=PAIR_IDS)
def test_parameter_and_buffer_names_match_nn(fused_cls, nn_cls, shape, kwargs, options):
    mod = fused_cls(3, **kwargs, **options)
    ref = nn_cls(3, **kwargs)
    # Each loads the other's state_dict strictly.
    ref.load_state_dict(mod.state_dict(), strict=True)
    mod.load_state_dict(ref.state_dict(), strict=True)
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in mod.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert list(mod.state_dict()) == list(ref.state_dict())
    for (n, a), (_, b) in zip(mod.state_dict().items(), ref.state_dict().items()):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        assert torch.equal(a, b), n
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(mod, attr) == getattr(ref, attr), attr
    assert isinstance(mod, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("act,expected", [
    (("identity", {}), "activation=identity"),
    (("relu", {}), "activation=relu"),
    (("leaky_relu", {"negative_slope": 0.2}), "activation=leaky_relu, negative_slope=0.2"),
    (("elu", {"alpha": 0.7}), "activation=elu, alpha=0.7"),
    (("hardtanh", {"min_val": -2.0, "max_val": 3.0}),
     "activation=hardtanh, min_val=-2.0, max_val=3.0"),
    (("relu6", {"min_val": -2.0}), "activation=relu6"),
    (("gelu", {"approximate": "tanh"}), "activation=gelu, approximate=tanh"),
    (("silu", {}), "activation=silu"),
], ids=["identity", "relu", "leaky_relu", "elu", "hardtanh", "relu6", "gelu-tanh", "silu"])
def test_extra_repr_shows_activation(act, expected):
    activation, kwargs = act
    mod = fusedbn.BatchNormAct2d(8, activation=activation, **kwargs)
    text = repr(mod)
    assert expected in text, text
    # Only the parameters the activation reads are shown.
    assert ("min_val" in text) == (activation == "hardtanh"), text
    # The rest is nn.BatchNorm2d's.
    assert nn.BatchNorm2d(8).extra_repr() in mod.extra_repr()
    assert text.startswith("BatchNormAct2d(")


def test_relu_shorthand_repr():
    text = repr(fusedbn.BatchNormReLU2d(4))
    assert text.startswith("BatchNormReLU2d(") and "activation=relu" in text


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_to_dtype(device, dtype):
    seed("to", dtype)
    mod = _randomize(fusedbn.BatchNormAct2d(3, activation="elu", alpha=0.7)).to(device, dtype)
    for n, t in list(mod.named_parameters()) + list(mod.named_buffers()):
        expected = torch.long if n == "num_batches_tracked" else dtype
        assert t.dtype == expected, n
    x = torch.randn(2, 3, 4, 4, dtype=dtype).to(device).requires_grad_()
    out = mod(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert x.grad.dtype == dtype and mod.weight.grad.dtype == dtype
    ref = nn.BatchNorm2d(3).to(device, dtype)
    ref.load_state_dict(mod.state_dict())
    mod.eval()
    ref.eval()
    # Fixed tolerances, not assert_close's float64-reference rule: this checks
    # that .to(dtype) converts and runs, against eager in the same dtype.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mod(x), F.elu(ref(x), 0.7), **tol)


def test_train_eval_switch(device):
    seed("train-eval")
    mod = _randomize(fusedbn.BatchNormAct2d(3, activation="identity")).to(device)
    ref = _randomize(nn.BatchNorm2d(3)).to(device)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(2, 3, 4, 4).to(device)
    assert mod.eval() is mod and not mod.training
    rm = mod.running_mean.clone()
    torch.testing.assert_close(mod(x), ref.eval()(x))
    assert torch.equal(mod.running_mean, rm) and mod.num_batches_tracked.item() == 11
    assert mod.train() is mod and mod.training
    torch.testing.assert_close(mod(x), ref.train()(x))
    assert not torch.equal(mod.running_mean, rm) and mod.num_batches_tracked.item() == 12
    torch.testing.assert_close(mod.running_mean, ref.running_mean)
    torch.testing.assert_close(mod.running_var, ref.running_var)
    mod.train(False)
    assert not mod.training


@pytest.mark.parametrize("order", ["bn_act", "act_bn"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_relu_shorthand_equals_act_relu(device, rank, order):
    seed("relu-shorthand", rank, *(() if order == "bn_act" else (order,)))
    short = {1: fusedbn.BatchNormReLU1d, 2: fusedbn.BatchNormReLU2d, 3: fusedbn.BatchNormReLU3d}
    full = {1: fusedbn.BatchNormAct1d, 2: fusedbn.BatchNormAct2d, 3: fusedbn.BatchNormAct3d}
    a = _randomize(short[rank](3, eps=1e-3, momentum=0.2, order=order)).to(device)
    b = full[rank](3, eps=1e-3, momentum=0.2, activation="relu", order=order).to(device)
    b.load_state_dict(a.state_dict())
    assert a.activation == "relu" and isinstance(a, full[rank]) and a.order == order
    assert a.extra_repr() == b.extra_repr()
    assert ("order=act_bn" in repr(a)) == (order == "act_bn")
    x = torch.randn((2, 3) + (4,) * rank).to(device)
    for training in (True, False):
        a.train(training)
        b.train(training)
        assert torch.equal(a(x), b(x))
        for (n, t1), (_, t2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(t1, t2), n
    if order == "act_bn":
        # And against eager relu -> nn.BatchNormNd.
        for training in (True, False):
            compare_steps(a, eager_like(a), eager_like(a, torch.float64),
                          make_input((2, 3) + (4,) * rank, device=device), training)
    # The default order stays bn_act.
    assert short[rank](3).order == "bn_act" and "order" not in repr(short[rank](3))


def test_relu_shorthand_has_no_activation_argument():
    with pytest.raises(TypeError):
        fusedbn.BatchNormReLU2d(3, activation="elu")
    mod = fusedbn.BatchNormReLU2d(3, 1e-3, 0.3, False, False, bias=False)
    assert (mod.eps, mod.momentum, mod.affine, mod.track_running_stats) == (1e-3, 0.3, False,
                                                                           False)


def test_bias_false(device):
    seed("bias-false")
    mod = fusedbn.BatchNormAct2d(3, bias=False).to(device)
    assert mod.bias is None and mod.weight is not None
    assert "bias" not in mod.state_dict()
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    mod(x).sum().backward()
    assert mod.weight.grad is not None and x.grad is not None


def test_reset_parameters(device):
    seed("reset")
    mod = _randomize(fusedbn.BatchNormAct2d(3, activation="leaky_relu")).to(device)
    mod.reset_parameters()
    fresh = nn.BatchNorm2d(3).to(device)
    for (n, a), (_, b) in zip(mod.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    _randomize(mod)
    mod.reset_running_stats()
    assert torch.equal(mod.running_mean, torch.zeros(3, device=device))
    assert torch.equal(mod.running_var, torch.ones(3, device=device))
    assert mod.num_batches_tracked.item() == 0
    assert not torch.equal(mod.weight.detach(), torch.ones(3, device=device))  # parameters kept


def test_device_and_dtype_factory_kwargs(device):
    mod = fusedbn.BatchNormAct2d(3, device=device, dtype=torch.float64)
    assert mod.weight.device.type == device and mod.running_mean.device.type == device
    assert mod.weight.dtype == torch.float64 and mod.running_mean.dtype == torch.float64
    assert mod.num_batches_tracked.dtype == torch.long
    mod = fusedbn.BatchNormAct2d(3, device="meta")
    assert mod.weight.device.type == "meta"


def test_deepcopy_and_pickle_roundtrip(device, tmp_path):
    import copy
    seed("pickle")
    mod = _randomize(fusedbn.BatchNormAct2d(3, activation="elu", alpha=0.3)).to(device)
    for clone in (copy.deepcopy(mod), _roundtrip(mod, tmp_path)):
        assert clone.activation == "elu" and clone.alpha == 0.3
        x = torch.randn(2, 3, 3, 3).to(device)
        assert torch.equal(clone.eval()(x), mod.eval()(x))


def _roundtrip(mod, tmp_path):
    path = tmp_path / "mod.pt"
    torch.save(mod, path)
    return torch.load(path, weights_only=False)


# ------------------------------------------- activity buffer and bias_init

def test_module_buffer_and_state_dict(device):
    mod = fusedbn.BatchNormAct2d(4, track_activity=True, activity_momentum=0.2).to(device)
    assert mod.track_activity and mod.activity_momentum == 0.2
    assert "track_activity=True" in repr(mod)
    assert mod.activity.dtype == torch.float32 and mod.activity.shape == (3, 4)
    assert "activity" in dict(mod.named_buffers())
    # Before any batch: fraction 0, no average yet (NaN), no streak.
    assert torch.equal(mod.active_fraction, torch.zeros(4, device=device))
    assert torch.isnan(mod.active_fraction_avg).all()
    assert mod.inactive_steps.dtype == torch.long
    assert torch.equal(mod.inactive_steps, torch.zeros(4, dtype=torch.long, device=device))
    ref = nn.BatchNorm2d(4).to(device)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    mod(torch.randn(2, 4, 3, 3, device=device))
    assert mod.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(mod.state_dict(), strict=True)
    mod.load_state_dict(ref.state_dict(), strict=True)
    # Without tracking there is no activity buffer at all.
    plain = fusedbn.BatchNormAct2d(4)
    assert not plain.track_activity and getattr(plain, "activity", None) is None
    assert plain.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("cls", [fusedbn.BatchNormAct1d, fusedbn.BatchNormAct2d,
                                 fusedbn.BatchNormAct3d, fusedbn.BatchNormReLU2d],
                         ids=lambda c: c.__name__)
def test_bias_init(cls):
    mod = cls(4, bias_init=0.01)
    assert torch.equal(mod.bias.detach(), torch.full((4,), 0.01))
    assert torch.equal(mod.weight.detach(), torch.ones(4))
    assert "bias_init=0.01" in repr(mod)
    with torch.no_grad():
        mod.bias.uniform_()
        mod.weight.uniform_()
        mod.running_mean.uniform_()
    mod.reset_parameters()
    assert torch.equal(mod.bias.detach(), torch.full((4,), 0.01))
    assert torch.equal(mod.weight.detach(), torch.ones(4))
    assert torch.equal(mod.running_mean, torch.zeros(4))
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(mod.state_dict())
    assert torch.equal(ref.bias.detach(), torch.full((4,), 0.01))


def test_bias_init_default_and_other_values():
    assert torch.equal(fusedbn.BatchNormAct2d(4).bias.detach(), torch.zeros(4))
    assert "bias_init" not in repr(fusedbn.BatchNormAct2d(4))
    mod = fusedbn.BatchNormAct2d(4, bias_init=-0.5, dtype=torch.float64)
    assert torch.equal(mod.bias.detach(), torch.full((4,), -0.5, dtype=torch.float64))


def test_bias_init_without_bias(device):
    for kwargs in (dict(affine=False), dict(bias=False)):
        mod = fusedbn.BatchNormAct2d(4, bias_init=0.01, **kwargs).to(device)
        assert mod.bias is None
        mod.reset_parameters()
        assert mod(torch.randn(2, 4, 3, 3, device=device)).shape == (2, 4, 3, 3)



# The module reads its parameters and buffers from its dicts (modules.py:
# _state); whatever replaces them must still be what the forward uses.

def _twins(device, training):
    ref = _randomize(nn.BatchNorm2d(3)).to(device).train(training)
    fused = fusedbn.BatchNormAct2d(3, activation="identity").to(device).train(training)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_parametrized_weight_is_used(device, training):
    import torch.nn.utils.parametrize as P

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    fused, ref = _twins(device, training)
    for m in (fused, ref):
        P.register_parametrization(m, "weight", Double())
    x = torch.randn(2, 3, 4, 4).to(device)
    torch.testing.assert_close(fused(x), ref(x))
    torch.testing.assert_close(fused.running_var, ref.running_var)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_functional_call_swaps_parameters_and_buffers(device, training):
    fused, ref = _twins(device, training)
    swap = {"weight": torch.full((3,), 3.0, device=device),
            "bias": torch.full((3,), -1.0, device=device),
            "running_mean": torch.full((3,), 0.5, device=device),
            "running_var": torch.full((3,), 2.0, device=device),
            "num_batches_tracked": torch.tensor(5, device=device)}
    x = torch.randn(2, 3, 4, 4).to(device)
    got_state = {k: v.clone() for k, v in swap.items()}
    ref_state = {k: v.clone() for k, v in swap.items()}
    torch.testing.assert_close(torch.func.functional_call(fused, got_state, (x,)),
                               torch.func.functional_call(ref, ref_state, (x,)))
    for k in swap:
        torch.testing.assert_close(got_state[k], ref_state[k])
    torch.testing.assert_close(fused.running_mean, ref.running_mean)  # untouched by the call


def test_deleted_buffer_raises_as_in_nn():
    fused = fusedbn.BatchNormAct2d(3)
    ref = nn.BatchNorm2d(3)
    del fused.running_mean
    del ref.running_mean
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(AttributeError):
        ref(x)
    with pytest.raises(AttributeError):
        fused(x)
