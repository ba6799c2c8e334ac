"""Activity counting semantics -- batch_norm_act(..., activity=t) with t of
shape [C] (the fraction) or [3, C] (fraction, running average, inactive
streak), the counters of track_activity=True modules, fusedbn.diagnostics.
(Its opcheck, compile and bad-input tests are in the concern files, with the
activity argument as one of their parameters; the buffer's state_dict
behaviour in test_modules.py.)

The reference for the counts: the activation's input computed in float64
(the BatchNorm output, plus the residual when given, for order="bn_act"; the
input itself for order="act_bn"), with the inputs moved off its 0 so that
rounding cannot flip a sign, and counted > 0 per channel."""
import pytest
import torch
import torch.nn as nn

import fusedbn
from fusedbn import diagnostics
from fusedbn._reference import params_of
from helpers import (ACT_IDS, ACTIVATIONS, INVERTIBLE, is_active, near_kink, ALL_DTYPES, SHAPES, Stats, avoid_kink, clone_layout,
                     dead_channel_module, make_fused, make_input, off_kink, pre_activation64, seed)

INVERTIBLE_IDS = [a for a, _ in INVERTIBLE]
DTYPE_IDS = [str(d).replace("torch.", "") for d in ALL_DTYPES]
RANK_LAYOUTS = [(2, "contiguous"), (3, "nlc"), (4, "contiguous"), (4, "channels_last"),
                (4, "strided"), (5, "channels_last")]
RL_IDS = [f"{r}d-{lay}" for r, lay in RANK_LAYOUTS]
# How far from 0 every reference activation input is kept: far beyond the
# float32 rounding of the kernel's batch statistics.
MARGIN = 1e-4


def _params(C, dtype, device="cpu"):
    to = dict(device=device, dtype=dtype)
    return Stats(rm=(torch.randn(C) * 0.5 + 0.5).to(**to), rv=(torch.rand(C) * 2 + 0.5).to(**to),
                  w=(torch.rand(C) + 0.5).to(**to), b=(torch.randn(C) * 0.5).to(**to))


def _dims(x):
    return [0] + list(range(2, x.dim()))


def fraction(pre, activation="relu", **params):
    """Per channel: how many values of the float64 ``pre`` are active, over how many."""
    n = pre[:, 0].numel()
    return (is_active(pre, activation, **params).sum(_dims(pre)).double() / n).float()


def reference(x, st, training, order, residual=None, activation="relu", params=None):
    """(x, residual, float64 activation input), the tensors moved off the
    edges of what counts as active."""
    params = params or {}
    if order == "act_bn":
        x = off_kink(x, MARGIN, activation=activation, **params)
        return x, residual, x.double()
    st.activation = activation
    st.__dict__.update(params)  # as a module carries them
    if residual is None:
        x = avoid_kink(x, st, training, margin=MARGIN)
        return x, None, pre_activation64(st, x, training)
    pre = pre_activation64(st, x, training)
    for _ in range(5):
        near = near_kink(pre + residual.double(), activation, MARGIN, **params)
        if not near.any():
            break
        residual = clone_layout(residual)
        with torch.no_grad():
            residual[near] = (residual.double()[near] + 0.0625).to(residual.dtype)
    else:
        raise AssertionError("could not move the residual off the kink")
    return x, residual, pre + residual.double()


def _residual_like(x):
    z = torch.empty_like(x)
    with torch.no_grad():
        z.copy_(torch.randn(x.shape, dtype=torch.float64) * 0.5)
    return z


def _call(x, st, training, activation, kwargs, **options):
    return fusedbn.batch_norm_act(x, st.running_mean.clone(), st.running_var.clone(), st.weight,
                                  st.bias, training, 0.1, st.eps, activation, **kwargs, **options)


def _fresh_state(C, device="cpu"):
    state = torch.zeros(3, C, device=device)
    state[1] = float("nan")  # no batch yet, as the modules start
    return state


# (order, with residual)
VARIANTS = [("bn_act", False), ("bn_act", True), ("act_bn", False)]


