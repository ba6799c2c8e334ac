"""fusedbn modules vs eager nn.BatchNormNd + activation: outputs, gradients
and running statistics over activations, dtypes, layouts, ranks and modes,
both orders (order="act_bn": eager activation then nn.BatchNormNd), the
residual and the in-place mode."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import fusedbn

from helpers import (ACT_IDS, ACTIVATIONS, INVERTIBLE, ALL_DTYPES, EAGER_MODULES, FUSED_MODULES, LOW_DTYPES,
                     RANK_LAYOUTS, SHAPES,
                     apply_activation, assert_close, clone_layout, compare_buffers, compare_steps,
                     eager_like, make_fused, make_input, max_err, seed, step)

DTYPE_IDS = [str(d).replace("torch.", "") for d in ALL_DTYPES]
MODES = ["train", "eval", "train_nostats_then_eval"]


def _setup(rank, activation, kwargs, dtype, param_dtype=None, device="cpu", **mod_kwargs):
    C = SHAPES[rank][1]
    fused = make_fused(rank, C, activation, kwargs, dtype=dtype, param_dtype=param_dtype,
                       device=device, **mod_kwargs)
    ref = eager_like(fused)
    ref64 = eager_like(fused, dtype=torch.float64)
    return fused, ref, ref64


# order="act_bn" over every rank and both dense layouts (the non-dense
# "strided" one, computed on a contiguous copy, is in its test_module_configs
# rows), in the "train" mode (a training step, then eval).
ACT_BN_RANK_LAYOUTS = [(2, "contiguous"), (3, "nlc"), (4, "contiguous"), (4, "channels_last"),
                       (5, "channels_last")]
MATRIX = ([("bn_act", r, lay, m) for r, lay in RANK_LAYOUTS for m in MODES]
          + [("act_bn", r, lay, "train") for r, lay in ACT_BN_RANK_LAYOUTS])


def _matrix_id(order, rank, layout, mode):
    return f"{rank}d-{layout}-{mode}" + ("-act_bn" if order == "act_bn" else "")


@pytest.mark.parametrize("order,rank,layout,mode", MATRIX, ids=[_matrix_id(*m) for m in MATRIX])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_matrix(device, act, dtype, order, rank, layout, mode):
    activation, kwargs = act
    if order == "bn_act":
        seed(activation, dtype, rank, layout, mode)
    else:
        seed("act_bn", activation, dtype, rank, layout)
    track = mode != "train_nostats_then_eval"
    fused, ref, ref64 = _setup(rank, activation, kwargs, dtype, device=device,
                               track_running_stats=track, order=order)
    x = make_input(SHAPES[rank], dtype, layout, device=device)
    if mode == "train":
        out = compare_steps(fused, ref, ref64, x, True)[0][0]
        # A second step, in eval, with the statistics just updated.
        compare_steps(fused, ref, ref64, make_input(SHAPES[rank], dtype, layout, device=device),
                      False)
        assert fused.num_batches_tracked.item() == 1
        if layout == "channels_last":
            fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
            assert out.is_contiguous(memory_format=fmt)
    elif mode == "eval":
        compare_steps(fused, ref, ref64, x, False)
    else:
        assert fused.running_mean is None and fused.num_batches_tracked is None
        compare_steps(fused, ref, ref64, x, True)
        compare_steps(fused, ref, ref64, make_input(SHAPES[rank], dtype, layout, device=device),
                      False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_momentum_none_cumulative(device, act, layout, dtype):
    activation, kwargs = act
    seed(1)
    fused, ref, ref64 = _setup(4, activation, kwargs, dtype, device=device, momentum=None)
    assert fused.momentum is None and ref.bn.momentum is None
    for i in range(3):
        x = make_input(SHAPES[4], dtype, layout, device=device)
        compare_steps(fused, ref, ref64, x, True)
        assert fused.num_batches_tracked.item() == i + 1
    compare_steps(fused, ref, ref64, make_input(SHAPES[4], dtype, layout, device=device), False)


@pytest.mark.parametrize("order", ["bn_act", "act_bn"])
def test_momentum_none_is_cumulative_average(device, order):
    """Three steps with momentum=None give the plain average of the batch
    statistics (var unbiased) of the BatchNorm's input -- x, or relu(x) for
    order="act_bn" -- whatever the initial buffers were."""
    seed(2 if order == "bn_act" else "act_bn-cma")
    mod = make_fused(4, 3, "relu", {}, momentum=None, order=order, device=device)
    xs = [make_input((2, 3, 3, 3), device=device) for _ in range(3)]
    for x in xs:
        mod(x)
    a = [(x if order == "bn_act" else F.relu(x)).double() for x in xs]
    dims = (0, 2, 3)
    means = torch.stack([t.mean(dims) for t in a]).mean(0)
    vars_ = torch.stack([t.var(dims, unbiased=True) for t in a]).mean(0)
    # Against float64 (not eager, which assert_close's rule needs): float32
    # statistics averaged over three batches.
    torch.testing.assert_close(mod.running_mean.double(), means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod.running_var.double(), vars_, rtol=1e-5, atol=1e-6)
    assert mod.num_batches_tracked.item() == 3


CONFIGS = {
    "affine_false": dict(affine=False),
    "bias_false": dict(bias=False),
    "affine_false_nostats": dict(affine=False, track_running_stats=False),
    "nostats": dict(track_running_stats=False),
    "momentum_0.3": dict(momentum=0.3),
    "momentum_none": dict(momentum=None),
    "eps_1e-3": dict(eps=1e-3),
}
# (order, activation, config, dtype, layouts, training steps): order="bn_act"
# one step per mode in both dense layouts; "act_bn" two training steps and
# an eval one, one layout per nonlinear activation ("strided" included).
_BN_ACT_CONFIGS = ("affine_false", "bias_false", "affine_false_nostats", "momentum_0.3",
                   "eps_1e-3")
_ACT_BN_CONFIGS = ("affine_false", "bias_false", "nostats", "momentum_none", "eps_1e-3")
CONFIG_ROWS = (
    [("bn_act", act, config, dtype, ("contiguous", "channels_last"), (training,))
     for act in ACTIVATIONS for config in _BN_ACT_CONFIGS
     for dtype in (torch.float32, torch.float64, torch.bfloat16) for training in (True, False)]
    + [("act_bn", act, config, dtype, (layout,), (True, True, False))
       for config in _ACT_BN_CONFIGS for dtype in (torch.float32, torch.bfloat16)
       for act, layout in zip(ACTIVATIONS[1:], ("contiguous", "channels_last", "strided"))])


def _config_id(order, act, config, dtype, layouts, steps):
    mode = "train" if steps == (True,) else "eval" if steps == (False,) else "train2-eval"
    return "-".join([act[0], config, str(dtype).replace("torch.", ""), mode]
                    + ([order, layouts[0]] if order == "act_bn" else []))


@pytest.mark.parametrize("order,act,config,dtype,layouts,steps", CONFIG_ROWS,
                         ids=[_config_id(*r) for r in CONFIG_ROWS])
def test_module_configs(device, order, act, config, dtype, layouts, steps):
    activation, kwargs = act
    if order == "bn_act":
        seed(3)
    else:
        seed("act_bn-config", activation, config, dtype)
    fused, ref, ref64 = _setup(4, activation, kwargs, dtype, device=device, order=order,
                               **CONFIGS[config])
    if config.startswith("affine_false"):
        assert fused.weight is None and fused.bias is None
    if config == "bias_false":
        assert fused.bias is None and fused.weight is not None
    for layout in layouts:
        for training in steps:
            compare_steps(fused, ref, ref64, make_input(SHAPES[4], dtype, layout, device=device),
                          training)


# (activation, order, rank, layout, training steps): order="bn_act" one step
# per mode, "act_bn" (nonlinear activations) a training step then an eval one.
_MIXED_IDS = {(2, "contiguous"): "2d", (3, "nlc"): "3d-nlc", (4, "contiguous"): "4d",
              (4, "channels_last"): "4d-cl", (5, "channels_last"): "5d-cl"}
MIXED = ([(act, "bn_act", r, lay, (t,)) for act in ACTIVATIONS for r, lay in ACT_BN_RANK_LAYOUTS
          for t in (True, False)]
         + [(act, "act_bn", r, lay, (True, False)) for act in ACTIVATIONS[1:]
            for r, lay in ((3, "nlc"), (4, "channels_last"))])


@pytest.mark.parametrize("act,order,rank,layout,steps", MIXED,
                         ids=[f"{a[0]}-{_MIXED_IDS[r, lay]}-" + (
                             "act_bn" if o == "act_bn" else "train" if st[0] else "eval")
                              for a, o, r, lay, st in MIXED])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=["bfloat16", "float16"])
def test_mixed_float32_params_low_precision_input(device, dtype, act, order, rank, layout, steps):
    """What autocast produces: module (params, buffers) in float32, input in
    bf16/fp16. Compared to eager BN on the same mixed inputs."""
    activation, kwargs = act
    seed(4) if order == "bn_act" else seed("act_bn-mixed", activation, dtype, rank, layout)
    fused, ref, ref64 = _setup(rank, activation, kwargs, dtype, param_dtype=torch.float32,
                               device=device, order=order)
    assert fused.weight.dtype == torch.float32 and fused.running_mean.dtype == torch.float32
    for training in steps:
        x = make_input(SHAPES[rank], dtype, layout, device=device)
        (out, gi, gw, gb), _ = compare_steps(fused, ref, ref64, x, training)
        assert out.dtype == dtype and gi.dtype == dtype
        assert gw.dtype == torch.float32 and gb.dtype == torch.float32
        assert fused.running_mean.dtype == torch.float32
        assert fused.running_var.dtype == torch.float32


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS, ids=[f"{r}d-{l}" for r, l in RANK_LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_memory_format_preserved(device, dtype, rank, layout, mode):
    seed(5)
    mod = make_fused(rank, SHAPES[rank][1], "relu", {}, dtype=dtype, device=device)
    mod.train(mode == "train")
    x = make_input(SHAPES[rank], dtype, layout, requires_grad=True, device=device)
    x = clone_layout(x, requires_grad=True)
    out = mod(x)
    out.backward(torch.randn_like(out))
    dense = layout != "strided"
    if dense:
        # preserve_format: a dense input's strides are kept, for the output and its gradient.
        assert out.stride() == x.stride(), (out.stride(), x.stride())
        assert x.grad.stride() == x.stride(), (x.grad.stride(), x.stride())
    else:
        assert out.is_contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        assert out.is_contiguous(memory_format=fmt)
        eager_out = eager_like(mod)(x)
        assert out.stride() == eager_out.stride()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("rank,layout", [(2, "contiguous"), (3, "contiguous"), (4, "contiguous"),
                                         (4, "channels_last"), (5, "contiguous")],
                         ids=["2d", "3d", "4d", "4d-cl", "5d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_zero_size_batch(device, act, dtype, rank, layout, mode):
    activation, kwargs = act
    seed(6)
    fused, ref, ref64 = _setup(rank, activation, kwargs, dtype, device=device)
    shape = (0,) + SHAPES[rank][1:]
    x = make_input(shape, dtype, "contiguous", device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm0, rv0 = fused.running_mean.clone(), fused.running_var.clone()
    g = torch.zeros(shape, dtype=dtype, device=device)
    res_f = step(fused, x, g, mode == "train")
    res_e = step(ref, x, g, mode == "train")
    for name, a, e in zip(("out", "grad_input", "grad_weight", "grad_bias"), res_f, res_e):
        assert a.shape == e.shape, name
        assert a.dtype == e.dtype, name
        assert torch.equal(a, e), f"{name}: {a} vs {e}"
    assert res_f[0].shape == shape
    # Running statistics unchanged, num_batches_tracked counted, as eager.
    assert torch.equal(fused.running_mean, rm0) and torch.equal(fused.running_var, rv0)
    compare_buffers(fused, ref, ref64, dtype)
    assert fused.num_batches_tracked.item() == (1 if mode == "train" else 0)


@pytest.mark.parametrize("rank,spatial", [(3, (0,)), (4, (0, 4)), (4, (4, 0))], ids=str)
def test_eval_of_empty_planes(device, rank, spatial):
    """Eval with a zero spatial size: an empty output and gradient, as eager.
    The eval kernel's short planes as columns divided by the plane's size
    (SIGFPE at S = 0; found by test_differential)."""
    seed(6)
    fused, ref, _ = _setup(rank, "relu", {}, torch.float32, device=device)
    shape = (2, SHAPES[rank][1]) + spatial
    x = make_input(shape, torch.float32, "contiguous", device=device)
    g = torch.zeros(shape, device=device)
    for a, e in zip(step(fused, x, g, False), step(ref, x, g, False)):
        assert a.shape == e.shape and torch.equal(a, e)


def test_functional_matches_module_and_eager(device):
    """batch_norm_act (functional) vs F.batch_norm + activation, running
    statistics updated in place identically, num_batches_tracked optional."""
    seed(7)
    x = make_input((3, 4, 5), device=device)
    w, b = (torch.rand(4) + 0.5).to(device), torch.randn(4).to(device)
    rm, rv = torch.randn(4).to(device), (torch.rand(4) + 0.5).to(device)
    rm2, rv2 = rm.clone(), rv.clone()
    out = fusedbn.batch_norm_act(x, rm, rv, w, b, True, 0.2, 1e-4, "leaky_relu", 0.2)
    exp = F.leaky_relu(F.batch_norm(x, rm2, rv2, w, b, True, 0.2, 1e-4), 0.2)
    assert_close(out, exp, name="out")
    assert_close(rm, rm2, name="running_mean")
    assert_close(rv, rv2, name="running_var")
    # Without running statistics, training uses batch statistics only.
    out = fusedbn.batch_norm_act(x, None, None, w, b, True, activation="elu", alpha=0.5)
    exp = F.elu(F.batch_norm(x, None, None, w, b, True), 0.5)
    assert_close(out, exp, name="out (no stats)")
    # Eval.
    out = fusedbn.batch_norm_act(x, rm, rv, w, b, False, activation="identity")
    assert_close(out, F.batch_norm(x, rm, rv, w, b, False), name="out (eval)")
    # num_batches_tracked is incremented in training when given.
    nbt = torch.tensor(5, device=device)
    fusedbn.batch_norm_act(x, rm, rv, w, b, True, num_batches_tracked=nbt)
    assert nbt.item() == 6
    fusedbn.batch_norm_act(x, rm, rv, w, b, False, num_batches_tracked=nbt)
    assert nbt.item() == 6


NUMERICS = [(1e4, 1e-2), (1e3, 1.0), (-5e3, 0.1)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mean,std", NUMERICS, ids=[f"{m:g}+{s:g}" for m, s in NUMERICS])
@pytest.mark.parametrize("act", [ACTIVATIONS[0], ACTIVATIONS[3]], ids=["identity", "elu"])
def test_large_mean_small_spread(device, act, mean, std, layout):
    """float32 input whose mean dwarfs its spread: the variance must not be
    lost (a one-pass E[x^2] - E[x]^2 gives garbage here).

    Bound, per trial: fusedbn's error vs the float64 reference is at most
    2x eager's, or at most 2x what an ideal float32 implementation gets
    (the batch mean rounded once to float32: an error of ulp(mean)/2, i.e.
    ulp(mean)/2/std in the normalized output and (ulp(mean)/2/std)^2
    relative in the variance), whichever is larger.
    """
    failures = []
    for trial in range(8):
        seed("numerics", mean, std, layout, trial)
        x = (mean + torch.randn((4, 3, 5, 5), dtype=torch.float64) * std).float().to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        failures += [f"trial {trial}: {f}" for f in _numerics_failures(x, act, mean, std)]
    assert not failures, "\n".join(failures)


# Fewer channels than 4 per thread: each channel's planes are split among the
# threads and the parts' moments merged (cpu_kernels.h, NcsWork); short
# planes (3 parts of 5-6 planes, blocks of 2 planes) and long ones (8 parts).
SPLIT_SHAPES = [(16, 3, 40, 40), (10, 1, 90, 80)]
# Channels-last wide rows (WIDE_SHAPES below) on two threads: C = 10 in rows
# of 80, 6 rows left over.
MERGED_SHAPES = [(s, "contiguous") for s in SPLIT_SHAPES] + [((7, 10, 30, 31), "channels_last")]


@pytest.mark.parametrize("shape,layout", MERGED_SHAPES,
                         ids=["x".join(map(str, s)) + "-" + f for s, f in MERGED_SHAPES])
def test_large_mean_small_spread_split_channels(device, shape, layout):
    """As above, on channels whose moments are merged from parts, or from a
    wide row's columns."""
    mean, std = NUMERICS[0]
    failures = []
    for trial in range(2):
        seed("numerics-split", shape, trial)
        x = (mean + torch.randn(shape, dtype=torch.float64) * std).float().to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        failures += [f"trial {trial}: {f}" for f in _numerics_failures(x, ACTIVATIONS[0], mean, std)]
    assert not failures, "\n".join(failures)


