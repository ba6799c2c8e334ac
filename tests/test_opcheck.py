"""torch.library.opcheck of the fusedbn operators: schema (mutation and
aliasing), autograd registration, fake kernels, AOT dispatch -- over both
orders, the residual and the activity argument (and forward_, in place)."""
import pytest
import torch
from torch.library import opcheck

import fusedbn
from helpers import off_kink, op_args, output_mask, seed

FORWARD = torch.ops.fusedbn.forward.default
FORWARD_ = torch.ops.fusedbn.forward_.default
BACKWARD = torch.ops.fusedbn.backward.default

LAYOUTS = ["contiguous", "channels_last", "zero_size"]


def _case(training, activation, kwargs=None, stats=True, affine=True, order="bn_act",
          residual=False, activity=False):
    return dict(training=training, activation=activation, kwargs=kwargs or {}, stats=stats,
                affine=affine, order=order, residual=residual, activity=activity)


def _case_id(c):
    return "-".join([("train" if c["training"] else "eval"), c["activation"],
                     ("stats" if c["stats"] else "nostats"),
                     ("affine" if c["affine"] else "noaffine")]
                    + ([c["order"]] if c["order"] != "bn_act" else [])
                    + (["residual"] if c["residual"] else [])
                    + (["activity"] if c["activity"] else []))


LEAKY, ELU = {"negative_slope": 0.1}, {"alpha": 0.7}
# The plain op over every layout, with and without grad.
CASES = [_case(True, "identity"), _case(True, "relu"), _case(False, "leaky_relu", LEAKY),
         _case(False, "elu", ELU, affine=False), _case(True, "elu", ELU, stats=False)]
ACT_BN_CASES = [_case(True, "relu", order="act_bn"),
                _case(False, "leaky_relu", LEAKY, order="act_bn"),
                _case(True, "elu", ELU, stats=False, order="act_bn"),
                _case(False, "elu", ELU, affine=False, order="act_bn")]
# (case, layout): the activity argument, with the residual and both orders.
ACTIVITY_CASES = [(_case(True, "relu", LEAKY | ELU, activity=True), "contiguous"),
                  (_case(False, "elu", LEAKY | ELU, residual=True, activity=True),
                   "channels_last"),
                  (_case(True, "leaky_relu", LEAKY | ELU, residual=True, activity=True),
                   "contiguous"),
                  (_case(True, "elu", LEAKY | ELU, order="act_bn", activity=True),
                   "channels_last"),
                  (_case(False, "relu", LEAKY | ELU, order="act_bn", activity=True),
                   "contiguous"),
                  (_case(True, "relu", LEAKY | ELU, activity=True), "zero_size")]
FORWARD_ROWS = ([(c, lay, grad) for c in CASES for lay in LAYOUTS for grad in (False, True)]
                + [(c, lay, grad) for c in ACT_BN_CASES
                   for lay, grad in (("contiguous", False), ("channels_last", True),
                                     ("zero_size", True))]
                + [(c, lay, True) for c, lay in ACTIVITY_CASES]
                + [(ACTIVITY_CASES[0][0], ACTIVITY_CASES[0][1], False)])
BACKWARD_ROWS = ([(c, lay, grad) for c in CASES for lay in LAYOUTS for grad in (False, True)]
                 + [(ACT_BN_CASES[0], "channels_last", True),
                    (ACT_BN_CASES[1], "channels_last", False)])


def _ids(rows):
    return [f"{_case_id(c)}-{lay}-{'grad' if grad else 'nograd'}" for c, lay, grad in rows]


def _input(layout, requires_grad, dtype=torch.float32, device="cpu", order="bn_act"):
    shape = (0, 3, 2, 3) if layout == "zero_size" else (2, 3, 2, 3)
    x = (torch.randn(shape, dtype=dtype) + 0.5).to(device)
    if order == "act_bn":
        x = off_kink(x)  # the kink is at the input's 0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _forward_args(layout, requires_grad, case, dtype=torch.float32, momentum=0.1,
                  device="cpu"):
    """Forward op arguments by name, with fresh buffers: forward mutates them."""
    C = 3
    stats, affine, kwargs = case["stats"], case["affine"], case["kwargs"]
    x = _input(layout, requires_grad, dtype, device, case["order"])
    return dict(
        input=x,
        residual=(torch.randn_like(x).requires_grad_(requires_grad) if case["residual"]
                  else None),
        weight=(torch.rand(C) + 0.5).to(device).requires_grad_(requires_grad) if affine else None,
        bias=torch.randn(C).to(device).requires_grad_(requires_grad) if affine else None,
        running_mean=torch.randn(C).to(device) if stats else None,
        running_var=(torch.rand(C) + 0.5).to(device) if stats else None,
        num_batches_tracked=torch.tensor(3, dtype=torch.long, device=device) if stats else None,
        training=case["training"], momentum=momentum, eps=1e-5, activation=case["activation"],
        negative_slope=kwargs.get("negative_slope", 0.01), alpha=kwargs.get("alpha", 1.0),
        order=case["order"], activity=torch.zeros(C, device=device) if case["activity"] else None)


