"""Shared helpers for the fusedbn tests: the eager references (both
orders), the one tolerance rule (``assert_close``), and sample-input
generators. (tests/conftest.py puts this checkout first on sys.path.)"""
import contextlib
import copy
import os
import zlib

import torch
import torch.nn as nn
from torch import Tensor

import fusedbn
from fusedbn._reference import activation as activation_reference
from fusedbn import _reference
from fusedbn._reference import params_of

# The checkout's root (the directory holding fusedbn/), e.g. for subprocesses.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (activation, extra kwargs) as used throughout the suite. The first four
# keep their positions (tests index them); hardtanh's range is asymmetric
# and within BatchNorm's output range, so both bounds are crossed.
ACTIVATIONS = [
    ("identity", {}),
    ("relu", {}),
    ("leaky_relu", {"negative_slope": 0.1}),
    ("elu", {"alpha": 0.7}),
    ("relu6", {}),
    ("hardtanh", {"min_val": -0.5, "max_val": 1.5}),
    ("silu", {}),
    ("hardswish", {}),
    ("hardsigmoid", {}),
    ("gelu", {}),
    ("gelu", {"approximate": "tanh"}),
    ("mish", {}),
]
ACT_IDS = [a + ("-tanh" if kw.get("approximate") == "tanh" else "") for a, kw in ACTIVATIONS]
# The ones in-place mode takes (with these parameters).
INVERTIBLE = [(a, kw) for a, kw in ACTIVATIONS
              if fusedbn.functional.is_invertible(a, kw.get("negative_slope", 0.01),
                                                  kw.get("alpha", 1.0))]


def kinks(activation, **params):
    """The pre-activation values where the activation's derivative jumps or
    where activity counting changes its mind (csrc/kernels/activations.h:
    active): inputs are kept off them."""
    if activation in ("relu6", "hardtanh"):
        return _reference.bounds(activation, **params)
    if activation == "hardswish":
        return (-3.0, 0.0, 3.0)
    if activation == "hardsigmoid":
        return (-3.0, 3.0)
    return (0.0,)


def is_active(v, activation, **params):
    """What activity tracking counts as active, for float64 pre-activations v."""
    if activation in ("relu6", "hardtanh"):
        lo, hi = _reference.bounds(activation, **params)
        return (v > lo) & (v < hi)
    if activation == "hardsigmoid":
        return (v > -3) & (v < 3)
    return v > 0


def near_kink(v, activation, margin, **params):
    """Where the float64 tensor v lies within ``margin`` of a kink."""
    near = torch.zeros_like(v, dtype=torch.bool)
    for k in kinks(activation, **params):
        near |= (v - k).abs() < margin
    return near

FLOAT_DTYPES = [torch.float32, torch.float64]
LOW_DTYPES = [torch.bfloat16, torch.float16]
ALL_DTYPES = FLOAT_DTYPES + LOW_DTYPES

FUSED_MODULES = {2: fusedbn.BatchNormAct1d, 3: fusedbn.BatchNormAct1d,
                 4: fusedbn.BatchNormAct2d, 5: fusedbn.BatchNormAct3d}
EAGER_MODULES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# Small shapes per rank (N, C, spatial...). Contiguous ones hold more than
# 8 values per channel, so that they run the contiguous kernels (with fewer
# the glue runs the channels-last ones on a copy: glue.cpp, rows_copy_pays).
SHAPES = {2: (4, 3), 3: (3, 4, 23), 4: (2, 3, 5, 7), 5: (2, 3, 3, 2, 6)}

# Layouts valid for each rank.
LAYOUTS = {
    2: ["contiguous", "strided"],
    3: ["contiguous", "nlc", "strided"],
    4: ["contiguous", "channels_last", "strided"],
    5: ["contiguous", "channels_last", "strided"],
}
RANK_LAYOUTS = [(r, lay) for r in (2, 3, 4, 5) for lay in LAYOUTS[r]]


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty when unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def seed(*key):
    """Seed torch's RNG from any printable key, the same in every process
    (FUSEDBN_TEST_SEED, when set, salts every key: other data, same tests)."""
    salt = os.environ.get("FUSEDBN_TEST_SEED", "")
    torch.manual_seed(zlib.crc32(repr((salt,) + key).encode()))


