"""What ``fusedbn.bench`` times: the contenders, and the modes a case runs.

Contenders:

* ``fusedbn``:     ``fusedbn.BatchNormAct2d``;
* ``fusedbn+activity``: the same with ``track_activity=True`` (dead-unit
  counting in the kernel; ``--no-activity`` drops it); the table's
  ``activity cost`` column is its time over plain fusedbn's;
* ``eager``:       ``nn.BatchNorm2d`` + ``nn.ReLU(inplace=True)`` /
  ``nn.LeakyReLU(inplace=True)``, as torchvision builds it;
* ``compile``:     ``torch.compile`` of that eager module (``--no-compile``
  drops it; off by default with ``--quick``; skipped with a note if
  compilation fails);
* ``inplace_abn``: ``inplace_abn.InPlaceABN`` when importable (it
  overwrites its input, so its timed call includes an input clone).

Modes: ``forward-train`` (training-mode forward with autograd recording,
as in a training step; the graph is dropped), ``forward+backward``
(that forward, then ``torch.autograd.grad`` for input, weight and bias with
a dense upstream gradient), ``eval`` (inference-mode forward under
``torch.no_grad``), and, only on request, ``backward`` (the backward alone,
``retain_graph=True`` on a recorded forward).
"""
import itertools
import math

import torch
import torch.nn as nn

import fusedbn

from .. import _reference
from .common import ALPHA, NEGATIVE_SLOPE, make_grad, make_input
from .machine import cache_bytes


def eager_module(C, activation, inplace=True):
    act = _reference.activation_module(activation, inplace=inplace, negative_slope=NEGATIVE_SLOPE,
                                       alpha=ALPHA)
    return nn.Sequential(nn.BatchNorm2d(C), act)


def fused_module(C, activation, track_activity=False):
    return fusedbn.BatchNormAct2d(C, activation=activation, negative_slope=NEGATIVE_SLOPE,
                                  alpha=ALPHA, track_activity=track_activity)


def reference_state(C, dtype, device, seed):
    """BatchNorm parameters and buffers every contender starts a check from."""
    g = torch.Generator().manual_seed(seed)
    st = {
        "weight": torch.rand(C, generator=g) + 0.5,
        "bias": torch.randn(C, generator=g) * 0.2,
        "running_mean": torch.randn(C, generator=g) * 0.5,
        "running_var": torch.rand(C, generator=g) + 0.5,
    }
    st = {k: v.to(device=device, dtype=dtype) for k, v in st.items()}
    st["num_batches_tracked"] = torch.tensor(3, device=device)
    return st


def load_state(bn, state):
    with torch.no_grad():
        for name, value in state.items():
            t = getattr(bn, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_(value)



class Contender:
    """A module under test, the BatchNorm holding its parameters/buffers, and
    how its input is prepared (inplace_abn clones it)."""

    def __init__(self, name, module, bn, clone_input=False):
        self.name = name
        self.module = module
        self.bn = bn
        self.clone_input = clone_input

    def params(self):
        return (self.bn.weight, self.bn.bias)

    def __call__(self, x):
        return self.module(x.clone() if self.clone_input else x)


def run_case_once(c, mode, x, g):
    """What a mode produces, for the pre-timing check against eager."""
    if mode == "eval":
        with torch.no_grad():
            return {"output": c(x)}
    out = c(x)
    if mode == "forward-train":
        return {"output": out.detach()}
    gx, gw, gb = torch.autograd.grad(out, (x,) + c.params(), g)
    return {"output": out.detach(), "grad_input": gx, "grad_weight": gw, "grad_bias": gb}


def make_timed_fn(c, mode, pool):
    """A no-argument callable doing one call of ``mode``, rotating through the pool."""
    params = c.params()
    if mode == "forward-train":
        xs = itertools.cycle([x for x, _ in pool])

        def fn():
            c(next(xs))
    elif mode == "forward+backward":
        it = itertools.cycle(pool)

        def fn():
            x, g = next(it)
            torch.autograd.grad(c(x), (x,) + params, g)
    elif mode == "eval":
        xs = itertools.cycle([x for x, _ in pool])

        def fn():
            with torch.no_grad():
                c(next(xs))
    elif mode == "backward":
        it = itertools.cycle([(c(x), x, g) for x, g in pool])

        def fn():
            out, x, g = next(it)
            torch.autograd.grad(out, (x,) + params, g, retain_graph=True)
    else:
        raise ValueError(mode)
    return fn



def inplace_abn_module():
    try:
        import inplace_abn  # noqa: F401
        return inplace_abn
    except Exception:  # noqa: BLE001
        return None


def build_contenders(C, dtype, device, activation, use_compile, fused_ok, notes,
                     activity=False):
    cs = {}
    if fused_ok:
        m = fused_module(C, activation).to(device=device, dtype=dtype)
        cs["fusedbn"] = Contender("fusedbn", m, m)
        if activity:
            try:
                m = fused_module(C, activation, track_activity=True).to(device=device, dtype=dtype)
                cs["fusedbn+activity"] = Contender("fusedbn+activity", m, m)
            except Exception as exc:  # noqa: BLE001  (e.g. not implemented on CUDA yet)
                notes.add(f"fusedbn+activity unavailable on {device}: "
                          f"{type(exc).__name__}: {exc}")
    e = eager_module(C, activation).to(device=device, dtype=dtype)
    cs["eager"] = Contender("eager", e, e[0])
    if use_compile:
        ec = eager_module(C, activation).to(device=device, dtype=dtype)
        try:
            cs["compile"] = Contender("compile", torch.compile(ec, dynamic=False), ec[0])
        except Exception as exc:  # noqa: BLE001
            notes.add(f"torch.compile unavailable: {type(exc).__name__}: {exc}")
    iabn = inplace_abn_module()
    if iabn is not None:
        try:
            m = iabn.InPlaceABN(C, activation=activation,
                                activation_param=ALPHA if activation == "elu" else NEGATIVE_SLOPE)
            m = m.to(device=device, dtype=dtype)
            cs["inplace_abn"] = Contender("inplace_abn", m, m, clone_input=True)
        except Exception as exc:  # noqa: BLE001
            notes.add(f"inplace_abn: no InPlaceABN for {activation} on {device} "
                      f"({type(exc).__name__}: {exc})")
    return cs


def pool_for(shape, dtype, device, layout, mode_needs_grad, seed):
    """(x, g) pairs; the inputs x of the pool add up to >= 2x the cache."""
    numel = math.prod(shape)
    esize = torch.empty((), dtype=dtype).element_size()
    k = max(1, min(64, math.ceil(2 * cache_bytes(device) / (numel * esize))))
    return [(make_input(shape, dtype, device, layout, seed + i, requires_grad=mode_needs_grad),
             make_grad(shape, dtype, device, layout, seed + 1000 + i)) for i in range(k)]


def set_mode(cs, mode, state):
    for c in cs.values():
        load_state(c.bn, state)
        c.module.train(mode != "eval")

