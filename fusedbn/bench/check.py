"""Correctness of ``fusedbn.bench``: the self-check, and the check of every
contender against eager before it is timed. One tolerance rule: see
:func:`compare`.
"""
import itertools
import math

import torch

import fusedbn

from .common import LAYOUTS, dtype_name, make_grad, make_input, shape_str
from .contenders import eager_module, fused_module, load_state, reference_state

# The tolerance of the one rule (see compare), per dtype of the computation.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2,
             torch.float16: 4e-3}
DEFAULT_TOLERANCE = 2e-2
# Where the activations' derivatives jump (see check_results); the bench
# runs hardtanh with its defaults (-1, 1).
KINKS = {"relu": (0.0,), "leaky_relu": (0.0,), "relu6": (0.0, 6.0), "hardtanh": (-1.0, 1.0),
         "hardswish": (-3.0, 3.0), "hardsigmoid": (-3.0, 3.0)}


def tolerance(dtype):
    return TOLERANCE.get(dtype, DEFAULT_TOLERANCE)


def compare(got, ref, dtype, exclude=None, l1=None, slack=None):
    """(ok, max error relative to the tolerance scale, mismatching elements).

    The bench's one tolerance rule, with ``tol = tolerance(dtype)``:
    ``|got - ref| <= tol * (scale + |ref|)``, where ``scale`` is ``max|ref|``
    (elementwise quantities) or, when ``l1`` is given, the L1 of the terms a
    per-channel sum adds up (weight/bias gradients). ``exclude`` masks
    elements out of the check; ``slack`` is added to the allowed error (kink
    ties inside a sum, see check_results)."""
    if got is None or ref is None:
        return (got is None) == (ref is None), 0.0, 0
    if tuple(got.shape) != tuple(ref.shape):
        return False, float("inf"), ref.numel()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    got = got.detach().to(work)
    ref = ref.detach().to(work)
    if ref.numel() == 0:
        return True, 0.0, 0
    tol = tolerance(dtype)
    if l1 is None:
        scale = ref.abs().max().item()
        if not math.isfinite(scale):
            return False, float("inf"), ref.numel()
        scale = torch.tensor(scale if scale > 0 else 1.0, dtype=work, device=ref.device)
    else:
        scale = l1.to(work).clamp_min(torch.finfo(work).tiny)
    err = (got - ref).abs_()
    if slack is not None:
        err = (err - slack.to(work)).clamp_min_(0)
    bad = (err > tol * (scale + ref.abs())) | err.isnan()
    if exclude is not None:
        bad &= ~exclude
        err = err.masked_fill(exclude, 0)
    nbad = int(bad.sum().item())
    max_err = (err / scale).max().item()
    return nbad == 0, max_err, nbad