def _numerics_failures(x, act, mean, std):
    """test_large_mean_small_spread's bound on one input x: what it breaks."""
    activation, kwargs = act
    ulp32 = 2.0 ** (math.floor(math.log2(abs(mean))) - 23)  # float32 spacing at |mean|
    delta = ulp32 / 2 / std
    out_ideal, var_ideal = 2 * delta, 2 * delta ** 2
    C, device = x.shape[1], x.device
    dims = [d for d in range(x.dim()) if d != 1]
    xd = x.double()
    # momentum=1 makes the running statistics the batch's own (var unbiased).
    rm, rv = torch.zeros(C, device=device), torch.zeros(C, device=device)
    out = fusedbn.batch_norm_act(x, rm, rv, None, None, True, 1.0, 1e-5, activation, **kwargs)
    rm_e, rv_e = torch.zeros(C, device=device), torch.zeros(C, device=device)
    out_e = apply_activation(F.batch_norm(x, rm_e, rv_e, None, None, True, 1.0, 1e-5),
                             activation, **kwargs)
    out_64 = apply_activation(F.batch_norm(xd, None, None, None, None, True, 1.0, 1e-5),
                              activation, **kwargs)
    var64 = xd.var(dim=dims, unbiased=True)
    mean64 = xd.mean(dim=dims)
    assert torch.isfinite(out).all()
    failures = []
    err, err_e = max_err(out, out_64), max_err(out_e, out_64)
    verr = ((rv.double() - var64) / var64).abs().max().item()
    verr_e = ((rv_e.double() - var64) / var64).abs().max().item()
    if err > max(2 * err_e, out_ideal) + 1e-4:
        failures.append(f"output error {err:.3g} (eager {err_e:.3g}, "
                        f"ideal float32 {out_ideal:.3g})")
    if verr > max(2 * verr_e, var_ideal) + 1e-5:
        failures.append(f"running_var relative error {verr:.3g} "
                        f"(eager {verr_e:.3g}, ideal float32 {var_ideal:.3g})")
    # Relative only: the means are large (up to 1e4), absolute tolerances meaningless.
    torch.testing.assert_close(rm.double(), mean64, rtol=1e-5, atol=0)
    return failures


