"""fusedbn.SyncBatchNormAct: two gloo processes on loopback with uneven batches
against one process running eager nn.BatchNorm + activation over the
concatenated batch; DDP; convert_sync_batchnorm; the single-process fallback.

The two processes are spawned once for the module (a fixture), run every
scenario and torch.save their results; the tests compare them here. They
run on the CPU only (gloo, loopback); the single-process tests at the end
run on every device.
"""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import fusedbn
from fusedbn.distributed import SyncBatchNormAct
from fusedbn.modules import _BatchNormAct
from helpers import apply_activation, assert_close, seed

WORLD = 2

# Each scenario: per-rank batch sizes Ns (uneven, one with an empty rank),
# spatial dims, and the steps to run ("train" / "eval"), all on one module.
CASES = {
    "relu": dict(activation="relu", Ns=(3, 5), spatial=(4, 5), momentum=0.1,
                 steps=("train", "train", "eval")),
    "leaky_relu_residual_cumulative": dict(
        activation="leaky_relu", act_kw={"negative_slope": 0.1}, Ns=(3, 5), spatial=(4, 5),
        momentum=None, residual=True, steps=("train", "train")),
    "relu_residual_channels_last_f32": dict(
        activation="relu", Ns=(3, 5), spatial=(4, 5), residual=True, dtype=torch.float32,
        layout="channels_last", steps=("train", "train")),
    "elu_empty_rank_3d": dict(activation="elu", act_kw={"alpha": 0.7}, Ns=(0, 6), spatial=(5,),
                              steps=("train", "train")),
    "identity_2d_no_affine": dict(activation="identity", Ns=(2, 3), spatial=(), affine=False,
                                  steps=("train", "train")),
    "relu_6d": dict(activation="relu", Ns=(2, 3), spatial=(2, 2, 3, 2), steps=("train",)),
    "leaky_relu_params_only": dict(activation="leaky_relu", Ns=(4, 2), spatial=(3,),
                                   input_grad=False, steps=("train", "train")),
}
C = 3


def _cfg(name):
    cfg = dict(act_kw={}, momentum=0.1, residual=False, dtype=torch.float64,
               layout="contiguous", affine=True, input_grad=True)
    cfg.update(CASES[name])
    return cfg


def _init_module(mod, cfg):
    """Same affine parameters and running statistics in every process."""
    seed("init", cfg["activation"], cfg["Ns"])
    bn = getattr(mod, "bn", mod)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(C) + 0.5)
            bn.bias.copy_(torch.randn(C) * 0.5)
        bn.running_mean.copy_(torch.randn(C) * 0.5)
        bn.running_var.copy_(torch.rand(C) + 0.5)
    return mod


def _step_data(name, cfg, step):
    """The whole group's batch for one step: input, residual, grad_out."""
    seed("data", name, step)
    shape = (sum(cfg["Ns"]), C) + tuple(cfg["spatial"])
    view = [1, C] + [1] * len(cfg["spatial"])
    offset = torch.arange(C, dtype=torch.float64).view(view) - 1.0
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + offset
    res = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    cast = [t.to(cfg["dtype"]) for t in (x, res, g)]
    if cfg["layout"] == "channels_last":
        cast = [t.contiguous(memory_format=torch.channels_last) for t in cast]
    return cast


def _rows(cfg, rank):
    start = sum(cfg["Ns"][:rank])
    return slice(start, start + cfg["Ns"][rank])


def _leaf(t, requires_grad):
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(requires_grad)


def _run_steps(name, cfg, mod, rows):
    """Every step of the scenario on ``mod`` with the batch rows ``rows``;
    per step (out, grad_input, grad_residual, grad_weight, grad_bias), then
    the buffers."""
    results = []
    for i, mode in enumerate(cfg["steps"]):
        mod.train(mode == "train")
        mod.zero_grad(set_to_none=True)
        x, res, g = (t[rows] for t in _step_data(name, cfg, i))
        x = _leaf(x, cfg["input_grad"])
        res = _leaf(res, True) if cfg["residual"] else None
        out = mod(x, res) if res is not None else mod(x)
        out.backward(g)
        bn = getattr(mod, "bn", mod)
        w = bn.weight.grad if bn.weight is not None else None
        b = bn.bias.grad if bn.bias is not None else None
        results.append((out.detach(), x.grad, None if res is None else res.grad, w, b))
    buffers = {k: v.clone() for k, v in getattr(mod, "bn", mod).named_buffers()}
    return results, buffers


