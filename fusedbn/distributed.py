"""``SyncBatchNormAct``: ``nn.SyncBatchNorm`` followed by an activation, with the
normalization + activation (and its backward) in fusedbn's fused kernels.

    model = fusedbn.SyncBatchNormAct.convert_sync_batchnorm(model)  # BatchNormAct* -> sync
    model = DistributedDataParallel(model)

Training with more than one process in the group: the batch statistics are
those of the whole group's batch (the concatenation of every rank's batch;
ranks may hold different batch sizes, zero included), so every rank
normalizes with the same mean and variance and updates its running statistics
identically. One collective in the forward (an ``all_gather`` of each rank's
per-channel count, mean and M2 in float64) and one in the backward (an
``all_reduce`` of the per-channel sums of the gradient), as ``nn.SyncBatchNorm``.
Otherwise (eval mode, no process group initialized, a group of one) it is
exactly ``BatchNormAct*``.
"""
import torch
import torch.distributed as dist

from ._reference import acc_dtype as _acc_dtype
from ._reference import params_of
from .functional import _check_number, check_activation
from .modules import _BatchNormAct

__all__ = ["SyncBatchNormAct"]


def _too_few_values(count, world_size):
    return ValueError(
        "Expected more than 1 value per channel when training, got "
        f"{count} value(s) per channel across the {world_size} processes of the group")


def _gather_stats(x, process_group, world_size):
    """Global per-channel (count, mean, biased var, unbiased var) of the
    concatenation of every rank's ``x``, in float64; one all_gather."""
    C = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // C
    packed = torch.zeros(1 + 2 * C, dtype=torch.float64, device=x.device)
    if n > 0:
        # float32/float64 reductions already accumulate precisely enough; a
        # half-precision result would round the statistics, so widen those.
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        packed[0] = n
        packed[1:1 + C] = mean
        packed[1 + C:] = var.double() * n  # M2, the sum of squared deviations
    # An empty rank sends count 0 (and zeros) but must still take part, or
    # its peers would block. all_gather (not all_reduce): the counts differ.
    gathered = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(gathered, packed, group=process_group)
    stats = torch.stack(gathered)                                  # [W, 1 + 2C]
    counts, means, m2s = stats[:, :1], stats[:, 1:1 + C], stats[:, 1 + C:]
    # Chan et al.'s parallel merge, all ranks at once: exact in exact
    # arithmetic, and every rank computes it from the same gathered tensor
    # in the same order, so all ranks get bit-identical statistics.
    total = counts.sum()
    total_n = int(total.item())
    if total_n == 0:
        zeros = torch.zeros(C, dtype=torch.float64, device=x.device)
        return 0, zeros, zeros.clone(), zeros.clone()
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total_n, mean, m2 / total, m2 / max(total_n - 1, 1)