# (weight?, bias?, running stats?, training); eval needs running statistics.
OPTIONALS = [(w, b, s, t) for w in (False, True) for b in (False, True) for s in (False, True)
             for t in (True, False) if t or s]


@pytest.mark.parametrize("has_weight,has_bias,has_stats,training", OPTIONALS,
                         ids=[f"w{int(w)}-b{int(b)}-stats{int(s)}-{'train' if t else 'eval'}"
                              for w, b, s, t in OPTIONALS])
def test_functional_optional_tensors(device, has_weight, has_bias, has_stats, training):
    """Every combination of weight / bias / running statistics being None:
    output and the gradient of each tensor that was given, as F.batch_norm."""
    seed("optional", has_weight, has_bias, has_stats, training)
    C = 3
    x = make_input((3, C, 4), device=device)
    w = (torch.rand(C) + 0.5).to(device) if has_weight else None
    b = (torch.randn(C) * 0.5).to(device) if has_bias else None
    rm = (torch.randn(C) * 0.3).to(device) if has_stats else None
    rv = (torch.rand(C) + 0.5).to(device) if has_stats else None
    g = torch.randn(x.shape).to(device)

    def run(fn):
        xi = x.clone().requires_grad_()
        wi = None if w is None else w.clone().requires_grad_()
        bi = None if b is None else b.clone().requires_grad_()
        rmi = None if rm is None else rm.clone()
        rvi = None if rv is None else rv.clone()
        out = fn(xi, rmi, rvi, wi, bi)
        out.backward(g)
        return (out.detach(), xi.grad, None if wi is None else wi.grad,
                None if bi is None else bi.grad, rmi, rvi)

    res_f = run(lambda *a: fusedbn.batch_norm_act(*a, training=training, activation="elu",
                                                  alpha=0.7))
    res_e = run(lambda *a: F.elu(F.batch_norm(*a, training=training), 0.7))
    for name, a, e in zip(("out", "grad_input", "grad_weight", "grad_bias", "running_mean",
                           "running_var"), res_f, res_e):
        assert_close(a, e, name=name)


