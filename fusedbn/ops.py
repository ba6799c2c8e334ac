"""Python-side registrations for the C++ operators torch.ops.fusedbn.*:
fake (meta) kernels for torch.compile / export, and the double-backward
formula of the ``backward`` op. The autograd of ``forward`` is in C++.
"""
import types

import torch

from ._reference import acc_dtype as _acc_dtype
from ._reference import activation as _activation
from ._reference import activation_grad as _activation_grad
from ._reference import PARAMS as _PARAMS


def bind(op, args, kwargs):
    """The arguments of a call to ``torch.ops.fusedbn.<op>`` by name (schema
    defaults filled in): the schemas in csrc/ops.cpp are the one definition
    of each op's signature, read here rather than written out again."""
    schema = getattr(torch.ops.fusedbn, op).default._schema
    names = [a.name for a in schema.arguments]
    values = dict(zip(names, args))
    values.update(kwargs)
    for a in schema.arguments:
        if a.name not in values:
            values[a.name] = a.default_value
    return types.SimpleNamespace(**values)


def _check_same_device(a):
    # The dispatcher sends a call that mixes devices (e.g. a meta tensor among
    # CPU ones) here, so the fake kernels must say so rather than succeed.
    for name, t in vars(a).items():
        if isinstance(t, torch.Tensor):
            torch._check(
                t.device == a.input.device,
                lambda: f"fusedbn: {name} is on {t.device} but input is on {a.input.device}; "
                "all tensors must be on the same device",
            )


@torch.library.register_fake("fusedbn::forward")
def _forward_fake(*args, **kwargs):
    a = bind("forward", args, kwargs)
    _check_same_device(a)
    input = a.input
    # (A 1-D input is accepted when empty, as F.batch_norm does: no channels.)
    torch._check(input.dim() >= 2 or input.numel() == 0,
                 lambda: f"fusedbn: expected input of rank 2 to 5, got {input.dim()}D")
    channels = input.shape[1] if input.dim() >= 2 else 0
    acc = _acc_dtype(input.dtype)
    stat = input.new_empty((channels,), dtype=acc)
    return torch.empty_like(input), stat, torch.empty_like(stat)


@torch.library.register_fake("fusedbn::forward_")
def _forward_inplace_fake(*args, **kwargs):
    _out, mean, invstd = _forward_fake(*args, **kwargs)
    input = bind("forward_", args, kwargs).input
    # How many channels keep their input depends on the weights' values
    # (glue.cpp: kept_channels).
    kept = torch.library.get_ctx().new_dynamic_size() if input.dim() >= 2 else 0
    shape = (input.shape[0], kept, *input.shape[2:]) if input.dim() >= 2 else (0, 0)
    return (input, mean, invstd, input.new_empty(shape),
            input.new_empty((kept,), dtype=torch.long))


@torch.library.register_fake("fusedbn::backward")
def _backward_fake(*args, **kwargs):
    a = bind("backward", args, kwargs)
    _check_same_device(a)
    input, residual, weight, bias, output_mask = a.input, a.residual, a.weight, a.bias, a.output_mask
    if not (output_mask[0] or (output_mask[1] and weight is not None)
            or (output_mask[2] and bias is not None) or (output_mask[3] and residual is not None)):
        return None, None, None, None
    grad_input = torch.empty_like(input) if output_mask[0] else None
    grad_weight = torch.empty_like(weight) if output_mask[1] and weight is not None else None
    grad_bias = torch.empty_like(bias) if output_mask[2] and bias is not None else None
    grad_residual = (torch.empty_like(residual)
                     if output_mask[3] and residual is not None else None)
    return grad_input, grad_weight, grad_bias, grad_residual