def _backward_args(fwd, grad_out, mask):
    return op_args(BACKWARD, grad_out=grad_out, input=fwd["input"], weight=fwd["weight"],
                   bias=fwd["bias"], save_mean=fwd["save_mean"], save_invstd=fwd["save_invstd"],
                   training=fwd["training"], activation=fwd["activation"],
                   negative_slope=fwd["negative_slope"], alpha=fwd["alpha"], output_mask=mask,
                   order=fwd["order"])


def _run_forward(fwd):
    with torch.no_grad():
        out, fwd["save_mean"], fwd["save_invstd"] = FORWARD(*op_args(FORWARD, **{
            k: v for k, v in fwd.items() if k not in ("save_mean", "save_invstd")}))
    return out


@pytest.mark.parametrize("case,layout,requires_grad", FORWARD_ROWS, ids=_ids(FORWARD_ROWS))
def test_opcheck_forward(device, case, layout, requires_grad):
    seed("opcheck-fwd", _case_id(case), layout, requires_grad)
    fwd = _forward_args(layout, requires_grad, case, device=device)
    opcheck(FORWARD, op_args(FORWARD, **fwd))


def test_opcheck_forward_momentum_none_and_bf16(device):
    """momentum=None (cumulative average) and a bf16 input with float32
    parameters and buffers, as autocast produces."""
    seed("opcheck-fwd-misc")
    fwd = _forward_args("channels_last", True, _case(True, "relu"), dtype=torch.bfloat16,
                        momentum=None, device=device)
    opcheck(FORWARD, op_args(FORWARD, **fwd))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_inplace_forward_with_activity(device, training):
    """forward_ (inplace=True) with activity: schema (two mutated arguments
    and the aliased output), autograd registration, fake kernel. Not
    test_aot_dispatch_dynamic: see test_compile.test_compile_inplace_module_with_activity."""
    seed("activity-opcheck-inplace", training)
    case = _case(training, "leaky_relu", LEAKY | ELU, residual=True, activity=True)
    opcheck(FORWARD_, op_args(FORWARD_, **_forward_args("channels_last", False, case,
                                                         device=device)),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("case,layout,requires_grad", BACKWARD_ROWS, ids=_ids(BACKWARD_ROWS))
def test_opcheck_backward(device, case, layout, requires_grad):
    seed("opcheck-bwd", _case_id(case), layout, requires_grad)
    fwd = _forward_args(layout, False, case, device=device)
    out = _run_forward(fwd)
    grad_out = torch.randn_like(out)
    if requires_grad:
        for t in (grad_out, fwd["input"], fwd["weight"], fwd["bias"]):
            if t is not None:
                t.requires_grad_()
    affine = case["affine"]
    opcheck(BACKWARD, _backward_args(fwd, grad_out, output_mask(BACKWARD, True, affine, affine)))


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, True], [False, False, True]],
                         ids=["input-only", "params-only", "bias-only"])
def test_opcheck_backward_partial_mask(device, mask):
    seed("opcheck-mask", mask)
    fwd = _forward_args("contiguous", False, _case(True, "leaky_relu", LEAKY), device=device)
    out = _run_forward(fwd)
    args = _backward_args(fwd, torch.randn_like(out), output_mask(BACKWARD, *mask))
    opcheck(BACKWARD, args)
    gi, gw, gb = BACKWARD(*args)[:3]
    assert (gi is not None, gw is not None, gb is not None) == tuple(mask)


class _CaptureBackward(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the arguments of every fusedbn::backward call (with the
    requires_grad flags the tensors had) and runs it as usual."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is BACKWARD:
            self.calls.append(torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: t.detach().clone().requires_grad_(t.requires_grad), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation,kwargs", [("identity", {}), ("relu", {}),
                                               ("leaky_relu", {"negative_slope": 0.1}),
                                               ("elu", {"alpha": 0.7})],
                         ids=["identity", "relu", "leaky_relu", "elu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_backward_as_a_training_step_calls_it(device, activation, kwargs, channels_last,
                                                      training):
    """opcheck on exactly the backward calls a module's forward + backward
    makes: saved statistics, output_mask [True, True, True, False], input,
    weight and bias requiring grad, grad_out not. (The double-backward formula
    asked autograd for the gradient of grad_bias, which for relu, leaky_relu
    and identity does not depend on those.)"""
    seed("opcheck-captured", activation, channels_last, training)
    mod = fusedbn.BatchNormAct2d(3, activation=activation, **kwargs).to(device).train(training)
    x = (torch.randn(2, 3, 4, 4) + 0.5).to(device).requires_grad_()
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    capture = _CaptureBackward()
    y = mod(x)
    with capture:
        y.backward(torch.randn_like(y))
    assert len(capture.calls) == 1
    args = capture.calls[0]
    assert list(args[11]) == [True, True, True, False]
    opcheck(BACKWARD, args)