# The activation as torch.nn.functional computes it, applied to y (the
# package's one Python statement of the activations).
apply_activation = activation_reference


class EagerBNAct(nn.Module):
    """Reference: eager nn.BatchNormNd followed by the activation. Its
    state_dict has the keys of the bare BatchNorm (``bn.`` stripped)."""

    def __init__(self, bn, activation, **params):
        super().__init__()
        self.bn = bn
        self.activation = activation
        self.params = params

    def forward(self, x):
        return apply_activation(self.bn(x), self.activation, **self.params)


class EagerActBN(EagerBNAct):
    """The reference for order="act_bn": the activation, then eager
    nn.BatchNormNd (``.bn``, so bn_of / sync_buffers apply)."""

    def forward(self, x):
        return self.bn(apply_activation(x, self.activation, **self.params))


class Stats:
    """What pre_activation64 / avoid_kink need to know of a module."""

    def __init__(self, rm, rv, w, b, eps=1e-5):
        self.running_mean, self.running_var, self.weight, self.bias, self.eps = rm, rv, w, b, eps


def eager_like(mod, dtype=None):
    """An eager nn.BatchNormNd + activation with mod's configuration (the
    activation first for order="act_bn"), loaded with mod's state_dict (cast
    to ``dtype`` when given)."""
    rank_cls = {fusedbn.BatchNormAct1d: nn.BatchNorm1d, fusedbn.BatchNormAct2d: nn.BatchNorm2d,
                fusedbn.BatchNormAct3d: nn.BatchNorm3d}
    base = next(c for c in type(mod).__mro__ if c in rank_cls)
    tensors = [t for t in list(mod.parameters()) + list(mod.buffers()) if t.is_floating_point()]
    pdtype = tensors[0].dtype if tensors else torch.float32
    bn = rank_cls[base](mod.num_features, eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                        track_running_stats=mod.track_running_stats,
                        bias=mod.bias is not None if mod.affine else True, dtype=pdtype)
    bn.load_state_dict(mod.state_dict(), strict=True)
    if dtype is not None:
        bn = bn.to(dtype)
    if tensors:
        bn = bn.to(tensors[0].device)
    bn.train(mod.training)
    cls = EagerActBN if getattr(mod, "order", "bn_act") == "act_bn" else EagerBNAct
    return cls(bn, mod.activation, **params_of(mod))


def make_fused(rank, C, activation, act_kwargs, dtype=torch.float32, param_dtype=None,
               randomize=True, device="cpu", **kwargs):
    """A fusedbn module of the right rank with random affine params and
    random running statistics (so eval is not trivially the identity), on
    ``device`` (the values drawn on the CPU: the same on every device)."""
    mod = FUSED_MODULES[rank](C, activation=activation, **act_kwargs, **kwargs)
    if randomize:
        with torch.no_grad():
            if mod.weight is not None:
                mod.weight.copy_(torch.rand(C) + 0.5)
            if mod.bias is not None:
                mod.bias.copy_(torch.randn(C) * 0.5)
            if mod.running_mean is not None:
                mod.running_mean.copy_(torch.randn(C) * 0.5 + 1.0)
                mod.running_var.copy_(torch.rand(C) * 2 + 0.5)
    mod.to(device=device, dtype=param_dtype if param_dtype is not None else dtype)
    return mod