# ----------------------------------------------------------- functional

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("rank,layout", RANK_LAYOUTS, ids=RL_IDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_activity_matches_reference(device, act, dtype, rank, layout, mode):
    activation, kwargs = act
    training = mode == "train"
    C = SHAPES[rank][1]
    for order, with_residual in VARIANTS:
        if order == "act_bn" and activation == "identity":
            continue  # test_identity_act_bn_counts_the_input
        seed("activity", activation, dtype, rank, layout, mode, order, with_residual)
        st = _params(C, dtype, device)
        x = make_input(SHAPES[rank], dtype, layout, device=device)
        z = _residual_like(x) if with_residual else None
        x, z, pre = reference(x, st, training, order, z, activation, kwargs)
        activity = torch.full((C,), -1.0, device=device)  # overwritten, not accumulated into
        out = _call(x, st, training, activation, kwargs, residual=z, order=order,
                    activity=activity)
        expected = fraction(pre, activation, **kwargs)
        assert torch.equal(activity, expected), (
            f"{order}{' + residual' if z is not None else ''}: {activity} vs {expected}")
        if activation == "relu" and order == "bn_act":
            # Independent of the reference: relu's positive outputs.
            assert torch.equal(activity, fraction(out.double()))


# The CPU kernels' regimes (see test_forward_backward.BLOCK_SHAPES): planes of
# 2048+ values counted in the training pass itself, cut planes, short planes
# counted per group of channels in training (two threads, short last groups:
# 5x70x13x15, 40x45x6x7) and in memory order in eval (per-thread counts
# summed); channels split among two threads (per-part counts summed);
# channels-last wide rows with rows left over (columns' counts summed per
# channel: C = 24 and C = 10 on two threads).
LONG_SHAPES = [(2, 3, 48, 48), (2, 2, 1, 4200), (9, 2, 7, 9), (5, 70, 13, 15), (40, 45, 6, 7),
               (16, 3, 40, 40), (10, 1, 90, 80), (4, 24, 7, 9), (7, 10, 30, 31)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", LONG_SHAPES, ids=["x".join(map(str, s)) for s in LONG_SHAPES])
def test_activity_block_regimes(device, shape, dtype, layout):
    activation, kwargs = ACTIVATIONS[2]
    for training in (True, False):
        for order, with_residual in VARIANTS:
            seed("activity-blocks", shape, dtype, layout, training, order, with_residual)
            st = _params(shape[1], dtype, device)
            x = make_input(shape, dtype, layout, device=device)
            z = _residual_like(x) if with_residual else None
            x, z, pre = reference(x, st, training, order, z)
            activity = torch.zeros(shape[1], device=device)
            _call(x, st, training, activation, kwargs, residual=z, order=order,
                  activity=activity)
            assert torch.equal(activity, fraction(pre)), (order, with_residual, training)


def test_identity_act_bn_counts_the_input(device):
    seed("activity-identity-act-bn")
    x = make_input((2, 3, 4, 5), device=device)
    activity = torch.zeros(3, device=device)
    # Running mean 5: every normalized value is negative, half the inputs are not.
    fusedbn.batch_norm_act(x, torch.full((3,), 5.0, device=device), torch.ones(3, device=device),
                           training=False,
                           activation="identity", order="act_bn", activity=activity)
    assert torch.equal(activity, fraction(x.double()))


@pytest.mark.parametrize("activation,kwargs", [("leaky_relu", {"negative_slope": -0.5}),
                                               ("elu", {"alpha": -1.0})],
                         ids=["leaky_relu-negative_slope", "elu-negative_alpha"])
def test_act_bn_counts_positive_input_for_negative_slope(device, activation, kwargs):
    seed("activity-negative-slope", activation)
    x = off_kink(make_input((2, 3, 4, 5), device=device), MARGIN)
    activity = torch.zeros(3, device=device)
    fusedbn.batch_norm_act(x, None, None, training=True, activation=activation,
                           order="act_bn", activity=activity, **kwargs)
    assert torch.equal(activity, fraction(x.double()))


def test_activity_other_float_dtypes_and_strided_view(device):
    """Any floating activity tensor is written (rounded to its dtype); a
    non-contiguous view is written through."""
    seed("activity-dtypes")
    st = _params(3, torch.float32, device)
    x, _, pre = reference(make_input((2, 3, 4, 5), device=device), st, True, "bn_act")
    expected = fraction(pre)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        activity = torch.zeros(3, dtype=dtype, device=device)
        _call(x, st, True, "relu", {}, activity=activity)
        # Exact: a count over a count, rounded once to the tensor's dtype.
        torch.testing.assert_close(activity, expected.to(dtype), rtol=0, atol=0)
    big = torch.full((6,), -7.0, device=device)
    _call(x, st, True, "relu", {}, activity=big[::2])
    assert torch.equal(big[::2], expected)
    assert torch.equal(big[1::2], torch.full((3,), -7.0, device=device)), "wrote outside the view"


def test_activity_empty_batch_is_nan(device):
    """0 of 0 values: NaN (not 0, which would read as a dead channel)."""
    activity = torch.zeros(3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    out = fusedbn.batch_norm_act(torch.randn(0, 3, 2, 2, device=device), rm, rv, training=True,
                                 activity=activity)
    assert out.shape == (0, 3, 2, 2)
    assert torch.isnan(activity).all(), activity


def test_activity_state_empty_batch_keeps_average_and_streak(device):
    """As the running statistics: an empty batch leaves the average and the
    inactive streak alone (only row 0, the batch's fraction, is NaN)."""
    state = torch.tensor([[0.5, 0.0, 0.25], [0.4, 0.0, 0.3], [0.0, 3.0, 0.0]], device=device)
    before = state.clone()
    fusedbn.batch_norm_act(torch.randn(0, 3, 2, 2, device=device), None, None, training=True,
                           activity=state)
    assert torch.isnan(state[0]).all()
    assert torch.equal(state[1:], before[1:])


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contiguous"),
                                          (torch.float32, "channels_last"),
                                          (torch.float64, "strided"),
                                          (torch.bfloat16, "channels_last")],
                         ids=["float32", "float32-cl", "float64-strided", "bfloat16-cl"])
@pytest.mark.parametrize("order", ["bn_act", "act_bn"])
def test_activity_costs_nothing_in_results(device, order, dtype, layout):
    """Outputs, gradients and running statistics are bitwise the same with
    and without the activity argument."""
    C = 3
    for activation, kwargs in ACTIVATIONS:
        for training in (True, False):
            for with_residual in ((False, True) if order == "bn_act" else (False,)):
                seed("activity-free", order, dtype, layout, activation, training, with_residual)
                st = _params(C, dtype, device)
                x = make_input(SHAPES[4], dtype, layout, device=device)
                z = _residual_like(x) if with_residual else None
                g = torch.randn(x.shape, dtype=torch.float64).to(device=device, dtype=dtype)
                results = []
                for activity in (None, torch.zeros(C, device=device), _fresh_state(C, device)):
                    xi = clone_layout(x, requires_grad=True)
                    zi = None if z is None else z.clone().requires_grad_()
                    w, b = st.weight.clone().requires_grad_(), st.bias.clone().requires_grad_()
                    rm, rv = st.running_mean.clone(), st.running_var.clone()
                    nbt = torch.tensor(2, device=device)
                    out = fusedbn.batch_norm_act(xi, rm, rv, w, b, training, 0.1, 1e-5,
                                                 activation, **kwargs, residual=zi,
                                                 num_batches_tracked=nbt, order=order,
                                                 activity=activity)
                    out.backward(g)
                    results.append([out.detach(), xi.grad, w.grad, b.grad, rm, rv, nbt]
                                   + ([zi.grad] if zi is not None else []))
                for name, a, b, c in zip(("out", "grad_input", "grad_weight", "grad_bias",
                                       "running_mean", "running_var", "num_batches_tracked",
                                       "grad_residual"), *results):
                    assert torch.equal(a, b), f"{activation} training={training}: {name}"
                    assert torch.equal(a, c), f"{activation} training={training}: {name} ([3, C])"
                    assert a.stride() == b.stride() == c.stride(), name


@pytest.mark.parametrize("act", INVERTIBLE, ids=INVERTIBLE_IDS)
def test_activity_inplace_counts_before_overwriting(device, act):
    activation, kwargs = act
    for training in (True, False):
        for layout in ("contiguous", "channels_last"):
            for with_residual in (False, True):
                seed("activity-inplace", activation, training, layout, with_residual)
                st = _params(3, torch.float32, device)
                x = make_input(SHAPES[4], torch.float32, layout, device=device)
                z = _residual_like(x) if with_residual else None
                x, z, pre = reference(x, st, training, "bn_act", z)
                a_ref, a_inp = torch.zeros(3, device=device), torch.zeros(3, device=device)
                out = _call(x, st, training, activation, kwargs, residual=z, activity=a_ref)
                xi = x.clone()
                res = _call(xi, st, training, activation, kwargs, residual=z, inplace=True,
                            activity=a_inp)
                assert res.data_ptr() == xi.data_ptr() and torch.equal(xi, out)
                assert torch.equal(a_inp, a_ref) and torch.equal(a_ref, fraction(pre))


def test_activity_state_rows(device):
    """activity of shape [3, C]: row 0 the fraction, row 1 its running average
    (NaN: none yet, so the first fraction is taken as is), row 2 the number of
    calls in a row with no active value (reset by any active value)."""
    seed("activity-state")
    C = 3
    w = torch.ones(C, device=device)
    b = torch.tensor([-100.0, 0.0, 0.3], device=device)  # channel 0 is dead
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    state = _fresh_state(C, device)
    avg, streak = None, torch.zeros(C, device=device)
    for i, training in enumerate((True, True, False, True, False)):
        if i == 3:
            b[0] = 0.0  # revived
        st = Stats(rm, rv, w, b)
        x, _, pre = reference(make_input((2, C, 4, 5), device=device), st, training, "bn_act")
        frac = fraction(pre)
        fusedbn.batch_norm_act(x, rm, rv, w, b, training, activation="relu", activity=state,
                               activity_momentum=0.25)
        assert torch.equal(state[0], frac), (i, state[0], frac)
        avg = frac.clone() if avg is None else avg + 0.25 * (frac - avg)
        # Tighter than assert_close's rule: one float32 multiply-add per step.
        torch.testing.assert_close(state[1], avg, rtol=1e-6, atol=1e-7)
        streak = torch.where(frac == 0, streak + 1, 0.0)
        assert torch.equal(state[2], streak), (i, state[2], streak)
    assert streak.tolist() == [0, 0, 0] and frac[0] > 0


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_activity_momentum_bounds(device, momentum):
    seed("activity-momentum", momentum)
    st = _params(3, torch.float32, device)
    x, _, pre = reference(make_input((2, 3, 4, 5), device=device), st, True, "bn_act")
    state = torch.zeros(3, 3, device=device)
    state[1] = 0.5
    _call(x, st, True, "elu", {"alpha": 0.7}, activity=state, activity_momentum=momentum)
    expected = torch.full((3,), 0.5, device=device) if momentum == 0 else fraction(pre)
    assert torch.equal(state[1], expected)


def test_activity_state_dtypes_and_views(device):
    """A [3, C] state that is not contiguous float32 (computed on a float32
    copy, written back): the same values."""
    seed("activity-state-dtypes")
    st = _params(3, torch.float32, device)
    states = {"float32": _fresh_state(3, device), "float64": _fresh_state(3, device).double(),
              "transposed": _fresh_state(3, device).t().contiguous().t(),
              "bfloat16": _fresh_state(3, device).bfloat16()}
    assert not states["transposed"].is_contiguous()
    for i, training in enumerate((True, False, True)):
        x, _, pre = reference(make_input((2, 3, 4, 5), device=device), st, training, "bn_act")
        for name, state in states.items():
            if name == "bfloat16" and i > 0:
                continue  # the running average then rounds differently
            _call(x, st, training, "leaky_relu", {"negative_slope": 0.1}, activity=state,
                  activity_momentum=0.3)
        ref = states["float32"]
        assert torch.equal(ref[0], fraction(pre))
        assert torch.equal(states["float64"], ref.double())
        assert torch.equal(states["transposed"], ref)
        if i == 0:
            assert torch.equal(states["bfloat16"], ref.bfloat16())


def test_activity_is_counted_by_the_op_and_visible_to_autograd(device):
    """The activity tensor is mutated by the op (its version counter moves)."""
    activity = torch.zeros(3, device=device)
    v0 = activity._version
    x = (torch.randn(2, 3, 4) + 0.3).to(device).requires_grad_()
    fusedbn.batch_norm_act(x, torch.zeros(3, device=device), torch.ones(3, device=device),
                           training=True, activity=activity)
    assert activity._version > v0
    assert (activity > 0).all()


# -------------------------------------------------------------- modules

def _module_reference(mod, x, training):
    """The fraction the module must report for x, computed before its forward."""
    params = params_of(mod)
    if mod.order == "act_bn" and mod.activation != "identity":
        return fraction(x.double(), mod.activation, **params)
    return fraction(pre_activation64(mod, x, training), mod.activation, **params)


def _kink_free(mod, x, training):
    if mod.order == "act_bn" and mod.activation != "identity":
        return off_kink(x, MARGIN, activation=mod.activation, **params_of(mod))
    return avoid_kink(x, mod, training, margin=MARGIN)


MODULE_CASES = [(fusedbn.BatchNormAct1d, 2, "elu", {"alpha": 0.7}, "bn_act"),
                (fusedbn.BatchNormAct1d, 3, "leaky_relu", {"negative_slope": 0.1}, "act_bn"),
                (fusedbn.BatchNormAct2d, 4, "relu", {}, "bn_act"),
                (fusedbn.BatchNormAct2d, 4, "elu", {"alpha": 0.7}, "act_bn"),
                (fusedbn.BatchNormAct3d, 5, "identity", {}, "bn_act"),
                (fusedbn.BatchNormAct3d, 5, "relu", {}, "act_bn")]


@pytest.mark.parametrize("cls,rank,activation,kwargs,order", MODULE_CASES,
                         ids=[f"{c.__name__}-{a}-{o}" for c, _, a, _, o in MODULE_CASES])
def test_module_counters(device, cls, rank, activation, kwargs, order):
    """active_fraction per forward, in training and eval; the running average
    (the first batch taken as is); inactive_steps."""
    seed("activity-module", cls.__name__, activation, order)
    C = SHAPES[rank][1]
    mod = cls(C, activation=activation, order=order, track_activity=True,
              activity_momentum=0.3, **kwargs)
    with torch.no_grad():
        mod.weight.copy_(torch.rand(C) + 0.5)
        mod.bias.copy_(torch.randn(C) * 0.5)
    mod.to(device)
    layout = "channels_last" if rank >= 4 else "contiguous"
    avg, streak = None, torch.zeros(C, dtype=torch.long, device=device)
    for i, training in enumerate((True, True, False, True, False)):
        mod.train(training)
        x = _kink_free(mod, make_input(SHAPES[rank], torch.float32, layout, device=device),
                       training)
        frac = _module_reference(mod, x, training)
        mod(x)
        assert torch.equal(mod.active_fraction, frac), (i, mod.active_fraction, frac)
        avg = frac.clone() if avg is None else avg + 0.3 * (frac - avg)
        # Tighter than assert_close's rule: one float32 multiply-add per step.
        torch.testing.assert_close(mod.active_fraction_avg, avg, rtol=1e-6, atol=1e-7)
        streak = torch.where(frac == 0, streak + 1, 0)
        assert torch.equal(mod.inactive_steps, streak)
    assert mod.num_batches_tracked.item() == 3  # activity counts eval forwards, BN does not


def test_module_activity_mixed_precision_and_no_running_stats(device):
    """bf16 input into a float32 module; track_running_stats=False (batch
    statistics in eval too); a float64 module (its activity buffer stays float32)."""
    seed("activity-module-misc")
    mod = make_fused(4, 3, "leaky_relu", {"negative_slope": 0.1}, track_activity=True,
                     device=device)
    x = avoid_kink(make_input((2, 3, 4, 5), torch.bfloat16, "channels_last", device=device), mod,
                   True, margin=MARGIN)
    mod.train()
    frac = fraction(pre_activation64(mod, x, True))
    mod(x)
    assert mod.activity.dtype == torch.float32
    assert torch.equal(mod.active_fraction, frac)
    mod = fusedbn.BatchNormReLU2d(3, track_running_stats=False, track_activity=True)
    mod = mod.to(device).eval()
    x = avoid_kink(make_input((2, 3, 4, 5), device=device), mod, True, margin=MARGIN)
    mod(x)
    assert torch.equal(mod.active_fraction, fraction(pre_activation64(mod, x, True)))
    mod = make_fused(4, 3, "elu", {"alpha": 0.7}, dtype=torch.float64, track_activity=True,
                     device=device)
    assert mod.activity.dtype == torch.float32  # module.to(dtype) leaves the counters float32
    for _ in range(2):
        x = avoid_kink(make_input((2, 3, 4, 5), torch.float64, device=device), mod, True,
                       margin=MARGIN)
        frac = fraction(pre_activation64(mod, x, True))
        mod(x)
        assert torch.equal(mod.active_fraction, frac.float())


def test_module_inplace_counts_before_overwriting(device):
    seed("activity-module-inplace")
    mods = [make_fused(4, 3, "elu", {"alpha": 0.7}, track_activity=True, inplace=inplace,
                       device=device)
            for inplace in (False, True)]
    mods[1].load_state_dict(mods[0].state_dict())
    for training in (True, False):
        x = make_input((2, 3, 4, 5), torch.float32, "channels_last", device=device)
        outs = []
        for m in mods:
            m.train(training)
            outs.append(m(x.clone()))
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(mods[0].activity, mods[1].activity)


def test_dead_channel(device):
    seed("activity-dead")
    mod = dead_channel_module(device)
    for i, training in enumerate((True, True, True, False)):
        mod.train(training)
        mod(make_input((2, 3, 4, 5), device=device))
        assert mod.active_fraction[0].item() == 0.0
        assert (mod.active_fraction[1:] > 0).all(), mod.active_fraction
        assert mod.inactive_steps.tolist() == [i + 1, 0, 0]
    assert mod.active_fraction_avg[0].item() == 0.0
    assert diagnostics.report(mod, steps=4)[0].dead_channels == 1
    # Revived: the streak resets.
    with torch.no_grad():
        mod.bias[0] = 0.0
    mod.train()
    mod(make_input((2, 3, 4, 5), device=device))
    assert mod.active_fraction[0].item() > 0
    assert mod.inactive_steps.tolist() == [0, 0, 0]
    assert diagnostics.report(mod, steps=1)[0].dead_channels == 0


@pytest.mark.parametrize("dtype,start", [(torch.bfloat16, 256), (torch.float16, 2048)],
                         ids=["bfloat16", "float16"])
def test_inactive_streak_of_low_precision_module_keeps_counting(device, dtype, start):
    seed("activity-streak", dtype)
    mod = dead_channel_module(device).to(dtype)
    with torch.no_grad():
        mod.activity[2, 0] = start  # as after `start` dead forwards
    mod(make_input((2, 3, 4, 5), dtype, device=device))
    assert mod.inactive_steps[0].item() == start + 1


# ------------------------------------------------------------ diagnostics

def _model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), fusedbn.BatchNormReLU2d(4), nn.Conv2d(4, 3, 1),
        fusedbn.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.1, order="act_bn"),
        nn.BatchNorm2d(3))