# ---------------------------------------------------------------- references
class _AnyRankBN(_BatchNorm):
    """Eager nn.BatchNorm (F.batch_norm) for input ranks nn.BatchNormNd refuses."""

    def _check_input_dim(self, input):
        pass


class _RefBNAct(nn.Module):
    """Eager nn.BatchNormNd, + residual, then the activation."""

    def __init__(self, cfg):
        super().__init__()
        ndim = 2 + len(cfg["spatial"])
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
               5: nn.BatchNorm3d}.get(ndim, _AnyRankBN)
        self.bn = cls(C, momentum=cfg["momentum"], affine=cfg["affine"], dtype=cfg["dtype"])
        self.cfg = cfg

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return apply_activation(y, self.cfg["activation"], **self.cfg["act_kw"])


def _sync_module(cfg):
    return _init_module(SyncBatchNormAct(
        C, momentum=cfg["momentum"], affine=cfg["affine"], activation=cfg["activation"],
        **cfg["act_kw"], dtype=cfg["dtype"]), cfg)


class _BNReLU2d(nn.BatchNorm2d):
    def forward(self, x):
        return F.relu(super().forward(x))


def _ddp_model(sync):
    """conv -> BN + ReLU -> conv, the same initial values in every process."""
    bn = SyncBatchNormAct(4, activation="relu") if sync else _BNReLU2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn, nn.Conv2d(4, 2, 1)).double()
    seed("ddp", "init")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


DDP_NS = (3, 5)


def _ddp_data():
    seed("ddp", "data")
    x = torch.randn(sum(DDP_NS), 3, 6, 6, dtype=torch.float64)
    return x, torch.randn(sum(DDP_NS), 2, 6, 6, dtype=torch.float64)