def backward_reference(grad_out, input, residual, weight, bias, save_mean, save_invstd, training,
                       activation, order="bn_act", **params):
    """fusedbn::backward written with differentiable torch ops.

    Used as the backward op's own autograd formula (double backward). In
    training the saved mean and invstd are functions of the input: they keep
    their saved values here but take their derivatives from a recomputation,
    so the second derivative sees that dependence. params: the activation's
    (``_reference.PARAMS``).
    """
    acc = _acc_dtype(input.dtype)
    dims = [0] + list(range(2, input.dim()))
    per_channel = [1, -1] + [1] * (input.dim() - 2)
    x_in, dy = input.to(acc), grad_out.to(acc)
    # act_bn: the BatchNorm (with no activation after it) of a = act(x).
    act_bn = order == "act_bn" and activation != "identity"
    x = _activation(x_in, activation, **params) if act_bn else x_in
    post = "identity" if act_bn else activation  # the activation after the BatchNorm
    count = max(x.numel() // max(x.shape[1], 1), 1)
    w = weight.to(acc) if weight is not None else torch.ones_like(save_mean)
    b = bias.to(acc) if bias is not None else torch.zeros_like(save_mean)
    mean, invstd = save_mean, save_invstd
    if training and x.numel() > 0:
        live_mean = x.mean(dims)
        centered = x - live_mean.detach().reshape(per_channel)
        live_var = (centered * centered).mean(dims)
        mean = save_mean + (live_mean - live_mean.detach())
        invstd = save_invstd - 0.5 * save_invstd ** 3 * (live_var - live_var.detach())
    xhat = (x - mean.reshape(per_channel)) * invstd.reshape(per_channel)
    y = xhat * w.reshape(per_channel) + b.reshape(per_channel)
    if residual is not None:
        y = y + residual.to(acc)
    g = _activation_grad(dy, y, post, **params)
    grad_bias = g.sum(dims)
    grad_weight = (g * xhat).sum(dims)
    scale = (w * invstd).reshape(per_channel)
    if training:
        grad_input = scale * (g - (grad_bias / count).reshape(per_channel)
                              - xhat * (grad_weight / count).reshape(per_channel))
    else:
        grad_input = g * scale
    if act_bn:
        grad_input = _activation_grad(grad_input, x_in, activation, **params)
    return (grad_input.to(input.dtype),
            None if weight is None else grad_weight.to(weight.dtype),
            None if bias is None else grad_bias.to(bias.dtype),
            None if residual is None else g.to(residual.dtype))


def _backward_setup_context(ctx, inputs, output):
    a = bind("backward", inputs, {})
    ctx.save_for_backward(a.grad_out, a.input, a.residual, a.weight, a.bias, a.save_mean,
                          a.save_invstd)
    ctx.config = (a.training, a.activation, bool(a.from_output), a.order,
                  {k: getattr(a, k) for k in _PARAMS if hasattr(a, k)})


def _backward_backward(ctx, *cotangents):
    training, activation, from_output, order, params = ctx.config
    if from_output:
        # The saved output is a function of the input through the batch
        # statistics too, which this formula cannot see from the output alone.
        raise RuntimeError("fusedbn: double backward through inplace=True is not supported; "
                           "use inplace=False for higher-order gradients")
    saved = ctx.saved_tensors
    wanted = [i for i in range(5) if ctx.needs_input_grad[i] and saved[i] is not None]
    grads = [None] * len(ctx.needs_input_grad)  # one per argument of the backward op
    if not wanted:
        return tuple(grads)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None
                  for i, t in enumerate(saved[:5])]
        outs = backward_reference(*leaves, saved[5], saved[6], training, activation,
                                  order=order, **params)
        # An output that does not depend on the wanted inputs (grad_bias of a
        # relu without grad_out among them: where() passes no gradient through
        # its condition) has no graph to differentiate.
        pairs = [(o, c) for o, c in zip(outs, cotangents)
                 if o is not None and c is not None and o.requires_grad]
        if pairs:
            found = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted],
                                        [c for _, c in pairs], allow_unused=True,
                                        create_graph=torch.is_grad_enabled())
            for i, gr in zip(wanted, found):
                grads[i] = gr
    return tuple(grads)


# The forward op's autograd lives in C++ (csrc/autograd.cpp); the backward op,
# being functional, takes the public registration.
torch.library.register_autograd("fusedbn::backward", _backward_backward,
                                setup_context=_backward_setup_context)
