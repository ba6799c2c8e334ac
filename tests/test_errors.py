"""Bad inputs raise a clear Python exception naming the problem, and leave
running_mean / running_var / num_batches_tracked (and the input, the
activity tensor) untouched -- over every option: order, residual, in-place
mode, activity counting.

Exception types: where PyTorch has a deliberate check for the same mistake
(F.batch_norm / nn.BatchNormNd), fusedbn must raise the same type (e.g.
RuntimeError for a channel-count mismatch, ValueError for one value per
channel in training). Where PyTorch has none (it accepts 6D input and NaN
eps; it fails integer input only with a generic "not implemented for
'Long'" dispatch error), the type is fusedbn's own: ValueError for a bad
value, TypeError for a bad type.
"""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedbn
from helpers import op_args, output_mask, seed

C = 3


def _on(device, values):
    """values with every tensor moved to ``device`` (meta ones kept on meta)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
            for k, v in values.items()}


def _tensors(device, **over):
    """Functional arguments with fresh buffers on ``device``; ``over`` replaces any."""
    seed("errors")
    a = dict(input=torch.randn(2, C, 4), running_mean=torch.randn(C),
             running_var=torch.rand(C) + 0.5, weight=torch.rand(C) + 0.5, bias=torch.randn(C),
             training=True, num_batches_tracked=torch.tensor(7))
    a.update(over)
    return _on(device, a)


# Marks a case where F.batch_norm checks the same thing: the expected type is
# whatever PyTorch raises (test_exception_type_matches_eager).
EAGER = None

# id -> (overrides, expected type or EAGER, message regex; DEVICE stands for the input's device)
CASES = {
    "rank1": (dict(input=torch.randn(C)), ValueError,
              r"got a 1D input of shape torch\.Size\(\[3\]\)"),
    "rank6": (dict(input=torch.randn(2, C, 1, 1, 2, 2)), ValueError, r"got a 6D input"),
    "weight_channels": (dict(weight=torch.ones(C + 1)), EAGER,
                        r"weight must have shape \[3\].*got shape torch\.Size\(\[4\]\)"),
    "bias_channels": (dict(bias=torch.ones(C + 1)), EAGER, r"bias must have shape \[3\]"),
    "running_mean_channels": (dict(running_mean=torch.zeros(C + 1)), EAGER,
                              r"running_mean must have shape \[3\]"),
    "running_var_channels": (dict(running_var=torch.ones(C - 1)), EAGER,
                             r"running_var must have shape \[3\]"),
    "running_mean_channels_eval": (dict(running_mean=torch.zeros(C + 1), training=False),
                                   EAGER, r"running_mean must have shape \[3\]"),
    # F.batch_norm accepts any weight with C elements; fusedbn wants shape [C].
    "weight_2d": (dict(weight=torch.ones(C, 1)), RuntimeError, r"weight must have shape \[3\]"),
    "int_input": (dict(input=torch.ones(2, C, 4, dtype=torch.long)), TypeError,
                  r"input must be float32, float64, bfloat16 or float16, got Long"),
    "bool_input": (dict(input=torch.ones(2, C, 4, dtype=torch.bool)), TypeError, r"got Bool"),
    "complex_input": (dict(input=torch.ones(2, C, 4, dtype=torch.complex64)), TypeError,
                      r"got ComplexFloat"),
    "weight_on_meta": (dict(weight=torch.ones(C, device="meta")), EAGER,
                       r"weight is on meta but input is on DEVICE"),
    "running_mean_on_meta": (dict(running_mean=torch.zeros(C, device="meta")), EAGER,
                             r"running_mean is on meta but input is on DEVICE"),
    "running_mean_only": (dict(running_var=None), EAGER,
                          r"running_mean and running_var must be given together"),
    "running_var_only": (dict(running_mean=None), EAGER,
                         r"running_mean and running_var must be given together"),
    "eval_without_stats": (dict(running_mean=None, running_var=None, training=False),
                           EAGER, r"evaluation mode.*needs running_mean and running_var"),
    "negative_eps_train": (dict(eps=-1e-5), EAGER,
                           r"batch_norm eps must be positive during training"),
    "negative_eps_eval": (dict(eps=-1e-5, training=False), EAGER,
                          r"batch_norm eps must be non-negative"),
    "nan_eps": (dict(eps=float("nan")), ValueError, r"eps must be a number, got nan"),
    "nan_eps_eval": (dict(eps=float("nan"), training=False), ValueError, r"eps .*nan"),
    "zero_eps_train": (dict(eps=0.0), EAGER,
                       r"^batch_norm eps must be positive during training, but got 0"),
    "string_eps": (dict(eps="1e-5"), TypeError, r"eps must be a number"),
    "unknown_activation": (dict(activation="swish"), ValueError, r"unknown activation 'swish'"),
    "activation_wrong_case": (dict(activation="ReLU"), ValueError, r"unknown activation 'ReLU'"),
    "activation_not_a_string": (dict(activation=1), TypeError, r"activation must be a string"),
    "activation_none": (dict(activation=None), TypeError, r"activation must be a string"),
    "activation_module": (dict(activation=nn.ReLU()), TypeError, r"activation must be a string"),
    "int_running_stats": (dict(running_mean=torch.zeros(C, dtype=torch.long),
                               running_var=torch.ones(C, dtype=torch.long)), TypeError,
                          r"running_mean must be float32 or the input's dtype"),
    "int_running_stats_eval": (dict(running_mean=torch.zeros(C, dtype=torch.long),
                                    running_var=torch.ones(C, dtype=torch.long), training=False),
                               TypeError, r"running_mean must be float32"),
    "mixed_running_stat_dtypes": (dict(input=torch.randn(2, C, 4, dtype=torch.float64),
                                       running_mean=torch.zeros(C, dtype=torch.float64),
                                       running_var=torch.ones(C), weight=None, bias=None),
                                  TypeError, r"running_mean and running_var must have the same"),
    "momentum_string": (dict(momentum="0.1"), EAGER, r"momentum must be a number"),
    "momentum_list": (dict(momentum=[0.1]), EAGER, r"momentum must be a number"),
    "momentum_none_without_counter": (dict(momentum=None, num_batches_tracked=None), ValueError,
                                      r"momentum=None .*needs num_batches_tracked"),
    "float_num_batches_tracked": (dict(num_batches_tracked=torch.tensor(7.0)), TypeError,
                                  r"num_batches_tracked must be a single int64"),
    "one_value_per_channel": (dict(input=torch.randn(1, 4), running_mean=torch.zeros(4),
                                   running_var=torch.ones(4), weight=None, bias=None), EAGER,
                              r"^Expected more than 1 value per channel when training, got input "
                              r"size torch\.Size\(\[1, 4\]\)$"),
    "one_value_per_channel_3d": (dict(input=torch.randn(1, 4, 1), running_mean=torch.zeros(4),
                                      running_var=torch.ones(4), weight=None, bias=None),
                                 EAGER, r"got input size torch\.Size\(\[1, 4, 1\]\)"),
}

# order="act_bn" refuses the residual and in-place mode (every nonlinear
# activation; in-place only where it is otherwise accepted), train and eval.
ORDER_ERROR = r"order='act_bn'"
for _act, _kw in (("relu", {}), ("leaky_relu", {"negative_slope": 0.1}), ("elu", {"alpha": 0.7})):
    for _training in (True, False):
        CASES[f"act_bn_residual_{_act}{'' if _training else '_eval'}"] = (
            dict(order="act_bn", residual=torch.randn(2, C, 4), activation=_act,
                 training=_training, **_kw),
            ValueError, r"order='act_bn'.*residual")  # says what it computes, and why
    if _act != "relu":
        CASES[f"act_bn_inplace_{_act}"] = (dict(order="act_bn", inplace=True, activation=_act,
                                               **_kw), ValueError, ORDER_ERROR)
BAD_ORDERS = ["act-bn", "ACT_BN", "bn", "", "relu"]
for _order in BAD_ORDERS:
    for _training in (True, False):
        CASES[f"unknown_order_{_order!r}{'' if _training else '_eval'}"] = (
            dict(order=_order, training=_training), ValueError,
            rf"unknown order {re.escape(repr(_order))}.*'bn_act'.*'act_bn'")
CASES["order_none"] = (dict(order=None), (ValueError, TypeError), r"order")
# In-place mode needs an invertible activation; the residual the input's shape and dtype.
CASES["inplace_relu"] = (dict(inplace=True), ValueError, r"invertible")
CASES["residual_shape"] = (dict(residual=torch.randn(2, C, 3)), ValueError, r"residual has shape")
CASES["residual_dtype"] = (dict(residual=torch.randn(2, C, 4).double()), TypeError,
                           r"residual dtype")

# The activity argument: shape [C] or [3, C], floating, on the input's
# device; activity_momentum in [0, 1]. Each in training, in eval with
# order="act_bn", and in place.
BAD_ACTIVITY = {
    "too_long": (lambda: torch.zeros(C + 1), ValueError, r"activity must have shape \[3\]"),
    "too_short": (lambda: torch.zeros(C - 1), ValueError, r"activity must have shape"),
    "column": (lambda: torch.zeros(C, 1), ValueError, r"activity must have shape"),
    "two_rows": (lambda: torch.zeros(2, C), ValueError, r"activity must have shape"),
    "four_rows": (lambda: torch.zeros(4, C), ValueError, r"activity must have shape"),
    "three_rows_too_long": (lambda: torch.zeros(3, C + 1), ValueError,
                            r"activity must have shape \[3\] or \[3, 3\]"),
    "three_rows_3d": (lambda: torch.zeros(3, C, 1), ValueError, r"activity must have shape"),
    "scalar": (lambda: torch.zeros(()), ValueError, r"activity must have shape"),
    "long": (lambda: torch.zeros(C, dtype=torch.long), TypeError, r"activity"),
    "int32": (lambda: torch.zeros(C, dtype=torch.int32), TypeError, r"activity"),
    "bool": (lambda: torch.zeros(C, dtype=torch.bool), TypeError, r"activity"),
    "complex": (lambda: torch.zeros(C, dtype=torch.complex64), TypeError, r"activity"),
    "meta": (lambda: torch.zeros(C, device="meta"), RuntimeError, r"activity is on meta"),
    "int_state": (lambda: torch.zeros(3, C, dtype=torch.long), TypeError, r"activity"),
}


def _half_state():
    t = torch.zeros(3, C)
    t[0] = 0.5
    return t


for _m in (-0.1, 1.5, float("nan")):
    BAD_ACTIVITY[f"activity_momentum_{_m}"] = (_half_state, ValueError,
                                               r"activity_momentum must be in \[0, 1\]",
                                               dict(activity_momentum=_m))
for _name, (_make, _exc, _pattern, *_more) in BAD_ACTIVITY.items():
    for _variant, _over in (("", dict(training=True)),
                            ("_eval_act_bn", dict(training=False, order="act_bn")),
                            ("_inplace", dict(training=True, inplace=True))):
        CASES[f"activity_{_name}{_variant}"] = (
            dict(activity=_make(), activation="leaky_relu", **_over, **(_more[0] if _more else {})),
            _exc, _pattern)


def _call(a):
    a = dict(a)
    x = a.pop("input")
    rm, rv = a.pop("running_mean"), a.pop("running_var")
    return fusedbn.batch_norm_act(x, rm, rv, **a)


def _snapshot(a):
    """The tensors a failed call must leave alone: the buffers, the input
    (in-place mode) and the activity tensor."""
    return {k: a[k].clone() for k in ("running_mean", "running_var", "num_batches_tracked",
                                      "input", "activity")
            if isinstance(a.get(k), torch.Tensor) and a[k].device.type != "meta"}


def _assert_unchanged(a, snap):
    for k, v in snap.items():
        assert a[k].dtype == v.dtype, f"{k}: dtype changed by a failed call"
        assert torch.equal(a[k], v), f"{k} changed by a failed call: {v} -> {a[k]}"


@pytest.mark.parametrize("case", list(CASES))
def test_functional_error(device, case):
    over, exc, pattern = CASES[case]
    a = _tensors(device, **over)
    pattern = pattern.replace("DEVICE", re.escape(str(a["input"].device)))
    snap = _snapshot(a)
    with pytest.raises(Exception) as info:
        _call(a)
    assert exc is EAGER or isinstance(info.value, exc), (
        f"expected {exc}, got {type(info.value).__name__}: {info.value}")
    assert re.search(pattern, str(info.value)), f"message {str(info.value)!r} !~ {pattern!r}"
    _assert_unchanged(a, snap)


# Cases where eager F.batch_norm checks the same thing: fusedbn raises an
# instance of eager's exception type (so `except` clauses written for
# nn.BatchNorm keep working).
EAGER_EQUIVALENT = [case for case, (_, exc, _) in CASES.items() if exc is EAGER]


@pytest.mark.parametrize("case", EAGER_EQUIVALENT)
def test_exception_type_matches_eager(device, case):
    over, _, _ = CASES[case]
    a = _tensors(device, **over)
    e = dict(a)
    e.pop("num_batches_tracked")
    with pytest.raises(Exception) as eager:
        F.batch_norm(e.pop("input"), e.pop("running_mean"), e.pop("running_var"), **e)
    with pytest.raises(Exception) as fused:
        _call(_tensors(device, **over))
    assert isinstance(fused.value, type(eager.value)), (
        f"PyTorch raises {type(eager.value).__name__} ({eager.value}); fusedbn raises "
        f"{type(fused.value).__name__} ({fused.value})")


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1)])
def test_one_value_per_channel_message_is_pytorchs(device, shape):
    x = torch.randn(shape).to(device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    with pytest.raises(ValueError) as eager:
        F.batch_norm(x, rm, rv, training=True)
    with pytest.raises(ValueError) as fused:
        fusedbn.batch_norm_act(x, rm, rv, training=True)
    assert str(fused.value) == str(eager.value)


def test_one_value_per_channel_allowed_in_eval(device):
    out = fusedbn.batch_norm_act(torch.randn(1, 4).to(device), torch.zeros(4, device=device),
                                 torch.ones(4, device=device), training=False,
                                 activation="identity")
    assert out.shape == (1, 4)


def test_zero_eps_allowed_in_eval(device):
    x = torch.randn(2, C, 4).to(device)
    out = fusedbn.batch_norm_act(x, torch.zeros(C, device=device), torch.ones(C, device=device),
                                 eps=0.0, training=False, activation="identity")
    torch.testing.assert_close(out, x)


# ------------------------------------------------------------------ modules

RANKS = [
    (fusedbn.BatchNormAct1d, nn.BatchNorm1d, [(2, C, 4, 4), (C,)], "expected 2D or 3D input"),
    (fusedbn.BatchNormAct2d, nn.BatchNorm2d, [(2, C, 4), (2, C, 2, 2, 2)], "expected 4D input"),
    (fusedbn.BatchNormAct3d, nn.BatchNorm3d, [(2, C, 4, 4), (2, C)], "expected 5D input"),
    (fusedbn.BatchNormReLU2d, nn.BatchNorm2d, [(2, C)], "expected 4D input"),
]


@pytest.mark.parametrize("fused_cls,eager_cls,shapes,prefix", RANKS,
                         ids=[r[0].__name__ for r in RANKS])
def test_module_rank_check_like_nn(device, fused_cls, eager_cls, shapes, prefix):
    for shape in shapes:
        x = torch.randn(shape).to(device)
        mod = fused_cls(C).to(device)
        snap = {k: v.clone() for k, v in mod.named_buffers()}
        with pytest.raises(ValueError) as eager:
            eager_cls(C).to(device)(x)
        with pytest.raises(ValueError, match=re.escape(prefix)) as fused:
            mod(x)
        assert str(fused.value) == str(eager.value)
        assert str(fused.value) == f"{prefix} (got {len(shape)}D input)"
        for k, v in mod.named_buffers():
            assert torch.equal(v, snap[k]), k


BOTH_ORDERS = r"unknown order .*'bn_act'.*'act_bn'"
BAD_OPTIONS = (
    [(fusedbn.BatchNormAct2d, dict(activation=a), exc, pattern) for a, exc, pattern in (
        ("swish", ValueError, r"unknown activation 'swish'"),
        ("", ValueError, r"unknown activation ''"),
        (None, TypeError, r"activation must be a string"),
        (nn.ReLU, TypeError, r"activation must be a string"))]
    + [(cls, dict(order=o), ValueError, BOTH_ORDERS)
       for o in BAD_ORDERS for cls in (fusedbn.BatchNormAct2d, fusedbn.BatchNormReLU1d)]
    + [(fusedbn.BatchNormAct2d, dict(activation=a, order="act_bn", inplace=True, **kw), ValueError,
        ORDER_ERROR) for a, kw in (("identity", {}), ("relu", {}),
                                   ("leaky_relu", {"negative_slope": 0.1}),
                                   ("elu", {"alpha": 0.7}))]
    + [(fusedbn.BatchNormReLU2d, dict(order="act_bn", inplace=True), ValueError, ORDER_ERROR),
       (fusedbn.BatchNormAct2d, dict(inplace=True), ValueError, r"relu maps several inputs"),
       (fusedbn.BatchNormAct2d, dict(activation="leaky_relu", negative_slope=0.0, inplace=True),
        ValueError, r"invertible")])


@pytest.mark.parametrize("cls,options,exc,pattern", BAD_OPTIONS,
                         ids=[f"{c.__name__}-{'-'.join(f'{k}={v!r}' for k, v in o.items())}"
                              for c, o, _, _ in BAD_OPTIONS])
def test_module_bad_option_at_construction(cls, options, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cls(C, **options)


@pytest.mark.parametrize("attr,value,pattern", [
    ("activation", "swish", r"unknown activation 'swish'"),
    ("order", "act_then_bn", BOTH_ORDERS)])
def test_module_bad_option_at_call_time(device, attr, value, pattern):
    mod = fusedbn.BatchNormAct2d(C).to(device)
    setattr(mod, attr, value)
    snap = {k: v.clone() for k, v in mod.named_buffers()}
    with pytest.raises(ValueError, match=pattern):
        mod(torch.randn(2, C, 3, 3).to(device))
    for k, v in mod.named_buffers():
        assert torch.equal(v, snap[k]), k


@pytest.mark.parametrize("activation,kwargs", [("relu", {}), ("leaky_relu", {"negative_slope": 0.1}),
                                               ("elu", {"alpha": 0.7})])
def test_module_act_bn_residual_raises(device, activation, kwargs):
    mod = fusedbn.BatchNormAct2d(C, activation=activation, order="act_bn", **kwargs).to(device)
    x, z = torch.randn(2, C, 3, 3, device=device), torch.randn(2, C, 3, 3, device=device)
    for training in (True, False):
        mod.train(training)
        snap = {k: v.clone() for k, v in mod.named_buffers()}
        with pytest.raises(ValueError, match=ORDER_ERROR):
            mod(x, z)
        for k, v in mod.named_buffers():
            assert torch.equal(v, snap[k]), f"{k} changed by a failed call"


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)])
def test_module_one_value_per_channel_leaves_buffers(device, shape):
    cls = {2: fusedbn.BatchNormAct1d, 3: fusedbn.BatchNormAct1d, 4: fusedbn.BatchNormAct2d}
    mod = cls[len(shape)](C).to(device).train()
    snap = {k: v.clone() for k, v in mod.named_buffers()}
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when "
                                         r"training, got input size"):
        mod(torch.randn(shape).to(device))
    for k, v in mod.named_buffers():
        assert torch.equal(v, snap[k]), f"{k} changed by a failed call"


def test_module_channel_mismatch_leaves_buffers(device):
    mod = fusedbn.BatchNormAct2d(C).to(device).train()
    snap = {k: v.clone() for k, v in mod.named_buffers()}
    with pytest.raises(Exception, match=r"must have shape \[4\]"):
        mod(torch.randn(2, C + 1, 3, 3).to(device))
    for k, v in mod.named_buffers():
        assert torch.equal(v, snap[k]), f"{k} changed by a failed call"


# ------------------------------------------------------------- backward op

def _backward_args(device, **over):
    seed("errors-bwd")
    x = torch.randn(2, C, 4)
    a = dict(grad_out=torch.randn(2, C, 4), input=x, weight=torch.ones(C), bias=torch.zeros(C),
             save_mean=torch.zeros(C), save_invstd=torch.ones(C), training=True,
             activation="relu", negative_slope=0.01, alpha=1.0,
             output_mask=output_mask(torch.ops.fusedbn.backward.default))
    a.update(over)
    return op_args(torch.ops.fusedbn.backward.default, **_on(device, a))


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(grad_out=torch.randn(2, C, 5)), ValueError, r"grad_out has shape"),
    (dict(grad_out=torch.randn(2, C, 4, dtype=torch.float64)), TypeError, r"grad_out dtype"),
    (dict(save_mean=torch.zeros(C + 1)), ValueError, r"save_mean and save_invstd must be"),
    (dict(save_invstd=torch.ones(C, dtype=torch.float64)), ValueError,
     r"save_mean and save_invstd must be"),
    (dict(weight=torch.ones(C + 1)), Exception, r"weight must have shape \[3\]"),
    (dict(activation="tanh"), ValueError, r"unknown activation 'tanh'"),
    (dict(input=torch.ones(2, C, 4, dtype=torch.int32), grad_out=torch.ones(2, C, 4,
                                                                           dtype=torch.int32)),
     TypeError, r"input must be float32"),
    # The C++ operators check the order themselves (callers of
    # torch.ops.fusedbn.* skip the Python checks).
    (dict(order="bnact"), ValueError, BOTH_ORDERS),
    (dict(order="act_bn", activation="leaky_relu", negative_slope=0.1,
          residual=torch.randn(2, C, 4)), ValueError, ORDER_ERROR),
    (dict(order="act_bn", activation="leaky_relu", negative_slope=0.1, from_output=True),
     ValueError, ORDER_ERROR),
], ids=["grad_shape", "grad_dtype", "save_mean_shape", "save_invstd_dtype", "weight_shape",
        "activation", "int_input", "unknown_order", "act_bn_residual", "act_bn_from_output"])
def test_backward_op_errors(device, over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        torch.ops.fusedbn.backward.default(*_backward_args(device, **over))


def test_forward_op_unknown_order(device):
    a = _tensors(device)
    snap = _snapshot(a)
    FORWARD = torch.ops.fusedbn.forward.default
    with pytest.raises(ValueError, match=BOTH_ORDERS):
        FORWARD(*op_args(FORWARD, order="bnact", momentum=0.1, eps=1e-5, activation="relu",
                         negative_slope=0.01, alpha=1.0, **a))
    _assert_unchanged(a, snap)