# ---------------------------------------------------------------- the workers
def _worker(rank, port, outdir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # A timeout, so that a collective one rank never joins fails the test
    # instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        for name in CASES:
            cfg = _cfg(name)
            out[name] = _run_steps(name, cfg, _sync_module(cfg), _rows(cfg, rank))

        model = DistributedDataParallel(_ddp_model(sync=True))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, g = _ddp_data()
        rows = slice(sum(DDP_NS[:rank]), sum(DDP_NS[:rank + 1]))
        (model(x[rows]) * g[rows]).sum().backward()
        opt.step()
        out["ddp"] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        out["unsupported"] = _unsupported_options_in_sync(rank)
        out["activity"] = _synchronized_activity(rank)
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# Options of BatchNormAct* that the synchronized forward does not implement.
UNSUPPORTED = {"act_bn": dict(order="act_bn"), "inplace": dict(activation="elu", inplace=True)}

# Activity in the synchronized forward: each rank's fraction of values whose
# pre-activation, with the group's statistics, is positive.
ACTIVITY_NS = (5, 3)


def _activity_data():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(sum(ACTIVITY_NS), C, 4, dtype=torch.float64, generator=gen) * 2 + 0.3


def _synchronized_activity(rank):
    mod = SyncBatchNormAct(C, activation="relu", track_activity=True).double().train()
    rows = slice(sum(ACTIVITY_NS[:rank]), sum(ACTIVITY_NS[:rank + 1]))
    mod(_activity_data()[rows])
    return mod.activity.clone()


def _same(a, b):
    """Equal values, NaN where the other has NaN (the activity buffer's
    average starts as NaN)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _unsupported_options_in_sync(rank):
    """Per option: (exception type name, message) of a synchronized training
    forward, and whether its buffers stayed as they were."""
    results = {}
    for name, options in UNSUPPORTED.items():
        try:
            mod = SyncBatchNormAct(C, **options).double().train()
            before = {k: v.clone() for k, v in mod.named_buffers()}
            mod(torch.randn(2 + rank, C, 3, dtype=torch.float64) * 1)
            results[name] = ("no error", "", True)
        except Exception as e:  # noqa: BLE001  (compared in the test)
            unchanged = "mod" in locals() and all(
                _same(v, before[k]) for k, v in mod.named_buffers())
            results[name] = (type(e).__name__, str(e), unchanged)
    return results


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of both ranks, [rank0, rank1]."""
    outdir = str(tmp_path_factory.mktemp("sync"))
    ctx = mp.start_processes(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):  # raises with the child's traceback if one failed
            if time.monotonic() > deadline:
                raise TimeoutError("the distributed workers did not finish in 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]


def _close(actual, expected, name):
    assert_close(actual, expected, name=name)  # the suite's rule (float32/float64 here)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_batchnorm(ranks, name):
    cfg = _cfg(name)
    ref = _init_module(_RefBNAct(cfg), cfg)
    expected, expected_buffers = _run_steps(name, cfg, ref, slice(None))
    for i, mode in enumerate(cfg["steps"]):
        out_e, gx_e, gres_e, gw_e, gb_e = expected[i]
        per_rank = [r[name][0][i] for r in ranks]
        where = f"{name} step {i} ({mode})"
        # Per-sample results: each rank holds its rows of the whole batch.
        for k, what, exp in ((0, "out", out_e), (1, "grad_input", gx_e),
                             (2, "grad_residual", gres_e)):
            if exp is None:
                assert all(p[k] is None for p in per_rank), f"{where}: {what} should be None"
                continue
            _close(torch.cat([p[k] for p in per_rank]), exp, f"{where}: {what}")
        if cfg["layout"] == "channels_last":
            for p in per_rank:
                if p[0].numel():
                    assert p[0].is_contiguous(memory_format=torch.channels_last)
        # nn.SyncBatchNorm's contract: each rank's weight/bias gradient is its
        # local sum (DDP reduces them), so the ranks' sum is the whole batch's.
        for k, what, exp in ((3, "grad_weight", gw_e), (4, "grad_bias", gb_e)):
            if exp is None:
                assert all(p[k] is None for p in per_rank), f"{where}: {what} should be None"
                continue
            _close(sum(p[k] for p in per_rank), exp, f"{where}: {what} (sum over ranks)")
    for r in range(WORLD):
        bufs = ranks[r][name][1]
        assert bufs.keys() == expected_buffers.keys()
        for k, exp in expected_buffers.items():
            if k == "num_batches_tracked":
                assert torch.equal(bufs[k], exp), f"{name} rank {r}: {k} {bufs[k]} vs {exp}"
            else:
                _close(bufs[k], exp, f"{name} rank {r}: {k}")


def test_weight_grads_are_local_sums(ranks):
    # The per-rank split itself, not only its sum: rank r's gradient is the
    # sum over its own rows of dL/dy * act' * xhat (global statistics).
    name = "relu"
    cfg = _cfg(name)
    ref = _init_module(_RefBNAct(cfg), cfg)
    ref.train()
    x, _, g = _step_data(name, cfg, 0)
    xl = _leaf(x, True)
    out = ref(xl)
    xhat = (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False,
                                                          keepdim=True) + ref.bn.eps).sqrt()
    dy = torch.where(out > 0, g, torch.zeros_like(g))
    for r in range(WORLD):
        rows = _rows(cfg, r)
        _close(ranks[r][name][0][0][3], (dy * xhat)[rows].sum((0, 2, 3)), f"rank {r} grad_weight")
        _close(ranks[r][name][0][0][4], dy[rows].sum((0, 2, 3)), f"rank {r} grad_bias")


def test_ddp_step(ranks):
    """DDP around conv -> SyncBatchNormAct -> conv, one SGD step: both ranks
    end identical, and equal to one process stepping on the whole batch with
    the loss divided by the world size (DDP averages gradients)."""
    first, second = ranks[0]["ddp"], ranks[1]["ddp"]
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), f"{k} differs between the ranks"
    ref = _ddp_model(sync=False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, g = _ddp_data()
    ((ref(x) * g).sum() / WORLD).backward()
    opt.step()
    expected = ref.state_dict()
    assert expected.keys() == first.keys()
    start = _ddp_model(sync=False).state_dict()
    for k, v in expected.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(first[k], v)
            continue
        assert not torch.equal(v, start[k]), f"{k} did not change"
        _close(first[k], v, f"ddp {k}")


# ----------------------------------------------------- no processes needed
@pytest.mark.parametrize("activation,kw", [("relu", {}), ("leaky_relu", {"negative_slope": 0.2}),
                                           ("elu", {"alpha": 0.7})])
def test_without_process_group_equals_batchnormact(device, activation, kw):
    import torch.distributed as dist
    assert not (dist.is_available() and dist.is_initialized())
    seed("single", activation)
    plain = fusedbn.BatchNormAct2d(C, activation=activation, momentum=None, **kw)
    sync = SyncBatchNormAct(C, activation=activation, momentum=None, **kw)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(C) + 0.5)
        plain.bias.copy_(torch.randn(C))
    plain.to(device), sync.to(device)
    sync.load_state_dict(plain.state_dict())
    assert sync.state_dict().keys() == nn.SyncBatchNorm(C).state_dict().keys()
    for mode in ("train", "train", "eval"):
        x = (torch.randn(4, C, 3, 5, dtype=torch.float32) + 0.3).to(device)
        res = torch.randn_like(x)
        g = torch.randn_like(x)
        outs = []
        for mod in (plain, sync):
            mod.train(mode == "train")
            mod.zero_grad(set_to_none=True)
            xl, rl = _leaf(x, True), _leaf(res, True)
            out = mod(xl, rl)
            out.backward(g)
            outs.append((out, xl.grad, rl.grad, mod.weight.grad, mod.bias.grad))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        for (k, a), (_, b) in zip(plain.named_buffers(), sync.named_buffers()):
            assert torch.equal(a, b), k