def test_bias_gradient_without_weight(device):
    """Minimal form of the optional-tensor case above: weight=None, bias given."""
    seed("bias-only")
    x = torch.randn(2, 3, 4).to(device).requires_grad_()
    b = torch.randn(3).to(device).requires_grad_()
    fusedbn.batch_norm_act(x, torch.zeros(3, device=device), torch.ones(3, device=device), None,
                           b, training=True, activation="identity").sum().backward()
    assert b.grad is not None, "bias.grad is None: the bias gradient was not computed"
    torch.testing.assert_close(b.grad, torch.full((3,), 8.0, device=device))


# The CPU kernels walk a channel in blocks of 4096 values: short planes are
# grouped several to a block, planes of 2048+ values are a block of their
# own, longer ones are cut. One shape per regime, plus a run tail that is not
# a multiple of the 32 vector lanes. Channels with short planes are taken by
# groups of channels (cpu_kernels.h, group_channels): statistics or sums per
# channel, then the elementwise pass in memory order over the group.
# 3x83x9x9 (two threads): groups of 10 channels and a last one of 3, planes
# of 81 values (the backward sums them as columns in the AVX-512 copy,
# channel by channel in the others); channels-last runs 83 channels as
# chunks of 64, 16 and 1. 5x70x13x15 (planes of 195) and 40x45x6x7 (planes
# of 42): large enough for two threads, groups of 8 and 5 channels with a
# shorter last one.
# Planes under 128 values (64 in the backward of the AVX2 and baseline
# copies) are summed as the columns of
# the group's rows (cpu_kernels.h, column_moments), in chunks of channels of
# at most 1024 columns and blocks of at most 64 rows: 2x208x6x7 (two threads,
# 17472 values) is groups of 26 channels in chunks of 24 and 2; 70x3x6x7
# blocks of 64 rows and 6. (A thread takes 16384 values and more:
# cpu_kernels.h, kMinPerThread.)
# SPLIT_SHAPES: channels split among two threads.
# WIDE_SHAPES: channels-last rows whose C is not a multiple of 16, taken k at
# a time as wide rows (cpu_kernels.h, WideRows), with rows left over at the
# end: C = 3 with fewer rows than k = 64 (rows left only); C = 24, 8 rows to a
# wide row of 192, 4 left; C = 10, 8 to a row of 80, 6 left, two threads;
# C = 100, 4 to a row of 400, 1 left.
# Judged against float64: at these sizes eager's float32 sums are the less
# accurate ones.
WIDE_SHAPES = [(2, 3, 3, 5), (4, 24, 7, 9), (7, 10, 30, 31), (3, 100, 5, 7)]
BLOCK_SHAPES = [(9, 2, 7, 9), (2, 3, 48, 48), (2, 2, 70, 70), (3, 2, 1, 8200), (3, 83, 9, 9),
                (5, 70, 13, 15), (40, 45, 6, 7), (2, 208, 6, 7), (70, 3, 6, 7)] + SPLIT_SHAPES + \
    WIDE_SHAPES


