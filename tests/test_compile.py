"""torch.compile(fullgraph=True) of small nets of fused modules (both orders,
in place, counting activity): no graph break, forward/backward, running
statistics and activity counters as eager."""
import copy

import pytest
import torch
import torch.nn as nn

import fusedbn
from helpers import (CompileNet, EagerCompileNet, assert_close, dead_channel_module, run_step,
                     seed)


# Compiled vs eager through convolutions: the graph may reorder the
# convolutions' float32 sums, so looser than helpers.assert_close's rule for
# one op against eager; the buffers see no convolution gradient, hence tighter.
COMPILED_TOL = dict(rtol=1e-4, atol=1e-5)
BUFFER_TOL = dict(rtol=1e-5, atol=1e-6)


def _check(a, b, what):
    out_a, gx_a, grads_a = a
    out_b, gx_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, **COMPILED_TOL, msg=f"{what}: output")
    torch.testing.assert_close(gx_a, gx_b, **COMPILED_TOL, msg=f"{what}: grad_input")
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], **COMPILED_TOL,
                                   msg=lambda m, n=n: f"{what}: grad of {n}: {m}")


def _check_buffers(a, b, what):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **BUFFER_TOL,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")


# (activation, kwargs, channels_last, module options, backend)
COMPILE_CASES = [("relu", {}, False, {}, "inductor"),
                 ("elu", {"alpha": 0.7}, True, {}, "inductor"),
                 ("elu", {"alpha": 0.7}, True, {"order": "act_bn"}, "aot_eager")]


@pytest.mark.parametrize("activation,kwargs,channels_last,options,backend", COMPILE_CASES,
                         ids=["relu-contiguous", "elu-channels_last", "elu-channels_last-act_bn"])
def test_compile_fullgraph_matches_eager(device, activation, kwargs, channels_last, options,
                                         backend):
    torch._dynamo.reset()
    seed("compile", activation, channels_last, *options.values())
    net = CompileNet(activation, **kwargs, **options).to(device)
    eager_fused = copy.deepcopy(net)
    eager_nn = EagerCompileNet(net)
    compiled = torch.compile(copy.deepcopy(net), fullgraph=True, backend=backend)
    x = (torch.randn(2, 3, 8, 8) + 0.5).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        for step, training in enumerate((True, True, False)):
            for m in (compiled, eager_fused, eager_nn):
                m.train(training)
            g = torch.randn(2, 2, 8, 8).to(device)
            res_c = run_step(compiled, x + step, g)
            res_f = run_step(eager_fused, x + step, g)
            res_n = run_step(eager_nn, x + step, g)
            _check(res_c, res_f, f"step {step}: compiled vs eager fusedbn")
            _check(res_c, res_n, f"step {step}: compiled vs eager nn.BatchNorm2d")
            _check_buffers(compiled.bn, eager_fused.bn, f"step {step}: compiled vs eager fusedbn")
            _check_buffers(compiled.bn, eager_nn.bn, f"step {step}: compiled vs nn.BatchNorm2d")
        assert compiled.bn.num_batches_tracked.item() == 2
    finally:
        torch._dynamo.reset()


class ActivityNet(nn.Module):
    """conv -> BatchNormReLU2d with a dead channel -> conv -> BatchNormAct2d
    (elu, order="act_bn"), both counting activity."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = dead_channel_module(activity_momentum=0.25)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn2 = fusedbn.BatchNormAct2d(4, activation="elu", alpha=0.7, order="act_bn",
                                          track_activity=True)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


def test_compile_fullgraph_activity_matches_eager(device):
    torch._dynamo.reset()
    seed("activity-compile")
    net = ActivityNet().to(device)
    eager = copy.deepcopy(net)
    compiled = torch.compile(copy.deepcopy(net), fullgraph=True, backend="aot_eager")
    x = (torch.randn(2, 3, 6, 6) + 0.3).to(device)
    try:
        for i, training in enumerate((True, True, False)):
            for m in (compiled, eager):
                m.train(training)
            g = torch.randn(2, 4, 6, 6).to(device)
            outs = []
            for m in (compiled, eager):
                xi = (x + 0.1 * i).requires_grad_()
                out = m(xi)
                out.backward(g)
                outs.append((out.detach(), xi.grad))
            torch.testing.assert_close(outs[0], outs[1], **COMPILED_TOL)
            for layer in ("bn1", "bn2"):
                for name in ("activity", "running_mean", "running_var", "num_batches_tracked"):
                    a, e = (getattr(getattr(m, layer), name) for m in (compiled, eager))
                    # Tighter than COMPILED_TOL: the counters are fractions of
                    # at most 72 values, and their average, with no reordering.
                    torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7,
                                               msg=lambda s: f"step {i} {layer}.{name}: {s}")
            assert compiled.bn1.inactive_steps[0].item() == i + 1
            assert not torch.isnan(compiled.bn2.active_fraction_avg).any()
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("net", ["leaky_relu", "activity"])
def test_dynamo_explain_no_graph_break(device, net):
    torch._dynamo.reset()
    seed("explain")
    model = (CompileNet("leaky_relu", negative_slope=0.1) if net == "leaky_relu"
             else ActivityNet()).to(device).train()
    x = torch.randn(2, 3, 8, 8).to(device)
    try:
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        # The fused op is in the graph, not run outside it.
        ops = [str(n.target) for gm in explanation.graphs for n in gm.graph.nodes
               if n.op == "call_function"]
        assert any("fusedbn" in o for o in ops), ops
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("activation,kwargs", [("leaky_relu", {"negative_slope": 0.1}),
                                               ("elu", {"alpha": 0.7})])
def test_compile_fullgraph_inplace(device, activation, kwargs):
    """inplace=True under torch.compile(fullgraph=True): no data-dependent
    guard, the same outputs, gradients and buffers as eager in-place, one
    weight exactly 0 and one tiny (the channels whose input is kept)."""
    torch._dynamo.reset()
    seed("compile-inplace", activation)
    net = CompileNet(activation, inplace=True, **kwargs).to(device)
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor([1.0, 0.0, 1e-7, 0.5]))
        net.bn.bias.copy_(torch.tensor([0.1, 0.2, 1.0, -0.3]))
    eager = copy.deepcopy(net)
    compiled = torch.compile(copy.deepcopy(net), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8).to(device)
    try:
        for step in range(2):
            g = torch.randn(2, 2, 8, 8).to(device)
            _check(run_step(compiled, x + step, g), run_step(eager, x + step, g),
                   f"step {step}: compiled vs eager in place")
            _check_buffers(compiled.bn, eager.bn, f"step {step}")
    finally:
        torch._dynamo.reset()


def test_compile_inplace_module_with_activity(device):
    # (Was a strict xfail: the autograd of forward_ read weight.eq(0).any().item().)
    torch._dynamo.reset()
    seed("activity-compile-inplace")
    mod = fusedbn.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.1, inplace=True,
                                 track_activity=True).to(device)
    eager = copy.deepcopy(mod)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 4, 4).to(device)
    try:
        assert_close(compiled(x.clone()), eager(x.clone()), name="out")
        assert torch.equal(mod.activity, eager.activity)
    finally:
        torch._dynamo.reset()