def test_any_rank_and_errors(device):
    import torch.distributed as dist
    assert not (dist.is_available() and dist.is_initialized())
    mod = SyncBatchNormAct(C, activation="leaky_relu", negative_slope=0.1).to(device)
    ref = _AnyRankBN(C).to(device)
    x = (torch.randn(2, C, 2, 1, 3, 2) + 1.0).to(device)
    expected = F.leaky_relu(ref(x), 0.1)
    torch.testing.assert_close(mod(x), expected)
    torch.testing.assert_close(mod.running_var, ref.running_var)
    with pytest.raises(ValueError, match="at least 2D"):
        mod(torch.randn(C, device=device))
    with pytest.raises(ValueError, match="non-zero"):
        SyncBatchNormAct(0).to(device)(torch.randn(2, 0, device=device))
    with pytest.raises(ValueError, match="residual"):
        mod(torch.randn(2, C, 4, device=device), torch.randn(2, C, 5, device=device))
    with pytest.raises(ValueError, match="unknown activation"):
        SyncBatchNormAct(C, activation="swish")
    assert "activation=leaky_relu, negative_slope=0.1" in repr(mod)


def test_convert_sync_batchnorm():
    inner = fusedbn.BatchNormReLU1d(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        fusedbn.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2, momentum=None),
        nn.BatchNorm2d(4),
        nn.Sequential(nn.Flatten(), nn.Linear(4, 5), inner),
        fusedbn.BatchNormAct3d(2, affine=False, activation="elu", alpha=0.5,
                               track_running_stats=False),
    )
    model.eval()
    model[3].train()
    model[1].qconfig = "q"
    old = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    old_mods = [model[1], inner, model[4]]
    converted = SyncBatchNormAct.convert_sync_batchnorm(model, process_group="pg")
    assert converted is model
    new_mods = [model[1], model[3][2], model[4]]
    for o, n in zip(old_mods, new_mods):
        assert type(n) is SyncBatchNormAct
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                     "activation", "negative_slope", "alpha", "training"):
            assert getattr(n, attr) == getattr(o, attr), attr
        assert n.process_group == "pg"
    assert model[1].qconfig == "q"
    assert type(model[2]) is nn.BatchNorm2d  # plain BatchNorm: not fusedbn's to convert
    assert model[4].weight is None and model[4].running_mean is None
    new = model.state_dict(keep_vars=True)
    assert new.keys() == old.keys()
    for k in old:
        assert new[k] is old[k], f"{k} is not shared"
    # A BatchNormAct given directly comes back as a new module.
    single = fusedbn.BatchNormAct2d(4, activation="relu")
    conv = SyncBatchNormAct.convert_sync_batchnorm(single)
    assert type(conv) is SyncBatchNormAct and conv.weight is single.weight
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(conv(x), fusedbn.BatchNormAct2d(4)(x))