LAYOUT_CASES = [((4, 1, 8, 8), None, "NCS"), ((4, 1, 8, 8), torch.channels_last, "NCS"),
                ((2, 1, 3, 4, 5), torch.channels_last_3d, "NCS"), ((4, 1, 10), None, "NCS"),
                ((4, 3, 8, 8), None, "NCS"), ((4, 3, 8, 8), torch.channels_last, "NSC"),
                ((4, 3), None, "NSC"), ((4, 1), None, "NSC"), ((4, 3, 1, 1), None, "NSC"),
                # Very few values per channel (N*S <= 8): a channels-last copy.
                ((2, 8, 2, 2), None, "NSC copy"), ((4, 3, 1, 2), None, "NSC copy"),
                ((4, 3, 4, 4), None, "NCS"), ((2, 5, 1, 2, 3), None, "NCS"),
                ((5, 3, 13), None, "NCS"),
                ((2, 8, 2, 2), torch.channels_last, "NSC")]


@pytest.mark.parametrize("shape,fmt,expected", LAYOUT_CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(f).split('.')[-1]}"
                              for s, f, _ in LAYOUT_CASES])
def test_kernel_layout(shape, fmt, expected):
    """The glue's choice of kernels. A single channel with planes is both
    contiguous and channels-last: it takes the contiguous kernels, which split
    its planes among the threads (the channels-last ones, rows of one value,
    ran it at a tenth of the bandwidth, and it got them). Matrices and 1x1
    planes are rows of C values: channels-last. A contiguous tensor with at
    most 8 values per channel runs the channels-last kernels on a copy."""
    x = torch.zeros(shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    assert fusedbn._C.kernel_layout(x.shape, x.stride()) == expected
    sliced = torch.zeros(4, 3, 8, 8)[:, :, ::2]
    assert fusedbn._C.kernel_layout(sliced.shape, sliced.stride()) == "copy"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=["x".join(map(str, s)) for s in BLOCK_SHAPES])