def make_input(shape, dtype=torch.float32, layout="contiguous", requires_grad=False,
               device="cpu"):
    """Random input offset from 0 with per-channel spread, in the given
    layout: contiguous, channels_last (4D/5D), nlc (3D: (N, L, C) storage
    transposed to (N, C, L)), strided (non-dense: every other element of
    the last dimension). Drawn on the CPU and moved to ``device``: the same
    values on every device."""
    shape = tuple(shape)
    C = shape[1]
    view = [1, C] + [1] * (len(shape) - 2)
    scale = (torch.arange(C, dtype=torch.float64) * 0.5 + 0.5).view(view)
    offset = (torch.arange(C, dtype=torch.float64) - 1.0).view(view)

    def rnd(s):
        return (torch.randn(s, dtype=torch.float64) * scale + offset + 0.5).to(device=device,
                                                                               dtype=dtype)

    if layout == "contiguous":
        x = rnd(shape)
    elif layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = rnd(shape).contiguous(memory_format=fmt)
        assert x.is_contiguous(memory_format=fmt)
    elif layout == "nlc":
        assert len(shape) == 3
        x = rnd(shape).transpose(1, 2).contiguous().transpose(1, 2)
        assert x.shape == shape and not x.is_contiguous()
    elif layout == "strided":
        big = shape[:-1] + (shape[-1] * 2,)
        if len(shape) == 2:
            # (N, C): stride the batch dimension so channels stay as they are.
            big = (shape[0] * 2, shape[1])
            x = rnd(big)[::2]
        else:
            x = rnd(big)[..., ::2]
        assert x.shape == shape and not x.is_contiguous()
    else:
        raise ValueError(layout)
    if requires_grad:
        x.requires_grad_(True)
    return x


def max_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().max().item()


TIGHT = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def assert_close(actual, expected, ref64=None, name="", compute_dtype=None, abs_floor=1e-6,
                 vs64=False):
    """The suite's single tolerance rule, chosen by the computation's dtype
    (``compute_dtype``, the input's; by default ``actual``'s).

    float32/float64: ``actual`` must match ``expected`` (eager) with tight
    tolerances.
    bfloat16/float16: ``actual``'s max error against the float64 reference
    ``ref64`` must be at most 2x ``expected``'s (eager's) max error against
    it, plus ``abs_floor``. A float32 result of such a computation (the
    grad_weight or running stats of a float32 module fed bf16 input) may in
    addition be off by float32's own tight tolerance (rtol 1e-5 of the
    largest value): eager can be exact there by luck.
    vs64: judge float32/float64 by the low-precision rule too -- for sums over
    thousands of values, where eager's own float32 error is far above the tight
    tolerance (its channels-last grad_weight is off by 0.3 at 16400 values).
    """
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{name}: {actual} vs {expected}"
        return
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} vs {expected.dtype}"
    compute_dtype = compute_dtype or actual.dtype
    if compute_dtype in TIGHT and not vs64:
        torch.testing.assert_close(actual.detach(), expected.detach(), **TIGHT[actual.dtype],
                                   equal_nan=True, msg=lambda m: f"{name}: {m}")
        return
    assert ref64 is not None, f"{name}: low precision needs a float64 reference"
    assert ref64.shape == actual.shape
    fused_err = max_err(actual, ref64)
    eager_err = max_err(expected, ref64)
    floor = abs_floor
    if actual.dtype in TIGHT and actual.numel():
        floor += TIGHT[actual.dtype]["rtol"] * ref64.abs().max().item()
    assert fused_err <= 2 * eager_err + floor, (
        f"{name}: fusedbn error {fused_err:.3g} vs float64 reference exceeds 2x eager's "
        f"{eager_err:.3g} (+{floor:.3g})")


def bn_of(ref):
    return ref.bn if isinstance(ref, EagerBNAct) else ref


def clone_layout(x, requires_grad=False):
    """A leaf copy of x with exactly x's sizes and strides (non-dense too)."""
    y = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    with torch.no_grad():
        y.copy_(x)
    return y.requires_grad_(requires_grad)


def step(mod, x, grad_out, training):
    """One forward + backward of mod on a fresh leaf copy of x.
    Returns (out, grad_input, grad_weight, grad_bias)."""
    mod.train(training)
    mod.zero_grad(set_to_none=True)
    xi = clone_layout(x, requires_grad=True)
    out = mod(xi)
    out.backward(grad_out)
    w = getattr(bn_of(mod), "weight", None)
    b = getattr(bn_of(mod), "bias", None)
    return (out.detach(), xi.grad, None if w is None else w.grad,
            None if b is None else b.grad)


