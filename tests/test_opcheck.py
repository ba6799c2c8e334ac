"""torch.library.opcheck of the fusedbn operators: schema (mutation and
aliasing), autograd registration, fake kernels, AOT dispatch."""
import pytest
import torch
from torch.library import opcheck

import fusedbn
from helpers import op_args, output_mask, seed

FORWARD = torch.ops.fusedbn.forward.default
BACKWARD = torch.ops.fusedbn.backward.default

LAYOUTS = ["contiguous", "channels_last", "zero_size"]
# (training, activation, kwargs, has running stats, has weight/bias)
CASES = [
    (True, "identity", {}, True, True),
    (True, "relu", {}, True, True),
    (False, "leaky_relu", {"negative_slope": 0.1}, True, True),
    (False, "elu", {"alpha": 0.7}, True, False),
    (True, "elu", {"alpha": 0.7}, False, True),
]
CASE_IDS = [f"{'train' if t else 'eval'}-{a}-{'stats' if s else 'nostats'}-"
            f"{'affine' if w else 'noaffine'}" for t, a, _, s, w in CASES]


def _input(layout, requires_grad, dtype=torch.float32, device="cpu"):
    shape = (0, 3, 2, 3) if layout == "zero_size" else (2, 3, 2, 3)
    x = (torch.randn(shape, dtype=dtype) + 0.5).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _forward_args(layout, requires_grad, training, activation, kwargs, stats, affine,
                  dtype=torch.float32, momentum=0.1, device="cpu"):
    """Forward op arguments by name, with fresh buffers: forward mutates them."""
    C = 3
    return dict(
        input=_input(layout, requires_grad, dtype, device),
        weight=(torch.rand(C) + 0.5).to(device).requires_grad_(requires_grad) if affine else None,
        bias=torch.randn(C).to(device).requires_grad_(requires_grad) if affine else None,
        running_mean=torch.randn(C).to(device) if stats else None,
        running_var=(torch.rand(C) + 0.5).to(device) if stats else None,
        num_batches_tracked=torch.tensor(3, dtype=torch.long, device=device) if stats else None,
        training=training, momentum=momentum, eps=1e-5, activation=activation,
        negative_slope=kwargs.get("negative_slope", 0.01), alpha=kwargs.get("alpha", 1.0))


def _backward_args(fwd, grad_out, mask):
    return op_args(BACKWARD, grad_out=grad_out, input=fwd["input"], weight=fwd["weight"],
                   bias=fwd["bias"], save_mean=fwd["save_mean"], save_invstd=fwd["save_invstd"],
                   training=fwd["training"], activation=fwd["activation"],
                   negative_slope=fwd["negative_slope"], alpha=fwd["alpha"], output_mask=mask)


def _run_forward(fwd):
    with torch.no_grad():
        out, fwd["save_mean"], fwd["save_invstd"] = FORWARD(*op_args(FORWARD, **{
            k: v for k, v in fwd.items() if k not in ("save_mean", "save_invstd")}))
    return out


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_opcheck_forward(device, case, layout, requires_grad):
    training, activation, kwargs, stats, affine = case
    seed("opcheck-fwd", training, activation, layout, requires_grad)
    fwd = _forward_args(layout, requires_grad, training, activation, kwargs, stats, affine,
                        device=device)
    opcheck(FORWARD, op_args(FORWARD, **fwd))


def test_opcheck_forward_momentum_none_and_bf16(device):
    """momentum=None (cumulative average) and a bf16 input with float32
    parameters and buffers, as autocast produces."""
    seed("opcheck-fwd-misc")
    fwd = _forward_args("channels_last", True, True, "relu", {}, True, True,
                        dtype=torch.bfloat16, momentum=None, device=device)
    opcheck(FORWARD, op_args(FORWARD, **fwd))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_opcheck_backward(device, case, layout, requires_grad):
    training, activation, kwargs, stats, affine = case
    seed("opcheck-bwd", training, activation, layout, requires_grad)
    fwd = _forward_args(layout, False, training, activation, kwargs, stats, affine,
                        device=device)
    out = _run_forward(fwd)
    grad_out = torch.randn_like(out)
    if requires_grad:
        for t in (grad_out, fwd["input"], fwd["weight"], fwd["bias"]):
            if t is not None:
                t.requires_grad_()
    opcheck(BACKWARD, _backward_args(fwd, grad_out, output_mask(BACKWARD, True, affine, affine)))


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, True], [False, False, True]],
                         ids=["input-only", "params-only", "bias-only"])
def test_opcheck_backward_partial_mask(device, mask):
    seed("opcheck-mask", mask)
    fwd = _forward_args("contiguous", False, True, "leaky_relu", {"negative_slope": 0.1}, True,
                        True, device=device)
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