def test_track_and_report(device):
    seed("diagnostics")
    model = _model().to(device)
    keys = model.state_dict().keys()
    assert diagnostics.track(model, activity_momentum=0.5) is model
    for m in (model[1], model[3]):
        assert m.track_activity and m.activity_momentum == 0.5
        assert m.activity.shape == (3, m.num_features) and m.activity.dtype == torch.float32
    assert getattr(model[4], "activity", None) is None  # plain nn.BatchNorm2d: untouched
    assert model.state_dict().keys() == keys
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[1].bias.zero_()
        model[1].bias[0] = -100.0
        model[2].bias.fill_(3.0)  # layer 3 (act_bn: counts its input > 0) all alive
    for _ in range(3):
        model(make_input((2, 3, 4, 5), device=device))

    rows = diagnostics.report(model, steps=3)
    assert isinstance(rows, list) and len(rows) == 2
    assert rows[0]._fields == ("layer", "activation", "order", "channels", "active_fraction",
                               "active_fraction_avg", "dead_channels")
    r0, r1 = rows
    assert (r0.layer, r0.activation, r0.order, r0.channels) == ("1", "relu", "bn_act", 4)
    assert (r1.layer, r1.activation, r1.order, r1.channels) == ("3", "leaky_relu", "act_bn", 3)
    assert r0.dead_channels == 1 and r1.dead_channels == 0
    for r, m in ((r0, model[1]), (r1, model[3])):
        assert r.active_fraction == pytest.approx(m.active_fraction.mean().item())
        assert r.active_fraction_avg == pytest.approx(m.active_fraction_avg.mean().item())
    assert r0.active_fraction <= 0.75  # a quarter of the channels is dead
    # `steps`: dead for at least that many forwards in a row.
    assert diagnostics.report(model, steps=1)[0].dead_channels == 1
    assert diagnostics.report(model, steps=4)[0].dead_channels == 0

    lines = str(rows).splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("| layer |") and "3 steps" in lines[0]
    assert lines[1] == "|" + "---|" * 7
    assert lines[2].startswith("| 1 | relu | bn_act | 4 |") and lines[2].endswith("| 1 |")
    assert lines[3].startswith("| 3 | leaky_relu | act_bn | 3 |") and lines[3].endswith("| 0 |")
    assert all(line.count("|") == 8 for line in lines)