def test_block_regimes(device, shape, dtype, layout):
    seed("blocks", shape, dtype, layout)
    _train_then_eval_vs64(device, shape, dtype, layout, ACTIVATIONS[2])


# Contiguous planes of 128..159 values: the runs' tails (S % 32 values) of
# every length, which the AVX-512 copy computes as one padded vector in the
# normalize (training and eval), the backward sums and dx (pad_tail), the
# other copies in scalar code.
@pytest.mark.parametrize("act", ACTIVATIONS[1:3], ids=ACT_IDS[1:3])
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("tail", range(32))
def test_run_tails(device, tail, dtype, act):
    seed("run-tails", tail, dtype, act[0])
    _train_then_eval_vs64(device, (2, 3, 1, 128 + tail), dtype, "contiguous", act)


def _train_then_eval_vs64(device, shape, dtype, layout, act):
    """A fused module on `shape` (channels at dim 1), a training step then an
    eval step, each against eager and float64."""
    activation, kwargs = act
    fused = make_fused(4, shape[1], activation, kwargs, dtype=dtype, device=device)
    ref, ref64 = eager_like(fused), eager_like(fused, dtype=torch.float64)
    for training in (True, False):
        compare_steps(fused, ref, ref64, make_input(shape, dtype, layout, device=device),
                      training, vs64=True)


# Random channels-last shapes for the wide rows: C not a multiple of 16, row
# counts around multiples of a wide row's k and of a block (63..9001 rows,
# up to two threads), every activation, both 16- and 32-bit, against float64.
@pytest.mark.parametrize("case", range(16))
def test_wide_rows_random(device, case):
    r = random.Random(f"wide-rows-{case}")
    C = r.choice([3, 5, 10, 12, 24, 40, 72, 100, 120])
    rows = r.choice([63, 64, 65, 127, 191, 193, 1365, 1377, 4097, 9001])
    N = r.choice([1, 2, 3])
    shape = (N, C, 1, max(2, rows // N))
    dtype = r.choice([torch.float32, torch.bfloat16])
    act = r.choice(ACTIVATIONS)
    seed("wide-rows", case)
    _train_then_eval_vs64(device, shape, dtype, "channels_last", act)


# Random contiguous shapes for the short planes taken as columns: planes of
# 3..121 values, batches around a block's 64 rows, channel counts from one to
# several chunks of a group (up to two threads), every activation, 16- and
# 32-bit, against float64.
@pytest.mark.parametrize("case", range(12))
def test_short_planes_random(device, case):
    r = random.Random(f"short-planes-{case}")
    hw = r.choice([(1, 3), (2, 3), (4, 4), (5, 5), (6, 6), (3, 15), (7, 9), (6, 8), (2, 23),
                   (8, 12), (11, 11)])
    N = r.choice([2, 5, 63, 64, 65, 129])
    C = r.choice([1, 3, 37, 130, 300, 1100])
    while N > 2 and N * C * hw[0] * hw[1] > 120000:
        N -= 1
    while C > 1 and N * C * hw[0] * hw[1] > 120000:
        C -= 1
    dtype = r.choice([torch.float32, torch.bfloat16])
    act = r.choice(ACTIVATIONS)
    seed("short-planes", case)
    _train_then_eval_vs64(device, (N, C) + hw, dtype, "contiguous", act)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(256, 8, 4, 4), (64, 8, 5, 5)], ids=["4x4", "5x5"])