def reference_terms(x, state, training, eps=1e-5):
    """x-hat, the pre-activation z and |weight| * invstd, in float32 (float64
    for float64), from the same values the contenders see: what tolerances
    are judged against."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.detach().to(work)
    dims = (0, 2, 3)
    if training:
        var, mean = torch.var_mean(xf, dims, correction=0)
    else:
        mean, var = state["running_mean"].to(work), state["running_var"].to(work)
    view = (1, -1, 1, 1)
    xhat = (xf - mean.view(view)) * torch.rsqrt(var.view(view) + eps)
    w = state["weight"].to(work).view(view)
    z = xhat * w + state["bias"].to(work).view(view)
    return xhat, z, w.abs() * torch.rsqrt(var.view(view) + eps)


def check_results(got, ref, dtype, activation, x, g, state, training):
    """Compare a contender's results with eager's; {quantity: (ok, err, bad)}.

    Kink ties: where the pre-activation is within rounding of a kink of the
    activation (KINKS), one implementation may take the other branch (eager bfloat16 computes
    the pre-activation with errors near 1e-3), and the input gradient there
    legitimately differs. Elements whose pre-activation (computed in float32
    from the same values) lies within the dtype's tolerance of a kink are left out
    of the input-gradient check, and their terms are slack in the sums (and,
    in training, in the other input gradients of their channel)."""
    out = {}
    xhat = kink = None
    dims = (0, 2, 3)
    for key, r in ref.items():
        if key in ("grad_input", "grad_weight", "grad_bias") and xhat is None:
            xhat, z, scale = reference_terms(x, state, training)
            for k in KINKS.get(activation, ()):
                near = (z - k).abs_() <= tolerance(dtype)
                kink = near if kink is None else kink | near
            del z
        if key == "grad_input":
            slack = None
            if kink is not None and training:
                # A flipped kink element moves the batch-statistics terms of
                # every input gradient of its channel: by scale * (|g| +
                # |xhat| |g xhat|) / count at most.
                gk = g.detach().to(xhat.dtype).abs() * kink
                count = x[:, 0].numel()
                slack = scale * (gk.sum(dims, keepdim=True)
                                 + xhat.abs() * (gk * xhat.abs()).sum(dims, keepdim=True)) / count
            out[key] = compare(got.get(key), r, dtype, exclude=kink, slack=slack)
        elif key in ("grad_bias", "grad_weight"):
            terms = g.detach().to(xhat.dtype).abs()
            if key == "grad_weight":
                terms.mul_(xhat.abs())
            slack = None if kink is None else (terms * kink).sum(dims)
            out[key] = compare(got.get(key), r, dtype, l1=terms.sum(dims), slack=slack)
            del terms
        else:
            out[key] = compare(got.get(key), r, dtype)
    return out



SELF_CHECK_SHAPES = [(4, 8, 5, 5), (3, 16, 7, 3), (2, 32, 4, 4)]
SELF_CHECK_DTYPES = (torch.float32, torch.bfloat16)


class NotAvailable(Exception):
    pass


def self_check_one(device, dtype, layout, activation):
    """Failures (list of str) and max errors {quantity: err} over all shapes."""
    failures, errs = [], {}

    def record(tag, results, shape):
        for what, (ok, err, bad) in results.items():
            what = f"{tag} {what}".strip()
            errs[what] = max(errs.get(what, 0.0), err)
            if not ok:
                failures.append(f"{what} {shape_str(shape)} (max rel err {err:.2e}, "
                                f"{bad} elements)")

    for i, shape in enumerate(SELF_CHECK_SHAPES):
        C = shape[1]
        state = reference_state(C, dtype, device, seed=100 + i)
        eager = eager_module(C, activation, inplace=False).to(device=device, dtype=dtype)
        fused = fused_module(C, activation).to(device=device, dtype=dtype)
        for training in (True, False):
            load_state(eager[0], state)
            load_state(fused, state)
            eager.train(training)
            fused.train(training)
            x = make_input(shape, dtype, device, layout, seed=200 + i, requires_grad=True)
            g = make_grad(shape, dtype, device, layout, seed=300 + i)
            ref = eager(x)
            rgrads = torch.autograd.grad(ref, (x, eager[0].weight, eager[0].bias), g)
            try:
                out = fused(x)
            except NotImplementedError as e:
                raise NotAvailable(str(e).splitlines()[0]) from e
            grads = torch.autograd.grad(out, (x, fused.weight, fused.bias), g)
            tag = "train" if training else "eval"
            names = ("output", "grad_input", "grad_weight", "grad_bias")
            record(tag, check_results(dict(zip(names, (out,) + grads)),
                                      dict(zip(names, (ref,) + rgrads)),
                                      dtype, activation, x, g, state, training), shape)
            fmt = LAYOUTS[layout]
            if out.is_contiguous(memory_format=fmt) != ref.is_contiguous(memory_format=fmt):
                failures.append(f"{tag} output layout {shape_str(shape)}")
            if training:
                record("", {"running_mean": compare(fused.running_mean, eager[0].running_mean,
                                                    dtype),
                            "running_var": compare(fused.running_var, eager[0].running_var,
                                                   dtype)}, shape)
                if int(fused.num_batches_tracked) != int(eager[0].num_batches_tracked):
                    failures.append(f"num_batches_tracked {shape_str(shape)}")
    return failures, errs


def self_check(devices, out):
    """Prints PASS/FAIL/SKIP lines. Returns (all passed, {device: fusedbn available})."""
    out("### Self-check (fusedbn module vs eager nn.BatchNorm2d + activation)")
    out("")
    out(f"Shapes {', '.join(shape_str(s) for s in SELF_CHECK_SHAPES)}; training and eval; "
        "output, input/weight/bias gradients, running statistics, num_batches_tracked.")
    out("")
    out("```")
    all_ok, available = True, {}
    for device in devices:
        available[device] = True
        combos = itertools.product(SELF_CHECK_DTYPES, LAYOUTS, fusedbn.ACTIVATIONS)
        for dtype, layout, activation in combos:
            label = f"{device} {dtype_name(dtype)} {layout} {activation}"
            try:
                failures, errs = self_check_one(device, dtype, layout, activation)
            except NotAvailable as e:
                out(f"SKIP {device}: fusedbn has no kernel for this device ({e})")
                available[device] = False
                break
            except Exception as e:  # noqa: BLE001
                failures, errs = [f"raised {type(e).__name__}: {e}"], {}
            if failures:
                all_ok = False
                out(f"FAIL {label}: " + "; ".join(failures[:6])
                    + (f"; ... {len(failures) - 6} more" if len(failures) > 6 else ""))
            else:
                out(f"PASS {label} (max rel err {max(errs.values()):.1e})")
    out("```")
    out("")
    return all_ok, available