def test_synchronized_activity_counts_with_the_group_statistics(ranks):
    """track_activity=True in a synchronized training forward: each rank's
    fraction of its own values whose pre-activation, normalized with the
    group's batch statistics, is positive; the first average equals it."""
    x = _activity_data()
    pre = F.batch_norm(x, None, None, training=True, eps=1e-5)
    for r in range(WORLD):
        rows = slice(sum(ACTIVITY_NS[:r]), sum(ACTIVITY_NS[:r + 1]))
        frac = (pre[rows] > 0).double().mean((0, 2)).float()
        got = ranks[r]["activity"]
        assert torch.equal(got[0], frac), (r, got[0], frac)
        assert torch.equal(got[1], frac) and torch.equal(got[2], torch.where(frac == 0, 1.0, 0.0))


def test_unsupported_options_raise_in_the_synchronized_forward(ranks):
    """order="act_bn" and inplace=True are accepted (and work outside the
    synchronized path), but a synchronized training forward refuses them by
    name on every rank, before any buffer changes."""
    for r in range(WORLD):
        for name, (exc, msg, unchanged) in ranks[r]["unsupported"].items():
            assert exc == "ValueError", f"rank {r} {name}: {exc}: {msg}"
            option = next(iter(UNSUPPORTED[name].items())) if name != "inplace" else \
                ("inplace", True)
            assert f"{option[0]}={option[1]!r}" in msg, msg
            assert "synchronized" in msg, msg
            assert unchanged, f"rank {r} {name}: buffers changed by the refused call"


# ------------------------------------------- one of the fused modules' family
def test_is_a_fused_module_with_their_options():
    mod = SyncBatchNormAct(4, activation="leaky_relu", negative_slope=0.2, bias_init=0.01,
                           track_activity=True, activity_momentum=0.3, order="act_bn")
    assert isinstance(mod, _BatchNormAct)
    assert (mod.order, mod.track_activity, mod.activity_momentum, mod.bias_init) == (
        "act_bn", True, 0.3, 0.01)
    assert torch.equal(mod.bias.detach(), torch.full((4,), 0.01))
    with torch.no_grad():
        mod.bias.zero_()
    mod.reset_parameters()
    assert torch.equal(mod.bias.detach(), torch.full((4,), 0.01))
    assert mod.activity.shape == (3, 4) and mod.activity.dtype == torch.float32
    r = repr(mod)
    for part in ("activation=leaky_relu, negative_slope=0.2", "order=act_bn", "bias_init=0.01",
                 "track_activity=True"):
        assert part in r, r
    # The fused modules' checks, with their messages.
    with pytest.raises(ValueError, match="unknown order"):
        SyncBatchNormAct(4, order="bn")
    with pytest.raises(ValueError, match="invertible"):
        SyncBatchNormAct(4, inplace=True)
    with pytest.raises(ValueError, match="activity_momentum"):
        SyncBatchNormAct(4, activity_momentum=2.0)
    with pytest.raises(TypeError, match="negative_slope"):
        SyncBatchNormAct(4, negative_slope="0.1")


def test_state_dict_compatible_with_sync_batchnorm_and_the_fused_modules():
    """The activity buffer stays out of the state_dict: the keys are
    nn.SyncBatchNorm's, and state_dicts load strictly both ways with it and
    with BatchNormAct2d."""
    seed("sync-state-dict")
    mod = SyncBatchNormAct(3, track_activity=True, bias_init=0.1)
    mod(torch.randn(4, 3, 2, 2))  # no group: counts, as BatchNormAct2d
    keys = nn.SyncBatchNorm(3).state_dict().keys()
    assert mod.state_dict().keys() == keys
    for other in (nn.SyncBatchNorm(3), fusedbn.BatchNormAct2d(3, track_activity=True)):
        other.load_state_dict(mod.state_dict(), strict=True)
        for k, v in mod.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k
        fresh = SyncBatchNormAct(3, track_activity=True)
        fresh.load_state_dict(other.state_dict(), strict=True)
        assert fresh.state_dict().keys() == keys