@contextlib.contextmanager
def single_thread():
    """Run eager references on one thread: on tiny tensors their parallel
    regions only cost time (a lot of it on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def off_kink(x, margin=1e-3, activation="relu", **params):
    """x with the elements within ``margin`` of a kink of ``activation``
    moved 0.0625 away from it, in x's own layout. With order="act_bn" the
    activation's kinks are at the input's values (not at the BatchNorm
    output's, as avoid_kink assumes)."""
    for k in kinks(activation, **params):
        xd = x.detach().double()
        near = (xd - k).abs() < margin
        if not near.any():
            continue
        x = clone_layout(x)
        with torch.no_grad():
            x[near] = torch.where(xd[near] < k, k - 0.0625, k + 0.0625).to(x.dtype)
    return x


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


def compare_steps(fused, ref, ref64, x, training,
                  names=("out", "grad_input", "grad_weight", "grad_bias"), vs64=False):
    """Run one step on fusedbn, eager (same dtypes) and the float64 eager
    reference, and compare outputs, gradients and the running statistics.
    The references first take fused's current buffers, so that each step is
    judged on its own (low-precision running statistics may legitimately
    differ by a rounding after an earlier step). With order="act_bn" the
    input is first spread over both branches of the activation and moved off
    its kink (at the input's 0), and the references run on one thread."""
    sync_buffers(fused, ref, ref64)
    act_bn = fused.order == "act_bn"
    if act_bn:
        x = off_kink(both_branches(x), activation=fused.activation, **params_of(fused))
    elif fused.activation != "identity":
        x = avoid_kink(x, fused, training)
    g = torch.randn(x.shape, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    res_f = step(fused, x, g, training)
    with single_thread() if act_bn else contextlib.nullcontext():
        res_e = step(ref, x, g, training)
        res_64 = step(ref64, x.double(), g.double(), training)
    for name, a, e, r in zip(names, res_f, res_e, res_64):
        assert_close(a, e, r, name=name, compute_dtype=x.dtype, vs64=vs64)
    compare_buffers(fused, ref, ref64, x.dtype, vs64)
    return res_f, res_e


def pre_activation64(mod, x, training):
    """The BatchNorm output (before the activation) in float64, for mod's
    current state: batch statistics in training (or without running
    statistics), running statistics in eval."""
    xd = x.detach().double()
    dims = [0] + list(range(2, x.dim()))
    view = [1, -1] + [1] * (x.dim() - 2)
    if training or mod.running_mean is None:
        mean, var = xd.mean(dims), xd.var(dims, unbiased=False)
    else:
        mean, var = mod.running_mean.double(), mod.running_var.double()
    y = (xd - mean.view(view)) / (var.view(view) + mod.eps).sqrt()
    if mod.weight is not None:
        y = y * mod.weight.detach().double().view(view)
    if mod.bias is not None:
        y = y + mod.bias.detach().double().view(view)
    return y


def avoid_kink(x, mod, training, margin=1e-3):
    """x, with the few elements whose pre-activation is within ``margin`` of
    one of the activation's kinks moved off it (in x's own layout). In bf16 and
    fp16 an input value can equal the running mean exactly, and then eager's
    folded x * scale + shift lands a rounding on either side of 0 while the
    exact (x - mean) * scale is 0: a kink artifact, not an error."""
    for _ in range(5):
        near = near_kink(pre_activation64(mod, x, training), getattr(mod, "activation", "relu"),
                         margin, **params_of(mod))
        if not near.any():
            return x
        x = clone_layout(x)
        with torch.no_grad():
            v = x.double()[near]
            x[near] = (v + 0.0625 + 0.03 * v.abs()).to(x.dtype)  # > 1 bf16 ulp
    raise AssertionError("could not move the input off the activation's kink")


def sync_buffers(fused, *refs):
    with torch.no_grad():
        for r in refs:
            for name, t in fused.named_buffers():
                getattr(bn_of(r), name).copy_(t)


def compare_buffers(fused, ref, ref64, compute_dtype=None, vs64=False):
    bn, bn64 = bn_of(ref), bn_of(ref64)
    for name in ("running_mean", "running_var"):
        a, e = getattr(fused, name), getattr(bn, name)
        if a is None or e is None:
            assert a is None and e is None, name
            continue
        assert_close(a, e, getattr(bn64, name), name=name, compute_dtype=compute_dtype, vs64=vs64)
    a, e = fused.num_batches_tracked, bn.num_batches_tracked
    assert (a is None) == (e is None)
    if a is not None:
        assert a.dtype == e.dtype == torch.long
        assert torch.equal(a, e), f"num_batches_tracked {a} vs {e}"


def op_args(op, **values):
    """Positional arguments for a torch.ops.fusedbn operator, by schema name:
    arguments not given take their default, optional tensors None (so the
    tests keep working when the schema grows optional arguments)."""
    args = []
    for a in op._schema.arguments:
        if a.name in values:
            args.append(values.pop(a.name))
        elif a.has_default_value():
            args.append(a.default_value)
        elif isinstance(a.type, torch.OptionalType):
            args.append(None)
        else:
            raise TypeError(f"{op}: no value for argument {a.name!r}")
    assert not values, f"{op} has no argument(s) {sorted(values)}"
    return tuple(args)


def output_mask(op, input=True, weight=True, bias=True):
    """The backward op's output_mask: (grad_input, grad_weight, grad_bias,
    then False for any further gradient the schema returns)."""
    n = len(op._schema.returns)
    return [input, weight, bias] + [False] * (n - 3)


def dead_channel_module(device="cpu", **kwargs):
    """BatchNormReLU2d(3) counting activity, whose channel 0 is never active
    (bias -100; |normalized value| < sqrt(N*H*W) for the suite's small batches)."""
    mod = fusedbn.BatchNormReLU2d(3, track_activity=True, device=device, **kwargs)
    with torch.no_grad():
        mod.weight.fill_(1.0)
        mod.bias.zero_()
        mod.bias[0] = -100.0
    return mod


class CompileNet(nn.Module):
    """conv -> BatchNormAct2d -> conv, for the torch.compile tests."""

    def __init__(self, activation="relu", **kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = fusedbn.BatchNormAct2d(4, activation=activation, **kwargs)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn(self.conv1(x)))


class EagerCompileNet(nn.Module):
    """The same network with nn.BatchNorm2d + activation (before the BatchNorm
    for order="act_bn")."""

    def __init__(self, net):
        super().__init__()
        self.conv1 = copy.deepcopy(net.conv1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.load_state_dict(net.bn.state_dict())
        self.conv2 = copy.deepcopy(net.conv2)
        self.act = (net.bn.activation, params_of(net.bn))
        self.act_first = net.bn.order == "act_bn"
        self.to(net.bn.running_mean.device)

    def forward(self, x):
        h = self.conv1(x)
        if self.act_first:
            return self.conv2(self.bn(apply_activation(h, self.act[0], **self.act[1])))
        return self.conv2(apply_activation(self.bn(h), self.act[0], **self.act[1]))


def run_step(model, x, g):
    """One forward + backward; (output, input grad, {parameter name: grad})."""
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = model(xi)
    out.backward(g)
    grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), xi.grad, grads


# ------------------------------------------------------- models for convert
def randomize_bn(model):
    """Non-trivial affine parameters and running statistics in every BatchNorm
    of ``model`` (in place; returns it), so that eval is not the identity and
    a lost running-stat update shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.3, 0.3)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 1.5)
                    m.num_batches_tracked.fill_(5)
    return model


class DenseLayer(nn.Module):
    """torchvision densenet's _DenseLayer: a Tensor or a list of Tensors."""

    def __init__(self, cin, growth=4, memory_efficient=False):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs):
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def any_requires_grad(self, inputs):
        for t in inputs:
            if t.requires_grad:
                return True
        return False

    def call_checkpoint_bottleneck(self, inputs):
        def closure(*inputs):
            return self.bn_function(inputs)
        return torch.utils.checkpoint.checkpoint(closure, *inputs, use_reentrant=False)

    def forward(self, input):
        if isinstance(input, Tensor):   # (torchvision: from torch import Tensor)
            prev_features = [input]
        else:
            prev_features = input
        if self.memory_efficient and self.any_requires_grad(prev_features):
            bottleneck = self.call_checkpoint_bottleneck(prev_features)
        else:
            bottleneck = self.bn_function(prev_features)
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers=3, cin=4, growth=4, memory_efficient=False):
        super().__init__()
        for i in range(layers):
            self[f"denselayer{i + 1}"] = DenseLayer(cin + i * growth, growth, memory_efficient)

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)
