"""The forward op in every grad mode. A call that records nothing for
autograd (no_grad, inference_mode, or no argument requiring a gradient)
skips the autograd Function (csrc/autograd.cpp: records_nothing); it must
still give the same outputs and buffers as one that records, bump the
version counters of what it mutates, and return outputs that need no grad."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fusedbn

MODES = ["no_grad", "inference_mode", "grad_off_args", "records"]


def _context(mode):
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference_mode":
        return torch.inference_mode()
    return contextlib.nullcontext()


def _state(device, C):
    g = torch.Generator().manual_seed(C)
    return dict(rm=(torch.randn(C, generator=g) * 0.1).to(device),
                rv=(torch.rand(C, generator=g) + 0.5).to(device),
                nbt=torch.tensor(3, device=device),
                w=(torch.rand(C, generator=g) + 0.5).to(device),
                b=(torch.randn(C, generator=g) * 0.1).to(device))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_same_results_and_versions_in_every_grad_mode(device, mode, training, inplace):
    N, C = 3, 5
    x0 = torch.randn(N, C, 4, 3, generator=torch.Generator().manual_seed(7)).to(device)
    st = _state(device, C)
    ref_rm, ref_rv = st["rm"].clone(), st["rv"].clone()
    expected = F.leaky_relu(F.batch_norm(x0, ref_rm, ref_rv, st["w"], st["b"], training, 0.1,
                                         1e-5), 0.1)
    if mode == "records":
        st["w"].requires_grad_()
    x = x0.clone()
    before = {k: st[k]._version for k in ("rm", "rv", "nbt")}
    x_version = x._version
    with _context(mode):
        out = fusedbn.batch_norm_act(x, st["rm"], st["rv"], st["w"], st["b"], training, 0.1,
                                     1e-5, "leaky_relu", 0.1, inplace=inplace,
                                     num_batches_tracked=st["nbt"])
    torch.testing.assert_close(out.detach(), expected)
    torch.testing.assert_close(st["rm"], ref_rm)
    torch.testing.assert_close(st["rv"], ref_rv)
    assert st["nbt"].item() == (4 if training else 3)
    assert out.requires_grad == (mode == "records")
    assert (out.grad_fn is None) == (mode != "records")
    if inplace:
        assert out is x or out.data_ptr() == x.data_ptr()
    if mode != "inference_mode":  # (normal tensors' versions are not shown inside it)
        moved = {k: st[k]._version > v for k, v in before.items()}
        assert moved == {k: training for k in before}
        assert (x._version > x_version) == inplace
    if mode == "records":
        out.sum().backward()
        assert st["w"].grad is not None


def test_activity_version_moves_without_grad(device):
    activity = torch.zeros(3, device=device)
    v0 = activity._version
    with torch.no_grad():
        fusedbn.batch_norm_act(torch.randn(2, 3, 4).to(device), torch.zeros(3, device=device),
                               torch.ones(3, device=device), training=False, activity=activity)
    assert activity._version > v0


def test_no_grad_call_then_backward_of_an_earlier_one(device):
    """A version bump by a no_grad call on a buffer saved by nothing leaves an
    earlier graph's backward valid; on the input it saved, it is caught."""
    st = _state(device, 4)
    x = torch.randn(2, 4, 5).to(device).requires_grad_()
    y = fusedbn.batch_norm_act(x, st["rm"], st["rv"], st["w"], st["b"], True)
    with torch.no_grad():
        fusedbn.batch_norm_act(x.detach().clone(), st["rm"], st["rv"], st["w"], st["b"], True)
    y.sum().backward()
    assert x.grad is not None
    h = x.detach().clone().requires_grad_()
    base = h * 1.0  # a non-leaf the op saves
    y = fusedbn.batch_norm_act(base, st["rm"], st["rv"], st["w"], st["b"], True)
    with torch.no_grad():
        fusedbn.batch_norm_act(base, None, None, None, None, True, activation="leaky_relu",
                               inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_forward_mode_ad_still_refused(device):
    import torch.autograd.forward_ad as fwAD
    st = _state(device, 3)
    x = torch.randn(2, 3, 4).to(device)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError):
            fusedbn.batch_norm_act(dual, st["rm"], st["rv"], st["w"], st["b"], True)
