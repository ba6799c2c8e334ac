"""torch.compile(fullgraph=True) of a small conv -> BatchNormAct2d -> conv net:
no graph break, forward/backward and running statistics as eager."""
import copy

import pytest
import torch

from helpers import CompileNet, EagerCompileNet, run_step, seed


def _check(a, b, what):
    out_a, gx_a, grads_a = a
    out_b, gx_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5, msg=f"{what}: output")
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-4, atol=1e-5, msg=f"{what}: grad_input")
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=n: f"{what}: grad of {n}: {m}")


def _check_buffers(a, b, what):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")


@pytest.mark.parametrize("act,channels_last", [(("relu", {}), False),
                                               (("elu", {"alpha": 0.7}), True)],
                         ids=["relu-contiguous", "elu-channels_last"])
def test_compile_fullgraph_matches_eager(device, act, channels_last):
    activation, kwargs = act
    torch._dynamo.reset()
    seed("compile", activation, channels_last)
    net = CompileNet(activation, **kwargs).to(device)
    eager_fused = copy.deepcopy(net)
    eager_nn = EagerCompileNet(net)
    compiled = torch.compile(copy.deepcopy(net), fullgraph=True, backend="inductor")
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


def test_dynamo_explain_no_graph_break(device):
    torch._dynamo.reset()
    seed("explain")
    net = CompileNet("leaky_relu", negative_slope=0.1).to(device).train()
    x = torch.randn(2, 3, 8, 8).to(device)
    try:
        explanation = torch._dynamo.explain(net)(x)
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