def test_statistics_of_tiny_planes_within_ulps(device, shape, layout):
    """Planes shorter than the 32 vector lanes are all 'tail': their sums
    must still be spread over lanes, not added one by one into a scalar
    (that cost ~10 ulps of invstd at 256x64x4x4)."""
    seed("tiny-planes", shape, layout)
    x = make_input(shape, torch.float32, layout, device=device) * 1.3 + 0.4
    C = shape[1]
    _, mean, invstd = torch.ops.fusedbn.forward.default(
        x, None, None, None, None, None, None, True, 0.1, 1e-5, "identity", 0.01, 1.0)
    xd = x.double()
    m64 = xd.mean((0, 2, 3))
    is64 = 1 / torch.sqrt(xd.var((0, 2, 3), unbiased=False) + 1e-5)
    eps = torch.finfo(torch.float32).eps
    scale = xd.abs().mean((0, 2, 3))  # what the mean's rounding is relative to
    assert ((mean.double() - m64).abs() / (eps * scale)).max() <= 3, (mean, m64)
    assert ((invstd.double() - is64).abs() / (eps * is64)).max() <= 3, (invstd, is64)
    assert C == mean.numel()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_empty_1d_input_as_f_batch_norm(device, training, inplace):
    """F.batch_norm takes a 1-D input of shape (0,) with 0-element running
    statistics and returns an empty tensor; so does batch_norm_act (it raised)."""
    rm, rv = torch.empty(0, device=device), torch.empty(0, device=device)
    x = torch.empty(0, device=device)
    expected = F.batch_norm(x, rm, rv, training=training)
    xi = torch.empty(0, device=device, requires_grad=True)
    out = fusedbn.batch_norm_act(xi * 1 if inplace else xi, rm, rv, training=training,
                                 activation="leaky_relu", inplace=inplace)
    assert out.shape == expected.shape == (0,) and out.dtype == expected.dtype
    out.sum().backward()
    assert xi.grad.shape == (0,)
    with pytest.raises(RuntimeError, match="running_mean must have shape"):
        fusedbn.batch_norm_act(x, torch.zeros(3, device=device), torch.ones(3, device=device),
                               training=training)
    with pytest.raises(ValueError, match="got a 1D input"):
        fusedbn.batch_norm_act(torch.zeros(3, device=device), torch.empty(0, device=device),
                               torch.empty(0, device=device))


# ------------------------------------------------ residual and in-place mode
# "wide": 83 channels (the channels-last loops' chunks of 64, 16 and 1) and
# planes of 81 values (the contiguous backward's plane-by-plane sums).
# "groups", "groups_short": BLOCK_SHAPES' channel groups on two threads;
# "split", "split_long": SPLIT_SHAPES; "wide_rows", "wide_rows_2t": WIDE_SHAPES
# (channels-last).
RES_SHAPES = {2: (6, 3), 4: (3, 4, 5, 3), "wide": (3, 83, 9, 9), "groups": (5, 70, 13, 15),
              "groups_short": (40, 45, 6, 7), "split": SPLIT_SHAPES[0],
              "split_long": SPLIT_SHAPES[1], "wide_rows": WIDE_SHAPES[1],
              "wide_rows_2t": WIDE_SHAPES[2]}
RES_RANKS = [(rank, cl) for rank in (2, 4, "wide") for cl in ((False,) if rank == 2 else (False, True))]
# (activation, residual, inplace): the residual with every activation; in
# place (invertible activations only) with and without it.
RES_VARIANTS = ([(a, True, False) for a in ACTIVATIONS]
                + [(a, r, True) for a in INVERTIBLE for r in (False, True)])