@pytest.mark.parametrize("options", [dict(order="act_bn", activation="elu", alpha=0.7),
                                     dict(track_activity=True, activation="leaky_relu"),
                                     dict(inplace=True, activation="leaky_relu")],
                         ids=["act_bn", "track_activity", "inplace"])
def test_options_without_process_group_equal_batchnormact(device, options):
    """Outside the synchronized path the options work exactly as in
    BatchNormAct2d: outputs, gradients, buffers (the activity one too)."""
    seed("sync-options", sorted(options))
    plain = fusedbn.BatchNormAct2d(C, **options).to(device)
    sync = SyncBatchNormAct(C, **options).to(device)
    with torch.no_grad():
        plain.weight.copy_((torch.rand(C) + 0.5).to(device))
        plain.bias.copy_(torch.randn(C).to(device))
    sync.load_state_dict(plain.state_dict())
    for mode in ("train", "eval"):
        x = (torch.randn(4, C, 3, 5) + 0.3).to(device)
        g = torch.randn_like(x)
        outs = []
        for mod in (plain, sync):
            mod.train(mode == "train")
            mod.zero_grad(set_to_none=True)
            leaf = _leaf(x, True)
            out = mod(leaf * 1 if options.get("inplace") else leaf)
            out.backward(g)
            outs.append((out, leaf.grad, mod.weight.grad, mod.bias.grad))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        assert dict(plain.named_buffers()).keys() == dict(sync.named_buffers()).keys()
        for (k, a), (_, b) in zip(plain.named_buffers(), sync.named_buffers()):
            assert _same(a, b), k


def test_diagnostics_and_unconvert_see_it():
    seed("sync-diagnostics")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SyncBatchNormAct(4), nn.BatchNorm2d(4))
    assert fusedbn.diagnostics.track(model) is model
    assert model[1].track_activity and model[1].activity.shape == (3, 4)
    model(torch.randn(2, 3, 4, 4))  # no process group: counted as BatchNormAct2d counts
    (row,) = fusedbn.diagnostics.report(model)
    assert (row.layer, row.activation, row.order, row.channels) == ("1", "relu", "bn_act", 4)
    assert row.active_fraction == pytest.approx(model[1].active_fraction.mean().item())
    # fusedbn.convert leaves it as it is; unconvert names it among the fused
    # modules it did not create.
    converted = fusedbn.convert(model, inplace=False)
    assert type(converted[1]) is SyncBatchNormAct
    with pytest.warns(UserWarning, match=r"did not create.*\b1\b"):
        fusedbn.unconvert(model)
    assert type(model[1]) is SyncBatchNormAct


def test_convert_sync_batchnorm_carries_the_options():
    """order, bias_init, activity tracking (the same activity tensor) move
    along; a SyncBatchNormAct already there is left alone."""
    act_bn = fusedbn.BatchNormAct2d(4, activation="elu", order="act_bn", bias_init=0.2)
    tracked = diagnostics_track(fusedbn.BatchNormReLU2d(4), activity_momentum=0.4)
    already = SyncBatchNormAct(4, process_group="old")
    model = nn.Sequential(act_bn, tracked, already)
    SyncBatchNormAct.convert_sync_batchnorm(model, process_group="pg")
    assert type(model[0]) is SyncBatchNormAct and model[0].order == "act_bn"
    assert model[0].bias_init == 0.2 and model[0].bias is act_bn.bias
    assert model[1].track_activity and model[1].activity_momentum == 0.4
    assert model[1].activity is tracked.activity
    assert model[2] is already and already.process_group == "old"


def diagnostics_track(mod, **kw):
    return fusedbn.diagnostics.track(mod, **kw)