class _SyncBatchNormActFunction(torch.autograd.Function):
    """act(bn(x) [+ residual]) with the group's batch statistics."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, activation, params, process_group, world_size,
                activity, activity_momentum):
        count, mean64, var64, unbiased64 = _gather_stats(x, process_group, world_size)
        # Every rank sees the same total, so every rank raises (no rank is
        # left waiting in a later collective).
        if count == 1:
            raise _too_few_values(count, world_size)
        acc = _acc_dtype(x.dtype)
        # The fused op in eval mode normalizes with the statistics it is
        # given: (x - mean) * rsqrt(var + eps), the biased variance as in
        # training, then affine, residual and activation in the same passes.
        # Activity: this rank's values whose pre-activation (with the group's
        # statistics) is positive, counted in the same pass.
        out, save_mean, save_invstd = torch.ops.fusedbn.forward.default(
            x, residual, weight, bias, mean64.to(acc), var64.to(acc), None, False, None,
            float(eps), activation, activity=activity,
            activity_momentum=float(activity_momentum), **params)

        # Buffers change only once the collective and the kernel succeeded.
        # An all-empty group leaves the running statistics alone, as an empty
        # batch does in nn.BatchNorm; the counter still advances.
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if running_mean is not None and count > 0:
            factor = (1.0 / float(num_batches_tracked.item()) if momentum is None
                      else float(momentum))
            with torch.no_grad():
                running_mean.copy_(running_mean.double() * (1 - factor) + mean64 * factor)
                running_var.copy_(running_var.double() * (1 - factor) + unbiased64 * factor)

        ctx.save_for_backward(x, residual, weight, bias, save_mean, save_invstd)
        ctx.config = (activation, params, count, process_group)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, residual, weight, bias, save_mean, save_invstd = ctx.saved_tensors
        activation, params, count, process_group = ctx.config
        need_x, need_res, need_w, need_b = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                            ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        need_w = need_w and weight is not None
        need_b = need_b and bias is not None
        need_res = need_res and residual is not None
        acc = _acc_dtype(x.dtype)
        C = x.shape[1]
        grad_x = grad_res = grad_w = grad_b = None

        if x.numel() > 0:
            # The op's sums come back in the weight's dtype: give it acc-type
            # weight and bias (ones / zeros without affine, which leave the
            # pre-activation unchanged) so the sums are never rounded to half
            # precision and exist even without affine parameters.
            w = weight.to(acc) if weight is not None else save_mean.new_ones(C)
            b = bias.to(acc) if bias is not None else save_mean.new_zeros(C)
            # training=False: g = dy * act'(pre), grad_input = g * w * invstd,
            # and the LOCAL sums of g * xhat and g; the group's terms follow.
            gi, sum_gxhat, sum_g, grad_res = torch.ops.fusedbn.backward.default(
                grad_out, x, residual, w, b, save_mean, save_invstd, False, activation,
                output_mask=[need_x, need_x or need_w, need_x or need_b, need_res], **params)
        else:
            gi = torch.empty_like(x) if need_x else None
            sum_gxhat = sum_g = save_mean.new_zeros(C)
            grad_res = torch.empty_like(residual) if need_res else None

        if need_x:
            # As nn.SyncBatchNorm: reduced only when the input needs a gradient
            # (the same on every rank); an empty rank contributes zeros.
            combined = torch.cat([sum_g, sum_gxhat]).double()
            dist.all_reduce(combined, dist.ReduceOp.SUM, group=process_group)
            if x.numel() > 0:
                view = [1, C] + [1] * (x.dim() - 2)
                scale = (w * save_invstd).view(view)
                mean_g = (combined[:C] / count).to(acc).view(view)
                mean_gxhat = (combined[C:] / count).to(acc).view(view)
                # dx = w*invstd * (g - mean(g) - xhat * mean(g*xhat)), the means
                # over the whole group's batch; gi already holds w*invstd*g.
                # (x - mean) before scaling keeps the precision eager has.
                corr = (x.to(acc) - save_mean.view(view)).mul_(save_invstd.view(view) * mean_gxhat)
                corr.add_(mean_g).mul_(scale)
                # gi.to(acc) is a fresh tensor either way (the op's output or
                # its copy), so it can take the result.
                grad_x = gi.to(acc).sub_(corr).to(x.dtype)
            else:
                grad_x = gi
        # Weight and bias gradients stay LOCAL sums, exactly as nn.SyncBatchNorm
        # returns them: DistributedDataParallel reduces them with every other
        # parameter gradient. (An empty rank returns zeros, not None, so DDP
        # still finds a gradient for every parameter.)
        if need_w:
            grad_w = sum_gxhat.to(weight.dtype)
        if need_b:
            grad_b = sum_g.to(bias.dtype)
        # One gradient per argument of forward: the rest are not differentiable.
        return (grad_x, grad_res, grad_w, grad_b) + (None,) * (len(ctx.needs_input_grad) - 4)


class SyncBatchNormAct(_BatchNormAct):
    """``nn.SyncBatchNorm`` followed by an activation (any of
    ``fusedbn.ACTIVATIONS``, its parameters by keyword as in
    ``BatchNormAct*``), over input of any rank >= 2; ``forward(x, residual=None)`` computes
    ``act(bn(x) + residual)``.

    Parameters, buffers and state_dict keys are those of ``nn.SyncBatchNorm``.
    In training with an initialized process group of more than one process,
    the statistics are the group's (see the module docstring); the weight and
    bias gradients are this rank's local sums, as ``nn.SyncBatchNorm``'s are,
    for DistributedDataParallel to reduce. In every other case it computes
    exactly what ``BatchNormAct{1,2,3}d`` does. Unlike ``nn.SyncBatchNorm``,
    CPU tensors are accepted (with the gloo backend).

    The keyword options of ``BatchNormAct*`` are accepted (``bias_init``,
    ``track_activity``, ``activity_momentum``, ``order``, ``inplace``), and
    ``fusedbn.diagnostics`` sees the module as one of them. The synchronized
    forward computes ``act(bn(x))`` only, without in-place output: with
    ``order="act_bn"`` or ``inplace=True`` it raises ``ValueError`` (on every
    rank, before the collective); where the module computes exactly
    ``BatchNormAct*`` (eval, no group, a group of one) they work as there.
    Activity tracking works in both: synchronized, each rank counts its own
    active values (pre-activations with the group's statistics).

    Every rank of the group must call it the same number of times (each call
    in training is a collective), with the same number of channels; the
    input's requires_grad must agree across ranks too.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, activation="relu", negative_slope=0.01, alpha=1.0,
                 process_group=None, device=None, dtype=None, *, bias=True, **options):
        # process_group sits where nn.SyncBatchNorm has it, before device.
        check_activation(activation)
        _check_number("negative_slope", negative_slope)
        _check_number("alpha", alpha)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         negative_slope, alpha, device, dtype, bias=bias, **options)
        self.process_group = process_group

    def _op_params(self):
        # The activation's parameters as the op takes them (floats, by name).
        return {k: (v if isinstance(v, str) else float(v)) for k, v in params_of(self).items()}

    def _unsupported_when_synchronized(self):
        """The options the synchronized forward does not implement, by name."""
        return [name for name, on in (("order='act_bn'", self.order == "act_bn"),
                                      ("inplace=True", self.inplace)) if on]

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input, residual=None):
        """act(bn(input) [+ residual]); residual has the input's shape and dtype.
        Training in a group of more than one process: synchronized statistics
        (a collective); otherwise the local fused op."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if residual is not None and residual.shape != input.shape:
            # Checked before the collective: raising on one rank after its
            # peers entered the all_gather would leave them waiting.
            raise ValueError(f"fusedbn: residual has shape {tuple(residual.shape)} but input "
                             f"has shape {tuple(input.shape)}; they must match")
        shape = input.shape
        if input.dim() > 5:
            # The kernels take up to 3 spatial dimensions; the statistics are
            # per channel over all of them, so flattening them changes nothing.
            input = input.flatten(2)
            residual = None if residual is None else residual.flatten(2)
        out = self._forward(input, residual)
        return out.reshape(shape) if out.shape != shape else out

    def _forward(self, input, residual):
        # nn.SyncBatchNorm's choices: batch statistics in training and when no
        # running statistics exist; buffers passed only when used.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_buffers else None
        running_var = self.running_var if pass_buffers else None
        counts = self.training and self.track_running_stats
        # No synchronization in eval mode, as nn.SyncBatchNorm.
        need_sync = (use_batch_stats and self.training and dist.is_available()
                     and dist.is_initialized())
        if need_sync:
            process_group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(process_group)
            need_sync = world_size > 1
        if not need_sync:
            return super().forward(input, residual)
        unsupported = self._unsupported_when_synchronized()
        if unsupported:
            # Every rank has the same options: every rank raises, before the collective.
            raise ValueError(
                f"fusedbn: SyncBatchNormAct's synchronized forward (training in a group of "
                f"more than one process) does not support {', '.join(unsupported)}; it "
                "computes act(bn(x)) without in-place output")
        _check_number("momentum", self.momentum, allow_none=True)
        _check_number("eps", self.eps)
        if not self.eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        return _SyncBatchNormActFunction.apply(
            input, residual, self.weight, self.bias, running_mean, running_var,
            self.num_batches_tracked if counts else None, self.momentum, self.eps,
            self.activation, self._op_params(), process_group, world_size,
            self.activity if self.track_activity else None, self.activity_momentum)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every fusedbn ``BatchNormAct*`` module (any
        ``fusedbn.modules._BatchNormAct``) in ``module``, recursively, by a
        ``SyncBatchNormAct`` sharing its parameter and buffer tensors and
        copying eps, momentum, affine, track_running_stats, the activation and
        its parameters, order, bias_init, the activity tracking (sharing the
        ``activity`` buffer) and the train/eval flag (and ``qconfig``), as
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` does for ``nn.BatchNorm*``.

        Returns ``module`` with its children converted, or the new module
        when ``module`` itself is a ``BatchNormAct*``. Plain ``nn.BatchNorm*``
        layers are left alone (use ``nn.SyncBatchNorm.convert_sync_batchnorm``
        or ``fusedbn.convert`` first), and so are ``SyncBatchNormAct`` layers
        already there. ``inplace=True`` is not carried: it only saves memory,
        and the synchronized path does not have it.
        """
        module_output = module
        if isinstance(module, _BatchNormAct) and not isinstance(module, SyncBatchNormAct):
            module_output = cls(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, module.activation, module.negative_slope,
                module.alpha, process_group, bias=module.bias is not None, order=module.order,
                bias_init=module.bias_init, activity_momentum=module.activity_momentum,
                min_val=module.min_val, max_val=module.max_val, approximate=module.approximate)
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            if getattr(module, "activity", None) is not None:
                module_output.activity = module.activity
            module_output.track_activity = module.track_activity
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output
