"""CPU and CUDA agreement: the CUDA kernels on a GPU against eager PyTorch
on the same GPU (the suite's tolerance rule, float64 reference) and against
fusedbn's CPU kernels on identical inputs, for every activation, dtype,
shape, layout and mode (train, eval, residual, in-place, order="act_bn",
activity tracking: the activity fractions of CPU and CUDA exactly equal).
Skipped without a GPU (CI has none); part of the cuda half that
benchmarks/gpu_check.sh runs (``pytest -m cuda``) when one is lent. (The
rest of the suite runs on CUDA through the ``device`` fixture of
conftest.py; this file compares the two devices with each other.)"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import apply_activation, assert_close, avoid_kink, seed

import fusedbn

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.cuda]

ACTS = [("identity", {}), ("relu", {}), ("leaky_relu", {"negative_slope": 0.1}),
        ("elu", {"alpha": 0.7})]
# Shapes that take the CUDA grid's paths: 16-byte packs and single elements
# (odd sizes), 1-element planes, several partials per channel, a 2-D input.
SHAPES = [(4, 3), (3, 5, 7), (2, 8, 4, 4), (64, 24, 1, 1), (8, 16, 33, 17), (2, 3, 3, 2, 4),
          (32, 64, 28, 28)]


def _layout(x, channels_last):
    if channels_last and x.dim() in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                            else torch.channels_last_3d)
    return x


def _run(device, dtype, x, g, z, w, b, rm, rv, training, activation, kw, inplace,
         order="bn_act", activity=None):
    xl = x.to(device=device, dtype=dtype).detach().requires_grad_()
    zl = z.to(device=device, dtype=dtype).detach().requires_grad_() if z is not None else None
    pdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    wl = w.to(device=device, dtype=pdt).detach().requires_grad_()
    bl = b.to(device=device, dtype=pdt).detach().requires_grad_()
    rml, rvl = rm.to(device=device, dtype=pdt), rv.to(device=device, dtype=pdt)
    if activation is None:  # eager reference
        if order == "act_bn":
            y = F.batch_norm(apply_activation(xl, kw["name"], **kw["kw"]), rml, rvl, wl, bl,
                             training, 0.1, 1e-5)
        else:
            y = F.batch_norm(xl, rml, rvl, wl, bl, training, 0.1, 1e-5)
            if zl is not None:
                y = y + zl
            y = apply_activation(y, kw["name"], **kw["kw"])
    else:
        y = fusedbn.batch_norm_act(xl * 1 if inplace else xl, rml, rvl, wl, bl, training, 0.1,
                                   1e-5, activation, residual=zl, inplace=inplace, order=order,
                                   activity=activity, **kw)
    y.backward(g.to(device=device, dtype=dtype))
    return [t.detach().cpu() if t is not None else None
            for t in (y, xl.grad, wl.grad, bl.grad, zl.grad if zl is not None else None, rml,
                      rvl)]


NAMES = ("out", "grad_input", "grad_weight", "grad_bias", "grad_residual", "running_mean",
         "running_var")


@pytest.mark.parametrize("activation,kw", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval", "train-residual", "train-inplace",
                                  "train-act_bn", "train-activity"])
def test_cuda_matches_eager_and_cpu(activation, kw, dtype, shape, channels_last, mode):
    if mode == "train-inplace" and activation == "relu":
        pytest.skip("relu cannot be inverted")
    seed("cuda", activation, dtype, shape, channels_last, mode)
    C = shape[1]
    x = _layout(torch.randn(shape, dtype=torch.float64) * 2 + 0.5, channels_last)
    g = _layout(torch.randn(shape, dtype=torch.float64), channels_last)
    z = _layout(torch.randn(shape, dtype=torch.float64), channels_last) if "residual" in mode else None
    w, b = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64) * 0.3
    rm, rv = torch.randn(C, dtype=torch.float64) * 0.2, torch.rand(C, dtype=torch.float64) + 0.5
    training, inplace = mode != "eval", mode == "train-inplace"
    order = "act_bn" if mode == "train-act_bn" else "bn_act"
    act_cuda = act_cpu = None
    if mode == "train-activity":
        # Every pre-activation 1e-3 (normalized) away from 0, so that the
        # devices' roundings of the batch statistics cannot flip a sign.
        stats = SimpleNamespace(running_mean=rm, running_var=rv, weight=w, bias=b, eps=1e-5)
        x = avoid_kink(x.to(dtype), stats, training, margin=1e-3).double()
        act_cuda, act_cpu = torch.full((C,), -1.0, device="cuda"), torch.full((C,), -1.0)
    args = (g, z, w, b, rm, rv, training)
    ref_kw = {"name": activation, "kw": kw}
    cuda = _run("cuda", dtype, x, *args, activation, kw, inplace, order, act_cuda)
    eager = _run("cuda", dtype, x, *args, None, ref_kw, False, order)
    ref = _run("cpu", torch.float64, x, *args, None, ref_kw, False, order)
    cpu = _run("cpu", dtype, x, *args, activation, kw, inplace, order, act_cpu)
    if mode == "train-activity":
        # The same counts on both devices, as fractions of the same number of values.
        assert torch.equal(act_cuda.cpu(), act_cpu), f"activity: cuda {act_cuda} vs cpu {act_cpu}"
        assert ((act_cpu >= 0) & (act_cpu <= 1)).all(), act_cpu
    for name, a, e, r, c in zip(NAMES, cuda, eager, ref, cpu):
        if a is None:
            continue
        assert_close(a, e, r.to(a.dtype) if a.dtype == torch.float64 else r, name=name,
                     compute_dtype=dtype, vs64=True)
        # CPU and CUDA kernels on identical inputs: the same rule.
        assert_close(a, c, r, name=f"{name} (cuda vs cpu)", compute_dtype=dtype, vs64=True)