@pytest.mark.parametrize("steps", [0, -1])
def test_report_bad_steps(steps):
    model = diagnostics.track(_model())
    with pytest.raises(ValueError, match="steps"):
        diagnostics.report(model, steps=steps)


def test_track_off_and_on_again(device):
    seed("diagnostics-off")
    model = diagnostics.track(_model().to(device))
    model(make_input((2, 3, 4, 5), device=device))
    diagnostics.track(model, enabled=False)
    assert not model[1].track_activity and diagnostics.report(model) == []
    before = model[1].activity.clone()
    model(make_input((2, 3, 4, 5), device=device) * 0 - 5)  # not counted
    assert torch.equal(model[1].activity, before)
    diagnostics.track(model)
    model(make_input((2, 3, 4, 5), device=device))
    assert not torch.equal(model[1].activity, before)
    assert [r.layer for r in diagnostics.report(model)] == ["1", "3"]


def test_report_of_a_bare_module_and_float64(device):
    seed("diagnostics-bare")
    mod = diagnostics.track(fusedbn.BatchNormAct2d(3).to(device).double())
    assert mod.activity.dtype == torch.float32
    x = avoid_kink(make_input((2, 3, 4, 5), torch.float64, device=device), mod, True,
                   margin=MARGIN)
    mod(x)
    (row,) = diagnostics.report(mod)
    assert row.layer == "" and row.channels == 3
    assert row.active_fraction == pytest.approx(
        fraction(pre_activation64(mod, x, True)).mean().item())
    assert "| (model) |" in str(diagnostics.report(mod))
    assert diagnostics.report(nn.Sequential(nn.BatchNorm2d(3))) == []