def _res_pair(rank, activation, kw, dtype, inplace=False, device="cpu"):
    C = RES_SHAPES[rank][1]
    rank = len(RES_SHAPES[rank])
    ref = EAGER_MODULES[rank](C).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    fused = FUSED_MODULES[rank](C, activation=activation, inplace=inplace, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref.to(device), fused.to(device)


def _res_inputs(rank, dtype, channels_last, device="cpu"):
    x = (torch.randn(RES_SHAPES[rank], dtype=torch.float64) * 2 + 1).to(device=device, dtype=dtype)
    z = torch.randn(RES_SHAPES[rank], dtype=torch.float64).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, z


def _res_tol(dtype, inplace):
    # Looser than assert_close's rule, deliberately: eager rounds bn(x) before
    # adding the residual, fusedbn adds it unrounded; in place, fusedbn also
    # recovers the input from the output (float32: 2e-4).
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-9)
    return dict(atol=2e-4, rtol=2e-4) if inplace else dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("act,residual,inplace", RES_VARIANTS,
                         ids=[f"{a[0]}{'-residual' if r else ''}{'-inplace' if i else ''}"
                              for a, r, i in RES_VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank,channels_last", RES_RANKS)
@pytest.mark.parametrize("training", [True, False])
def test_residual_and_inplace_match_eager(device, act, residual, inplace, dtype, rank,
                                          channels_last, training):
    """act(bn(x) + z) and the in-place mode against eager nn.BatchNormNd + add
    + activation: output, gradients (the residual's too), buffers."""
    _check_residual(device, act, residual, inplace, dtype, rank, channels_last, training)


GROUP_VARIANTS = [(ACTIVATIONS[1], True, False), (ACTIVATIONS[2], True, True),
                  (ACTIVATIONS[2], False, True)]


@pytest.mark.parametrize("act,residual,inplace", GROUP_VARIANTS,
                         ids=[f"{a[0]}{'-residual' if r else ''}{'-inplace' if i else ''}"
                              for a, r, i in GROUP_VARIANTS])
@pytest.mark.parametrize("rank", ["groups", "groups_short", "split", "split_long"])
def test_residual_and_inplace_channel_groups(device, act, residual, inplace, rank):
    """As above, on the channel groups and split channels of two threads
    (contiguous, training)."""
    _check_residual(device, act, residual, inplace, torch.float32, rank, False, True)


@pytest.mark.parametrize("act,residual,inplace", GROUP_VARIANTS,
                         ids=[f"{a[0]}{'-residual' if r else ''}{'-inplace' if i else ''}"
                              for a, r, i in GROUP_VARIANTS])
@pytest.mark.parametrize("rank", ["wide_rows", "wide_rows_2t"])
@pytest.mark.parametrize("training", [True, False])
def test_residual_and_inplace_wide_rows(device, act, residual, inplace, rank, training):
    """As above, on channels-last rows taken as wide rows (float32)."""
    _check_residual(device, act, residual, inplace, torch.float32, rank, True, training)


def _check_residual(device, act, residual, inplace, dtype, rank, channels_last, training):
    activation, kw = act
    if inplace:
        seed("inplace", activation, dtype, rank, channels_last, training, residual)
    else:
        seed("residual", activation, dtype, rank, channels_last, training)
    ref, fused = _res_pair(rank, activation, kw, dtype, inplace=inplace, device=device)
    ref.train(training)
    fused.train(training)
    x, z = _res_inputs(rank, dtype, channels_last, device)
    xr = x.clone().requires_grad_()
    zr = z.clone().requires_grad_() if residual else None
    y_ref = apply_activation(ref(xr) + (zr if residual else 0), activation, **kw)
    leaf = x.clone().requires_grad_()
    zf = z.clone().requires_grad_() if residual else None
    h = leaf * 1 if inplace else leaf  # in place: an intermediate the layer may overwrite
    y = fused(h, zf)
    if inplace:
        assert y.data_ptr() == h.data_ptr()
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y.backward(g)
    tol = _res_tol(dtype, inplace)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(leaf.grad, xr.grad, **tol)
    if residual:
        torch.testing.assert_close(zf.grad, zr.grad, **tol)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, **tol)
    torch.testing.assert_close(fused.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(fused.running_var, ref.running_var, **tol)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_residual_only_residual_grad(device):
    seed("residual-z-only")
    _, fused = _res_pair(4, "relu", {}, torch.float32, device=device)
    x, z = _res_inputs(4, torch.float32, False, device)
    zf = z.clone().requires_grad_()
    for p in fused.parameters():
        p.requires_grad_(False)
    y = fused(x, zf)
    (g,) = torch.autograd.grad(y.sum(), zf)
    pre = fused.weight.view(1, -1, 1, 1) * (x - x.mean((0, 2, 3), keepdim=True)) \
        / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + fused.eps) \
        + fused.bias.view(1, -1, 1, 1) + z
    # Exact: relu's derivative is 0 or 1 (no value is near the kink here).
    torch.testing.assert_close(g, (pre > 0).float(), atol=0, rtol=0)
