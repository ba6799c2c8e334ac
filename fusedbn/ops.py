"""Python-side registrations for the C++ operators torch.ops.fusedbn.*:
fake (meta) kernels for torch.compile / export, and the autograd formula of
``forward``, whose backward is the ``backward`` custom op.
"""
import torch
from torch._library.autograd import Info, make_autograd_impl

_lib = torch.library.Library("fusedbn", "FRAGMENT")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_device(input, **others):
    # The dispatcher sends a call that mixes devices (e.g. a meta tensor among
    # CPU ones) here, so the fake kernels must say so rather than succeed.
    for name, t in others.items():
        torch._check(
            t is None or t.device == input.device,
            lambda: f"fusedbn: {name} is on {t.device} but input is on {input.device}; "
            "all tensors must be on the same device",
        )


@torch.library.register_fake("fusedbn::forward")
def _forward_fake(input, weight, bias, running_mean, running_var, num_batches_tracked,
                  training, momentum, eps, activation, negative_slope, alpha):
    _check_same_device(input, weight=weight, bias=bias, running_mean=running_mean,
                       running_var=running_var, num_batches_tracked=num_batches_tracked)
    torch._check(input.dim() >= 2, lambda: f"fusedbn: expected input of rank 2 to 5, got {input.dim()}D")
    channels = input.shape[1]
    acc = _acc_dtype(input.dtype)
    stat = input.new_empty((channels,), dtype=acc)
    return torch.empty_like(input), stat, torch.empty_like(stat)


@torch.library.register_fake("fusedbn::backward")
def _backward_fake(grad_out, input, weight, bias, save_mean, save_invstd, training,
                   activation, negative_slope, alpha, output_mask):
    _check_same_device(input, grad_out=grad_out, weight=weight, bias=bias,
                       save_mean=save_mean, save_invstd=save_invstd)
    grad_input = torch.empty_like(input) if output_mask[0] else None
    grad_weight = torch.empty_like(weight) if output_mask[1] and weight is not None else None
    grad_bias = torch.empty_like(bias) if output_mask[2] and bias is not None else None
    return grad_input, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    (input, weight, bias, _rm, _rv, _nbt, training, _momentum, _eps,
     activation, negative_slope, alpha) = inputs
    _out, save_mean, save_invstd = output
    # The input is the only full-size tensor kept: the backward recomputes the
    # pre-activation (and so the activation's derivative) from it.
    ctx.save_for_backward(input, weight, bias, save_mean, save_invstd)
    ctx.config = (training, activation, negative_slope, alpha)
    ctx.mark_non_differentiable(save_mean, save_invstd)


def _backward(ctx, grad_out, _grad_mean, _grad_invstd):
    input, weight, bias, save_mean, save_invstd = ctx.saved_tensors
    training, activation, negative_slope, alpha = ctx.config
    mask = list(ctx.needs_input_grad[:3])
    grad_input, grad_weight, grad_bias = torch.ops.fusedbn.backward.default(
        grad_out, input, weight, bias, save_mean, save_invstd, training, activation,
        negative_slope, alpha, mask)
    return (grad_input, grad_weight, grad_bias) + (None,) * 9


# torch.library.register_autograd refuses schemas that mutate an argument, and
# forward mutates the running statistics (which never need gradients). This is
# the same registration it performs, without that guard; torch.library.custom_op
# does the same for mutable Python-defined ops.
_lib.impl("forward",
          make_autograd_impl(torch.ops.fusedbn.forward.default, Info(_backward, _setup_context)),
          "Autograd", with_keyset=True)
