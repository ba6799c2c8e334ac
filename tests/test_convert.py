"""fusedbn.convert / fusedbn.unconvert on small models written here.

Every numeric check compares the converted model with an unconverted deep copy
of the same model (same weights), in float64 so that a wrong conversion (a
missing or extra activation, a lost running-stat update) cannot hide in the
tolerance.
"""
import copy
import io
import sys
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedbn
from fusedbn.convert import Fusion, convert, unconvert
from fusedbn.modules import _BatchNormAct
from helpers import DenseBlock, DenseLayer, assert_close, randomize_bn

DTYPE = torch.float64
# Whole models (convolutions, several BatchNorms, residual adds) in float64:
# the roundings of many layers compound, so rtol is 10x assert_close's
# float64 rule, which judges one op.
TOL = dict(rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- the models
class BasicBlock(nn.Module):
    """torchvision style: conv-bn-relu-conv-bn, + identity, relu after the add
    (one nn.ReLU module used twice)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)          # fused
        out = self.conv2(out)
        out = self.bn2(out)           # BN -> add -> ReLU: residual fusion
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 with a downsample Sequential(conv, bn); functional and method
    activations."""

    def __init__(self, cin, mid, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))           # fused (F.relu)
        out = self.bn2(self.conv2(out)).relu()          # fused (Tensor.relu)
        out = self.bn3(self.conv3(out))                 # residual fusion (add, torch.relu)
        return torch.relu(out + self.downsample(x))


class EluBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.elu(self.bn(self.conv(x)), alpha=0.5)  # fused (elu, alpha 0.5)


class ResNetish(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.layer2 = nn.Sequential(Bottleneck(8, 4, 16, stride=2))
        self.elu = EluBlock(16)
        self.conv_out = nn.Conv2d(16, 16, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.bn_head = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, num_classes)
        self.num_classes = num_classes

    def features(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        x = self.elu(x)
        return self.relu(self.bn_out(self.conv_out(x)))        # fused (self.relu(self.bn(x)))

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.fc(F.leaky_relu(self.bn_head(x), 0.2))    # fused (leaky_relu 0.2, 1d)


# stem, layer1.{0,1}.bn1, layer2.0.bn{1,2}, elu.bn, bn_out, bn_head; residual form:
# layer1.{0,1}.bn2, layer2.0.bn3. The downsample BN has no activation.
RESNET_RESIDUAL = {"layer1.0.bn2", "layer1.1.bn2", "layer2.0.bn3"}
RESNET_FUSED = {"stem.1", "layer1.0.bn1", "layer1.1.bn1", "layer2.0.bn1", "layer2.0.bn2",
                "elu.bn", "bn_out", "bn_head"} | RESNET_RESIDUAL
RESNET_PLAIN = {"layer2.0.downsample.1"}


class SharedOutput(nn.Module):
    """The BN output is used twice: must not be fused."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.bn(x)
        return self.relu(y) + y


class InplaceOnShared(nn.Module):
    """In-place activation on a BN output that is used afterwards."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x)
        F.relu(y, inplace=True)
        z = self.bn2(x)
        z.relu_()
        return y * 2 + z


class Gated(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.neg = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1))
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            y = self.pos(x)
        else:
            y = self.neg(x)
        return self.relu(self.bn(y))


class WithGated(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ELU(0.7))
        self.gated = Gated()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.gated(self.pre(x))))


class ModeDependent(nn.Module):
    """forward depends on self.training (bn1 fused in both modes; bn2's output
    is used twice in eval, so it is fused in neither)."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.relu(self.bn1(x))
        if self.training:
            y = y * 0.5
        z = self.bn2(y)
        if self.training:
            return F.elu(z)
        return F.elu(z) + z


class ListModel(nn.Module):
    """BNs held in a ModuleList, called from the forward."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(4, 4, 1) for _ in range(2))
        self.bns = nn.ModuleList(nn.BatchNorm1d(4) for _ in range(2))

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.leaky_relu(bn(conv(x)), negative_slope=0.3)
        return x


class FunctionalForms(nn.Module):
    """Every functional / method spelling of the activations, one BN each."""
    FORMS = [  # (activation, negative_slope, alpha, act description)
        ("relu", 0.01, 1.0, "torch.relu"),
        ("relu", 0.01, 1.0, "torch.nn.functional.relu"),      # inplace=True
        ("relu", 0.01, 1.0, "torch.relu_"),                   # F.relu_
        ("relu", 0.01, 1.0, "Tensor.relu_"),
        ("leaky_relu", 0.01, 1.0, "torch.nn.functional.leaky_relu"),
        ("leaky_relu", 0.3, 1.0, "torch.nn.functional.leaky_relu_"),
        ("leaky_relu", 0.2, 1.0, "torch.nn.functional.leaky_relu"),
        ("elu", 0.01, 0.9, "torch.nn.functional.elu"),
        ("elu", 0.01, 0.4, "torch.nn.functional.elu_"),
        ("elu", 0.01, 1.0, "torch.nn.functional.elu"),        # inplace=True
    ]

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in self.FORMS)

    def forward(self, x):
        b = self.bns
        outs = [
            torch.relu(b[0](x)),
            F.relu(b[1](x), True),
            F.relu_(b[2](x)),
            b[3](x).relu_(),
            F.leaky_relu(b[4](x)),
            F.leaky_relu_(b[5](x), 0.3),
            F.leaky_relu(b[6](x), negative_slope=0.2, inplace=True),
            F.elu(b[7](x), 0.9),
            F.elu_(b[8](x), 0.4),
            F.elu(b[9](x), inplace=True),
        ]
        return torch.cat(outs, 1)


# --------------------------------------------------------------- utilities
def make(cls, *args, seed=0, device="cpu", **kwargs):
    """A model with non-trivial BN affine parameters and running stats, on
    ``device`` (initialized on the CPU: the same values on every device)."""
    torch.manual_seed(seed)
    return randomize_bn(cls(*args, **kwargs).to(DTYPE)).to(device)


def fused_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, _BatchNormAct)}


def plain_bn_names(model):
    return {n for n, m in model.named_modules() if type(m) in
            (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}


def run_step(model, x, training, seed=1):
    """Forward (+ backward in training); output, input and parameter gradients."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    torch.manual_seed(seed)
    out.backward(torch.randn_like(out))
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters()}
    return out.detach(), x.grad.detach(), grads


def sgd_step(model, lr=0.1):
    # (plain update: torch.optim's first use imports torch._dynamo, seconds)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


def assert_same(model, ref, x, steps=2, same_order=True):
    """Converted vs reference: train steps (each followed by an SGD update) then eval;
    outputs, input/parameter gradients, and the whole state_dict (running stats,
    num_batches_tracked) after each step; its keys in the same order unless
    ``same_order`` is False (a GraphModule registers modules in graph order)."""
    for training in [True] * steps + [False]:
        out_m, gx_m, g_m = run_step(model, x, training)
        out_r, gx_r, g_r = run_step(ref, x, training)
        torch.testing.assert_close(out_m, out_r, **TOL)
        torch.testing.assert_close(gx_m, gx_r, **TOL)
        assert g_m.keys() == g_r.keys()
        for k in g_r:
            assert (g_m[k] is None) == (g_r[k] is None), k
            if g_r[k] is not None:
                torch.testing.assert_close(g_m[k], g_r[k], **TOL, msg=lambda s, k=k: f"{k}: {s}")
        sgd_step(model)
        sgd_step(ref)
        sd_m, sd_r = model.state_dict(), ref.state_dict()
        assert list(sd_m) == list(sd_r) if same_order else sorted(sd_m) == sorted(sd_r)
        for k in sd_r:
            torch.testing.assert_close(sd_m[k], sd_r[k], **TOL, msg=lambda s, k=k: f"{k}: {s}")


def image(n=4, c=3, h=8, w=8, seed=2, device="cpu"):
    torch.manual_seed(seed)
    return torch.randn(n, c, h, w, dtype=DTYPE).to(device)


# -------------------------------------------------------------------- tests
def test_package_exports():
    # fusedbn/__init__.py re-exports these (when it does, they are the same objects).
    for name, obj in (("convert", convert), ("unconvert", unconvert), ("Fusion", Fusion)):
        if hasattr(fusedbn, name) and not isinstance(getattr(fusedbn, name), type(sys)):
            assert getattr(fusedbn, name) is obj


def test_resnet_pairs_found_and_others_left():
    model = make(ResNetish)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, fusions = convert(model, report=True)
    assert out is model
    assert fused_names(model) == RESNET_FUSED
    assert plain_bn_names(model) == RESNET_PLAIN
    assert len(fusions) == len(RESNET_FUSED) == 11
    assert {f.name for f in fusions if f.kind == "residual"} == RESNET_RESIDUAL
    by_name = {f.name: f for f in fusions}
    assert by_name["stem.1"] == Fusion("stem.1", "relu", 0.01, 1.0, "stem.2", "stem", "sequential")
    assert by_name["bn_head"].activation == "leaky_relu"
    assert by_name["bn_head"].negative_slope == 0.2
    assert by_name["bn_head"].act == "torch.nn.functional.leaky_relu"
    assert by_name["elu.bn"][1:4] == ("elu", 0.01, 0.5)
    assert by_name["layer2.0.bn2"].act == "Tensor.relu"
    assert by_name["layer1.0.bn1"].act == "layer1.0.relu"
    assert by_name["bn_out"].owner == "" and by_name["bn_out"].kind == "graph"
    assert isinstance(model.bn_head, fusedbn.BatchNormAct1d)
    assert isinstance(model.stem[1], fusedbn.BatchNormAct2d)
    assert model.elu.bn.activation == "elu" and model.elu.bn.alpha == 0.5
    assert model.bn_head.negative_slope == 0.2
    # Sequential: BN, ReLU -> BatchNormAct, Identity; other indices unchanged.
    assert type(model.stem[2]) is nn.Identity and isinstance(model.stem[3], nn.MaxPool2d)
    # The residual ReLU module is still there (used after the add).
    assert type(model.layer1[0].relu) is nn.ReLU


def test_resnet_outputs_and_gradients_match(device):
    ref = make(ResNetish, device=device)
    model = convert(copy.deepcopy(ref))
    assert len(fused_names(model)) == 11
    assert_same(model, ref, image(device=device))


def test_resnet_converted_in_eval_mode_keeps_mode(device):
    ref = make(ResNetish, device=device).eval()
    model = convert(copy.deepcopy(ref))
    assert all(not m.training for m in model.modules())
    x = image(device=device)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **TOL)


def test_class_attributes_and_parameters_kept():
    model = make(ResNetish)
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    convert(model)
    assert isinstance(model, ResNetish) and type(model).__name__ == "ResNetish"
    assert isinstance(model.layer1[0], BasicBlock)
    assert model.num_classes == 3
    assert callable(model.features)
    # Same tensors: an optimizer built before the conversion still works.
    assert [id(p) for p in model.parameters()] == params
    assert [id(b) for b in model.buffers()] == buffers
    assert model.bn_head.weight.dtype == DTYPE


def test_state_dict_loads_both_ways(device):
    ref = make(ResNetish, device=device)
    model = convert(make(ResNetish, seed=5, device=device))
    assert list(model.state_dict()) == list(ref.state_dict())
    fresh = make(ResNetish, seed=7, device=device)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(ref.state_dict(), strict=True)
    x = image(device=device)
    ref.eval(), model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **TOL)
        # Identity slots carry no state.
        assert not any(k.startswith("stem.2") for k in model.state_dict())


def test_unconvert_round_trip(device):
    ref = make(ResNetish, device=device)
    model = convert(copy.deepcopy(ref))
    x = image(device=device)
    assert_same(model, ref, x, steps=1)
    model, undone = unconvert(model, report=True)
    assert len(undone) == 11
    assert {f.name for f in undone if f.kind == "residual"} == RESNET_RESIDUAL
    assert not fused_names(model)
    assert plain_bn_names(model) == RESNET_FUSED | RESNET_PLAIN
    assert type(model) is ResNetish and type(model.layer2[0]) is Bottleneck
    assert type(model.stem[2]) is nn.ReLU and model.stem[2].inplace
    assert repr(model) == repr(ref)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert_same(model, ref, x, steps=1)
    ref.load_state_dict(model.state_dict(), strict=True)


def test_unconverted_state_dict_loads_into_converted():
    model = convert(make(ResNetish))
    back = unconvert(make(ResNetish, seed=3))   # nothing converted: no-op
    assert type(back) is ResNetish
    model.load_state_dict(back.state_dict(), strict=True)


def test_convert_is_idempotent_and_not_inplace_option(device):
    ref = make(ResNetish, device=device)
    copy_ = convert(ref, inplace=False)
    assert copy_ is not ref and not fused_names(ref) and len(fused_names(copy_)) == 11
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, again = convert(copy_, report=True)
    assert again == []
    assert_same(copy_, ref, image(device=device), steps=1)


def test_deepcopy_and_pickle_of_converted_model(device):
    ref = make(ResNetish, device=device)
    model = convert(copy.deepcopy(ref))
    dup = copy.deepcopy(model)
    assert type(dup) is type(model) and fused_names(dup) == RESNET_FUSED
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, ResNetish) and fused_names(loaded) == RESNET_FUSED
    x = image(device=device)
    for m in (dup, loaded):
        m.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(dup(x), ref(x), **TOL)
        torch.testing.assert_close(loaded(x), ref(x), **TOL)
    assert repr(unconvert(loaded)) == repr(ref)


def test_bn_output_used_twice_not_fused(device):
    ref = make(SharedOutput, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert fusions == [] and not fused_names(model)
    assert_same(model, ref, image(c=4, device=device))


def test_wrong_fusion_is_detected(device):
    """The comparison can fail: fusing the shared-output BN by hand changes the result."""
    ref = make(SharedOutput, device=device)
    model = copy.deepcopy(ref)
    bad = fusedbn.BatchNormAct2d(4, dtype=DTYPE, device=device)
    bad.load_state_dict(model.bn.state_dict())
    model.bn = bad
    with pytest.raises(AssertionError):
        assert_same(model, ref, image(c=4, device=device), steps=1)


def test_inplace_activation_on_shared_tensor_not_fused(device):
    ref = make(InplaceOnShared, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert fusions == [] and not fused_names(model)
    assert_same(model, ref, image(c=4, device=device))


def test_untraceable_submodule_reported_and_children_converted(device):
    ref = make(WithGated, device=device)
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # nothing left unfused: no warning
        model, fusions = convert(model, report=True)
    assert [(n, r.split(":")[0]) for n, r in fusions.modules] == [("gated", "Gated")]
    assert "could not trace" in fusions.modules[0][1]
    assert {f.name for f in fusions} == {"pre.1", "gated.pos.1", "gated.neg.1", "bn", "gated.bn"}
    assert type(model.gated) is Gated                      # its forward left as is
    # its own pair, self.relu(self.bn(y)) in the source: the modules swapped
    assert next(f for f in fusions if f.name == "gated.bn")[4:7] == ("gated.relu", "gated",
                                                                       "swap")
    assert type(model.gated.bn) is fusedbn.BatchNormAct2d
    assert type(model.gated.relu) is nn.Identity
    assert isinstance(model.gated.neg[1], fusedbn.BatchNormAct2d)
    assert model.gated.neg[1].negative_slope == 0.1
    assert model.pre[1].activation == "elu" and model.pre[1].alpha == 0.7
    x = image(device=device)
    assert_same(model, ref, x)            # x.sum() > 0 branch
    assert_same(model, ref, x - 10.0)     # the other branch
    assert repr(unconvert(model)) == repr(ref)


def test_untraceable_model_root(device):
    class GatedShared(Gated):
        def forward(self, x):
            y = self.pos(x) if x.sum() > 0 else self.neg(x)
            z = self.bn(y)
            return self.relu(z) + z           # bn's output used twice: not fused

    with pytest.warns(UserWarning, match="the model"):
        convert(make(GatedShared, device=device))
    ref = make(Gated, device=device)
    model = convert(copy.deepcopy(ref))
    assert fused_names(model) == {"pos.1", "neg.1", "bn"}
    assert_same(model, ref, image(c=4, device=device))


def test_training_dependent_forward(device):
    ref = make(ModeDependent, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert [f.name for f in fusions] == ["bn1"]
    assert type(model.bn2) is nn.BatchNorm2d
    assert_same(model, ref, image(c=4, device=device))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert(model, report=True)[1] == []   # the dispatching forward traces again
    assert_same(model, ref, image(c=4, device=device), steps=1)
    assert repr(unconvert(model)) == repr(ref)


def test_functional_forms(device):
    ref = make(FunctionalForms, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    got = sorted((int(f.name.split(".")[1]),) + tuple(f[1:5]) for f in fusions)
    assert got == [(i,) + form for i, form in enumerate(FunctionalForms.FORMS)]
    assert all(f.kind == "graph" and f.owner == "" for f in fusions)
    assert_same(model, ref, image(c=4, device=device))
    back = unconvert(model)
    assert type(back) is FunctionalForms and not fused_names(back)
    assert_same(back, ref, image(c=4, device=device), steps=1)


def test_float32_and_meta_device(device):
    ref = make(ResNetish, device=device).float()
    model = convert(copy.deepcopy(ref))
    assert model.stem[1].weight.dtype == torch.float32
    assert model.bn_head.running_mean.dtype == torch.float32
    x = image(device=device).float()
    ref.eval(), model.eval()
    with torch.no_grad():
        assert_close(model(x), ref(x), name="float32 model output")
    with torch.device("meta"):
        meta = ResNetish()
    convert(meta)
    assert fused_names(meta) == RESNET_FUSED
    assert all(t.device.type == "meta" for t in meta.state_dict().values())


def test_module_list_and_1d(device):
    ref = make(ListModel, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert sorted(f.name for f in fusions) == ["bns.0", "bns.1"]
    assert all(f.negative_slope == 0.3 for f in fusions)
    torch.manual_seed(0)
    assert_same(model, ref, torch.randn(3, 4, 5, dtype=DTYPE).to(device))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.25, inplace=True), nn.ELU(0.6)],
                         ids=["relu", "leaky_relu", "elu"])
def test_sequential_every_rank_and_activation(device, dim, act):
    bn_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    fused_cls = {1: fusedbn.BatchNormAct1d, 2: fusedbn.BatchNormAct2d,
                 3: fusedbn.BatchNormAct3d}[dim]
    ref = make(lambda: nn.Sequential(bn_cls(3), copy.deepcopy(act), nn.Identity()),
               device=device)
    model = convert(copy.deepcopy(ref))
    assert type(model[0]) is fused_cls and type(model[1]) is nn.Identity
    assert model[0].activation == {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu",
                                   nn.ELU: "elu"}[type(act)]
    assert model[0].negative_slope == getattr(act, "negative_slope", 0.01)
    assert model[0].alpha == getattr(act, "alpha", 1.0)
    torch.manual_seed(0)
    shape = {1: (4, 3, 5), 2: (4, 3, 3, 3), 3: (4, 3, 2, 3, 3)}[dim]
    assert_same(model, ref, torch.randn(shape, dtype=DTYPE).to(device))
    back = unconvert(model)
    assert type(back[0]) is bn_cls and type(back[1]) is type(act)
    assert repr(back) == repr(ref)


@pytest.mark.parametrize("config", [
    dict(eps=1e-3, momentum=0.3),
    dict(momentum=None),
    dict(affine=False),
    dict(bias=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
], ids=["eps_momentum", "cumulative", "no_affine", "no_bias", "no_stats", "bare"])
def test_bn_configuration_carried(device, config):
    ref = make(lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, **config), nn.ReLU()),
               device=device)
    model = convert(copy.deepcopy(ref))
    fused, bn = model[1], ref[1]
    assert isinstance(fused, fusedbn.BatchNormAct2d)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(fused, attr) == getattr(bn, attr), attr
    assert (fused.bias is None) == (bn.bias is None)
    assert (fused.running_mean is None) == (bn.running_mean is None)
    assert_same(model, ref, image(c=3, device=device), steps=3)
    assert list(model.state_dict()) == list(ref.state_dict())


def test_bare_bn_forward(device):
    ref = make(lambda: nn.Sequential(nn.BatchNorm2d(3, affine=False, track_running_stats=False),
                                     nn.LeakyReLU(0.2)), device=device)
    model = convert(copy.deepcopy(ref))
    assert isinstance(model[0], fusedbn.BatchNormAct2d)
    assert model[0].weight is None and model[0].running_mean is None
    x = image(device=device)
    for training in (True, False):
        model.train(training), ref.train(training)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), **TOL)


def test_graph_module_input(device):
    ref = make(ResNetish, device=device)
    gm = torch.fx.symbolic_trace(copy.deepcopy(ref))
    gm, fusions = convert(gm, report=True)
    assert isinstance(gm, torch.fx.GraphModule)
    assert {f.name for f in fusions} == RESNET_FUSED   # the stem pair is a graph pair here
    assert_same(gm, ref, image(device=device), steps=1)
    ref.load_state_dict(gm.state_dict(), strict=True)
    gm = unconvert(gm)
    assert not fused_names(gm)
    assert_same(gm, ref, image(device=device), steps=1)


def test_shared_bn_module_not_fused():
    bn = nn.BatchNorm2d(4)
    ref = make(lambda: nn.Sequential(nn.Sequential(bn, nn.ReLU()), nn.Sequential(bn, nn.ReLU())))
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert fusions == []


def test_sequential_element_called_from_forward_not_fused(device):
    class Peek(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return self.seq(x) + self.seq[0](x)

    ref = make(Peek, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert fusions == []
    assert_same(model, ref, image(c=4, device=device))


def test_exclude_and_trace_false():
    model, fusions = convert(make(ResNetish), report=True, exclude=["layer1", "bn_head"])
    assert {f.name for f in fusions} == RESNET_FUSED - {"layer1.0.bn1", "layer1.1.bn1",
                                                        "layer1.0.bn2", "layer1.1.bn2", "bn_head"}
    model, fusions = convert(make(ResNetish), report=True, trace=False)
    assert {f.name for f in fusions} == {"stem.1"}


def test_grad_context_in_forward_not_rewritten():
    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            with torch.no_grad():
                x = x * 1.0
            return F.relu(self.bn(x))

    with pytest.warns(UserWarning, match="no_grad"):
        model, fusions = convert(make(NoGrad), report=True)
    assert fusions == [] and type(model.bn) is nn.BatchNorm2d


def test_optional_forward_argument_not_rewritten(device):
    class Optional(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.block = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x, extra=None):
            y = F.relu(self.bn(self.block(x)))
            if extra is not None:      # fx would freeze this branch as taken
                y = y + extra
            return y

    ref = make(Optional, device=device)
    with pytest.warns(UserWarning, match=r"optional parameters \(extra=None\).*pairs not fused: bn"):
        model, fusions = convert(copy.deepcopy(ref), report=True)
    assert [f.name for f in fusions] == ["block.0"]   # its Sequential child still converted
    assert type(model) is Optional and type(model.bn) is nn.BatchNorm2d
    assert_same(model, ref, image(c=4, device=device))


def test_hooked_bn_not_fused():
    ref = make(lambda: nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
    seen = []
    ref[0].register_forward_hook(lambda m, i, o: seen.append(o.min().item()))
    model, fusions = convert(ref, report=True)
    assert fusions == []


# ------------------------------------------------------------ residual form
class ResBlock(nn.Module):
    """BasicBlock whose residual add is spelled one of FORMS; with a downsample
    shortcut computed between bn2 and the add, as torchvision does."""
    FORMS = ["iadd", "add", "torch_add_swapped", "f_relu", "method_inplace", "method_swapped",
             "leaky"]

    def __init__(self, form, downsample, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = (nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
                           if downsample else None)
        self.form = form

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        if self.form == "iadd":
            out += identity
            out = self.relu(out)
        elif self.form == "add":
            out = out + identity
            out = self.relu(out)
        elif self.form == "torch_add_swapped":      # BN output second
            out = torch.relu(torch.add(identity, out))
        elif self.form == "f_relu":
            out = F.relu(out + identity)
        elif self.form == "method_inplace":         # Tensor.add_ into the BN output, relu_
            out = out.add_(identity).relu_()
        elif self.form == "method_swapped":         # Tensor.add on the shortcut
            out = identity.add(out).relu()
        else:
            out = F.leaky_relu(out + identity, 0.2)
        return out


def small_image(c=8, seed=2, device="cpu"):
    return image(n=2, c=c, h=6, w=6, seed=seed, device=device)


def residual_calls(fused):
    """Record, per call of the fused module, whether it got a residual (the
    fused kernel); the unfused fallback does not call the module."""
    calls = []
    handle = fused.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs.get("residual") is not None),
        with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("form", ResBlock.FORMS)
def test_residual_forms(device, form, downsample):
    ref = make(ResBlock, form, downsample, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, fusions = convert(copy.deepcopy(ref), report=True)
    assert {f.name: f.kind for f in fusions} == {"bn1": "graph", "bn2": "residual"}
    res = next(f for f in fusions if f.kind == "residual")
    act = {"iadd": "relu", "add": "relu", "torch_add_swapped": "torch.relu",
           "f_relu": "torch.nn.functional.relu", "method_inplace": "Tensor.relu_",
           "method_swapped": "Tensor.relu", "leaky": "torch.nn.functional.leaky_relu"}[form]
    assert res == Fusion("bn2", "leaky_relu" if form == "leaky" else "relu",
                         0.2 if form == "leaky" else 0.01, 1.0, act, "", "residual")
    assert fused_names(model) == {"bn1", "bn2"}
    assert plain_bn_names(model) == ({"downsample.1"} if downsample else set())
    assert type(model.relu) is nn.ReLU           # still used after bn1
    calls, handle = residual_calls(model.bn2)
    x = small_image(device=device)
    assert_same(model, ref, x)                   # 2 train steps, then eval
    assert calls == [True] * 3                   # the fused kernel each time
    handle.remove()
    make(ResBlock, form, downsample, seed=3).load_state_dict(model.state_dict(), strict=True)
    # Converting again traces the rewritten forward (downsample.1 is still a
    # plain BN): nothing new, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert(model, report=True)[1] == []
    back, undone = unconvert(model, report=True)
    assert sorted(undone) == sorted(fusions)
    assert type(back) is ResBlock and repr(back) == repr(ref) and not fused_names(back)
    assert_same(back, ref, x, steps=1)
    ref.load_state_dict(back.state_dict(), strict=True)


def test_residual_bottleneck_with_downsample(device):
    ref = make(Bottleneck, 8, 4, 8, 1, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert {f.name: f.kind for f in fusions} == {"bn1": "graph", "bn2": "graph",
                                                 "bn3": "residual"}
    assert type(model.downsample[1]) is nn.BatchNorm2d    # no activation of its own
    calls, _ = residual_calls(model.bn3)
    assert_same(model, ref, small_image(device=device))
    assert calls == [True] * 3
    assert repr(unconvert(model)) == repr(ref)
    assert_same(model, ref, small_image(device=device), steps=1)


@pytest.mark.parametrize("form", ["iadd", "torch_add_swapped", "method_inplace",
                                  "method_swapped"])
def test_residual_graph_module(device, form):
    def ops(gm):
        return Counter((n.op, n.target) for n in gm.graph.nodes)

    ref = make(ResBlock, form, True, device=device)
    gm = torch.fx.symbolic_trace(copy.deepcopy(ref))
    before = ops(gm)
    gm, fusions = convert(gm, report=True)
    # Fully traced, the downsample BN is a graph node too: with the shortcut as
    # first operand, its BN is the one fused (the first operand's).
    fused_bn = "downsample.1" if form in ("torch_add_swapped", "method_swapped") else "bn2"
    assert {f.name: f.kind for f in fusions} == {"bn1": "graph", fused_bn: "residual"}
    assert not any(n.op == "call_module" and n.target == fused_bn for n in gm.graph.nodes)
    assert_same(gm, ref, small_image(device=device), steps=1)
    gm, undone = unconvert(gm, report=True)
    assert sorted(undone) == sorted(fusions)
    assert not fused_names(gm)
    assert ops(gm) == before                  # BN call, add and activation are back
    assert_same(gm, ref, small_image(device=device), steps=1)
    ref.load_state_dict(gm.state_dict(), strict=True)


class NotResidual(nn.Module):
    """Residual-looking forms that must not be fused."""
    CASES = ["add_reused", "bn_reused", "inplace_act_shared", "scalar", "alpha_function",
             "alpha_method", "into_residual", "input_shared_between", "stats_read_between",
             "mode_dependent"]
    ADD_ONLY = ["add_reused", "inplace_act_shared"]

    def __init__(self, case):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.case = case

    def forward(self, x):
        c = self.case
        if c == "add_reused":
            s = self.bn(x) + x
            return self.relu(s) + s
        if c == "bn_reused":
            y = self.bn(x)
            return self.relu(y + x) * y
        if c == "inplace_act_shared":
            s = self.bn(x) + x
            F.relu_(s)
            return s * 2
        if c == "scalar":
            return self.relu(self.bn(x) + 1.5)
        if c == "alpha_function":
            return self.relu(torch.add(self.bn(x), x, alpha=2))
        if c == "alpha_method":
            return self.bn(x).add(x, alpha=2).relu()
        if c == "into_residual":                   # writes into the shortcut, used later
            z = self.conv(x)
            return F.relu(z.add_(self.bn(x))) + z
        if c == "input_shared_between":            # the BN input is used by the conv in between
            y = self.bn(x)
            return F.relu(y + self.conv(x))
        if c == "stats_read_between":              # reads the updated running mean
            y = self.bn(self.conv(x))
            # (a parameter proxy makes fx record the buffer as a get_attr node)
            r = (self.conv.weight.sum() * 0 + self.bn.running_mean).view(1, -1, 1, 1)
            return F.relu(y + x) + r
        # mode_dependent: residual form in training, a direct pair in eval
        if self.training:
            return F.relu(self.bn(x) + x)
        return F.relu(self.bn(x))


@pytest.mark.parametrize("case", NotResidual.CASES)
def test_residual_not_fused(device, case):
    """No act(bn(x) + z) fusion; where the add's result is used beyond the
    activation, the add alone becomes the residual form with identity."""
    ref = make(NotResidual, case, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    expected = [("bn", "identity", "residual")] if case in NotResidual.ADD_ONLY else []
    assert [(f.name, f.activation, f.kind) for f in fusions] == expected
    assert_same(model, ref, small_image(c=4, device=device))


class ResidualArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, z):
        return F.relu(self.bn(x) + z)


class FeedsResidual(nn.Module):
    """Passes self.z (set per test) as the residual of the inner block."""

    def __init__(self, expand=False):
        super().__init__()
        self.inner = ResidualArg()
        self.expand = expand

    def forward(self, x):
        z = self.z.expand_as(x) if self.expand else self.z
        return self.inner(x, z)


@pytest.mark.parametrize("kind", ["same", "expanded", "broadcast", "scalar_tensor", "float32",
                                  "number"])
def test_residual_runtime_fallback(device, kind):
    """The residual's shape/dtype is only known per call: anything the fused
    kernel does not take goes through the unfused path, with eager's results,
    gradients (to the residual too) and running stats. A stride-0 expanded
    residual of the right shape takes the kernel."""
    ref = make(FeedsResidual, expand=kind == "expanded", device=device)
    torch.manual_seed(4)
    ref.z = {"same": lambda: nn.Parameter(torch.randn(2, 4, 6, 6, dtype=DTYPE)),
             "expanded": lambda: nn.Parameter(torch.randn(4, 1, 1, dtype=DTYPE)),
             "broadcast": lambda: nn.Parameter(torch.randn(4, 1, 1, dtype=DTYPE)),
             "scalar_tensor": lambda: nn.Parameter(torch.tensor(0.3, dtype=DTYPE)),
             "float32": lambda: nn.Parameter(torch.randn(2, 4, 6, 6)),
             "number": lambda: 0.25}[kind]()
    ref.to(device)  # the new parameter z
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert [(f.name, f.kind) for f in fusions] == [("inner.bn", "residual")]
    calls, _ = residual_calls(model.inner.bn)
    assert_same(model, ref, small_image(c=4, device=device))
    assert calls == ([True] * 3 if kind in ("same", "expanded") else [])
    if isinstance(ref.z, nn.Parameter):
        assert model.z.grad is not None


# ------------------------------------------------- the activations of issue 15
# (spelling: a module, or a function of the BN output called in forward;
#  activation; the params the fused module gets)
NEW_FORMS = [
    (nn.ReLU6(), "relu6", {}),
    (nn.ReLU6(inplace=True), "relu6", {}),
    (nn.Hardtanh(-0.5, 2.0), "hardtanh", {"min_val": -0.5, "max_val": 2.0}),
    (nn.SiLU(inplace=True), "silu", {}),
    (nn.Hardswish(), "hardswish", {}),
    (nn.Hardsigmoid(), "hardsigmoid", {}),
    (nn.GELU(), "gelu", {"approximate": "none"}),
    (nn.GELU(approximate="tanh"), "gelu", {"approximate": "tanh"}),
    (nn.Mish(), "mish", {}),
    (lambda y: F.relu6(y), "relu6", {}),
    (lambda y: F.relu6(y, inplace=True), "relu6", {}),
    (lambda y: F.hardtanh(y, -2.0, 0.5), "hardtanh", {"min_val": -2.0, "max_val": 0.5}),
    (lambda y: F.hardtanh(y, max_val=3.0, inplace=True), "hardtanh",
     {"min_val": -1.0, "max_val": 3.0}),
    (lambda y: F.hardtanh_(y, 0.0, 6.0), "hardtanh", {"min_val": 0.0, "max_val": 6.0}),
    (lambda y: F.silu(y), "silu", {}),
    (lambda y: F.silu(y, inplace=True), "silu", {}),
    (lambda y: F.hardswish(y, True), "hardswish", {}),
    (lambda y: F.hardsigmoid(y), "hardsigmoid", {}),
    (lambda y: F.gelu(y), "gelu", {"approximate": "none"}),
    (lambda y: F.gelu(y, approximate="tanh"), "gelu", {"approximate": "tanh"}),
    (lambda y: F.mish(y, inplace=True), "mish", {}),
]
NEW_FORM_IDS = [f"{i}-{a}-{'module' if isinstance(f, nn.Module) else 'function'}"
                for i, (f, a, _) in enumerate(NEW_FORMS)]


class OneForm(nn.Module):
    """conv -> BN -> the activation in the given spelling."""

    def __init__(self, form):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        if isinstance(form, nn.Module):
            self.act = copy.deepcopy(form)
        else:
            self.fn = form

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) if hasattr(self, "act") else self.fn(y)


@pytest.mark.parametrize("i", range(len(NEW_FORMS)), ids=NEW_FORM_IDS)
def test_new_activation_forms(device, i):
    form, activation, params = NEW_FORMS[i]
    ref = make(OneForm, form, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert [(f.name, f.activation, f.params) for f in fusions] == [("bn", activation, params)]
    assert model.bn.activation == activation
    assert fusedbn._reference.used_params(activation, **fusedbn._reference.params_of(model.bn)) \
        == params
    assert_same(model, ref, image(c=4, device=device))
    back = unconvert(model)
    assert type(back.bn) is nn.BatchNorm2d
    assert_same(back, ref, image(c=4, device=device), steps=1)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.Hardtanh(-2.0, 2.5), nn.SiLU(), nn.Hardswish(),
                                 nn.Hardsigmoid(), nn.GELU(approximate="tanh"), nn.Mish()],
                         ids=["relu6", "hardtanh", "silu", "hardswish", "hardsigmoid", "gelu",
                              "mish"])
def test_new_activations_sequential(device, act):
    ref = make(lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), copy.deepcopy(act)),
               device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert [(f.name, f.kind) for f in fusions] == [("1", "sequential")]
    assert type(model[2]) is nn.Identity
    assert_same(model, ref, image(c=3, device=device))
    back = unconvert(model)
    assert repr(back) == repr(ref)


def test_activation_with_non_constant_parameter_not_fused():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x, hi):
            return F.hardtanh(self.bn(x), 0.0, hi)

    model, fusions = convert(make(Dynamic), report=True)
    assert fusions == [] and type(model.bn) is nn.BatchNorm2d
    assert "hardtanh" in dict(fusions.left)["bn"]


# ------------------------------------------------ BN -> add, no activation after
class AddOnly(nn.Module):
    """MobileNetV2's projection + skip, in the forms a block writes it."""
    FORMS = ["add", "iadd", "swapped", "seq_tail", "seq_nested_tail"]

    def __init__(self, form):
        super().__init__()
        self.form = form
        if not form.startswith("seq"):
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
        elif form == "seq_tail":
            self.proj = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        else:   # torchvision: Sequential(Conv2dNormActivation..., Conv2dNormActivation(act=None))
            inner = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
            self.proj = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4),
                                      nn.ReLU(), inner)

    def forward(self, x):
        if self.form == "add":
            return self.bn(self.conv(x)) + x
        if self.form == "iadd":
            out = self.bn(self.conv(x))
            out += x
            return out
        if self.form == "swapped":
            return x + self.bn(self.conv(x))
        return x + self.proj(x)


ADD_ONLY_FUSED = {"add": "bn", "iadd": "bn", "swapped": "bn", "seq_tail": "proj.1",
                  "seq_nested_tail": "proj.3.1"}


@pytest.mark.parametrize("form", AddOnly.FORMS)
def test_add_without_activation_is_identity_residual(device, form):
    ref = make(AddOnly, form, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    res = [f for f in fusions if f.kind == "residual"]
    assert [(f.name, f.activation, f.act) for f in res] == [(ADD_ONLY_FUSED[form], "identity", "")]
    fused = model.get_submodule(ADD_ONLY_FUSED[form])
    assert isinstance(fused, fusedbn.BatchNormAct2d) and fused.activation == "identity"
    calls, _ = residual_calls(fused)
    assert_same(model, ref, small_image(c=4, device=device))
    assert calls == [True] * 3                    # the fused kernel, with the residual
    back, undone = unconvert(model, report=True)
    assert sorted(undone) == sorted(fusions)
    assert repr(back) == repr(ref) and not fused_names(back)
    assert_same(back, ref, small_image(c=4, device=device), steps=1)


def test_sequential_tail_with_activation_in_parent(device):
    """A Sequential ending in a BN, the activation applied by the parent."""
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
            self.other = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

        def forward(self, x):
            y = self.other(x)            # its output used twice: not fused
            return F.leaky_relu(self.block(x), 0.2) + y * y

    ref = make(Parent, device=device)
    model, report = convert(copy.deepcopy(ref), report=True)
    assert [(f.name, f.activation, f.kind) for f in report] == [("block.1", "leaky_relu", "graph")]
    assert "other.1" in dict(report.left)
    assert "mul" in dict(report.left)["other.1"]
    assert_same(model, ref, small_image(c=4, device=device))
    assert repr(unconvert(model)) == repr(ref)


def test_sequential_tail_called_twice_not_fused(device):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

        def forward(self, x):
            return F.relu(self.block(x)) + self.block(x)

    ref = make(Twice, device=device)
    model, report = convert(copy.deepcopy(ref), report=True)
    assert list(report) == [] and "more than once" in dict(report.left)["block.1"]
    assert_same(model, ref, small_image(c=4, device=device))


# ------------------------------------------ GraphModules with a graph per mode
class ModeGraphs(nn.Module):
    """Traced differently in train and eval (dropout only in training)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv(x)))
        if self.training:
            y = y * 0.5
        return F.relu(self.bn2(y) + x)


class DualGraph(torch.fx.GraphModule):
    """Shaped like torchvision's DualGraphModule (create_feature_extractor):
    train_graph / eval_graph, train() sets self.graph to one of them."""

    def __init__(self, root, train_graph, eval_graph):
        super(torch.fx.GraphModule, self).__init__()
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        for node in list(train_graph.nodes) + list(eval_graph.nodes):
            if node.op in ("get_attr", "call_module"):
                torch.fx.graph_module._copy_attr(root, self, node.target)
        self.train()
        self.graph = train_graph

    def train(self, mode=True):
        if mode and not self.training:
            self.graph = self.train_graph
        elif not mode and self.training:
            self.graph = self.eval_graph
        return super().train(mode=mode)


def dual_graph(model):
    was = model.training
    train_graph = torch.fx.Tracer().trace(model.train())
    eval_graph = torch.fx.Tracer().trace(model.eval())
    model.train(was)
    return DualGraph(model, train_graph, eval_graph).train(was)


@pytest.mark.parametrize("start", ["train", "eval"])
def test_dual_graph_module_rewritten_in_both_graphs(device, start):
    ref = make(ModeGraphs, device=device)
    dual = dual_graph(copy.deepcopy(ref)).train(start == "train")
    dual, fusions = convert(dual, report=True)
    assert {(f.name, f.kind) for f in fusions} == {("bn1", "graph"), ("bn2", "residual")}
    for graph in (dual.train_graph, dual.eval_graph):
        assert not any(n.op == "call_function" and n.target is F.relu for n in graph.nodes)
    # train -> eval -> train: each mode runs its own (rewritten) graph.
    assert_same(dual, ref, small_image(c=4, device=device))
    dual.train()
    assert_same(dual, ref, small_image(c=4, device=device), steps=1)
    back, undone = unconvert(dual, report=True)
    assert sorted(undone) == sorted(fusions) and not fused_names(back)
    for graph in (back.train_graph, back.eval_graph):
        assert sum(n.target is F.relu for n in graph.nodes) == 2
    assert_same(back, ref, small_image(c=4, device=device))


def test_graph_module_with_hidden_graphs_refused(device):
    """A GraphModule subclass that switches graphs convert cannot see is left as
    it is, with a warning and a report line (never a different model after
    .train() / .eval())."""
    class Hidden(DualGraph):
        def __init__(self, root, train_graph, eval_graph):
            super().__init__(root, train_graph, eval_graph)
            self.graphs = {True: self.__dict__.pop("train_graph"),
                           False: self.__dict__.pop("eval_graph")}

        def train(self, mode=True):
            if hasattr(self, "graphs") and mode != self.training:
                self.graph = self.graphs[mode]
            return nn.Module.train(self, mode)

    ref = make(ModeGraphs, device=device)
    model = copy.deepcopy(ref)
    hidden = Hidden(model, torch.fx.Tracer().trace(model.train()),
                    torch.fx.Tracer().trace(model.eval())).train()
    with pytest.warns(UserWarning, match=r"GraphModule subclass \(Hidden\) that overrides train"):
        hidden, report = convert(hidden, report=True)
    assert list(report) == [] and not fused_names(hidden)
    assert [n for n, _ in report.modules] == [""]
    assert_same(hidden, ref, small_image(c=4, device=device))


# ------------------------------------- forwards that accept several input types
def test_dense_layer_keeps_accepting_a_tensor_and_a_list(device):
    """Traced as a list (fx's Proxy is no Tensor): a list runs the fused graph,
    a Tensor the original forward with the fused modules as plain BatchNorms."""
    class AsList(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer([x[:, :2], x[:, 2:]])

    ref = make(DenseLayer, 4, device=device)
    model, fusions = convert(copy.deepcopy(ref), report=True)
    assert {f.name for f in fusions} == {"norm1", "norm2"}
    unfused = []       # relu1 runs only where the BN is not fused
    model.relu1.register_forward_hook(lambda *a: unfused.append(True))
    x = small_image(c=4, device=device)
    assert_same(model, ref, x, steps=1)                   # a Tensor
    assert unfused == [True, True]
    assert_same(AsList(model), AsList(ref), x, steps=1)   # a list
    assert unfused == [True, True]
    assert_same(model, ref, x, steps=1)                   # a Tensor again: fused modules back
    assert "forward" not in model.norm1.__dict__
    back = unconvert(model)
    assert type(back) is DenseLayer and not fused_names(back)


def test_dense_block_fused_and_pickles(device):
    ref = make(DenseBlock, device=device)
    model, report = convert(copy.deepcopy(ref), report=True)
    assert report.fused == report.total == 6 and report.left == []
    assert_same(model, ref, small_image(c=4, device=device))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = small_image(c=4, device=device)
    loaded.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.denselayer1(x), ref.denselayer1(x), **TOL)


def test_checkpointed_layers_fused_by_swapping(device):
    """densenet(memory_efficient=True): the layers cannot be traced
    (torch.utils.checkpoint, a test on requires_grad), but their source calls
    self.relu1(self.norm1(...)) and self.relu2(self.norm2(...)) with each name
    used once: fused by swapping the modules. Nothing is left: no warning, a
    line per layer in the report."""
    ref = make(DenseBlock, memory_efficient=True, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, report = convert(copy.deepcopy(ref), report=True)
    assert report.fused == report.total == 6 and report.left == []
    assert {f.kind for f in report} == {"swap"}
    assert [n for n, _ in report.modules] == [f"denselayer{i}" for i in (1, 2, 3)]
    assert all("torch.utils.checkpoint" in reason and "fused without tracing" in reason
               for _, reason in report.modules)
    assert type(model.denselayer1.relu1) is nn.Identity
    assert_same(model, ref, small_image(c=4, device=device))   # backward recomputes
    back, undone = unconvert(model, report=True)
    assert sorted(undone) == sorted(report)
    assert repr(back) == repr(ref) and not fused_names(back)


class UntraceableShared(nn.Module):
    """Not traceable; the BN outputs are used beyond the activation: no swap."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        y = self.bn1(x)
        return self.relu1(y) + y + self.relu2(self.bn2(x)) * self.bn2(x)


def test_untraceable_shared_outputs_not_swapped_one_warning(device):
    ref = make(lambda: nn.Sequential(*(UntraceableShared() for _ in range(3))), device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = convert(copy.deepcopy(ref), report=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "submodule '0' (UntraceableShared): torch.fx could not trace" in messages[0]
    assert "(and 2 more UntraceableShared modules, same reason)" in messages[0]
    assert list(report) == [] and not fused_names(model)
    assert [n for n, _ in report.left] == [f"{i}.bn{j}" for i in range(3) for j in (1, 2)]
    assert all("left as it is" in r for _, r in report.left)
    assert_same(model, ref, small_image(c=4, device=device))


def test_report_lists_fused_and_left():
    model, report = convert(make(ResNetish), report=True)
    assert report.total == 12 and report.fused == 11 and len(report) == 11
    assert [name for name, _ in report.left] == ["layer2.0.downsample.1"]
    text = str(report)
    assert text.splitlines()[0] == ("fusedbn.convert: 11 of 12 BatchNorms fused (11 in this "
                                    "call), 1 left")
    assert "  fused  stem.1: relu, sequential after stem.2" in text
    assert "  fused  bn_head: leaky_relu(negative_slope=0.2), graph after " \
           "torch.nn.functional.leaky_relu" in text
    assert "  left   layer2.0.downsample.1: " in text
    _, again = convert(model, report=True)
    assert list(again) == [] and again.fused == 11


@pytest.mark.parametrize("case", ["resnet", "seq_tail", "dense"])
def test_converted_model_traces_with_fx(device, case):
    """torch.fx.symbolic_trace of a converted model (what create_feature_extractor,
    FX quantization and fx passes do) computes what the converted model does,
    in training and then in eval (a mode frozen into the graph would not)."""
    cls, args, c = {"resnet": (ResNetish, (), 3), "seq_tail": (AddOnly, ("seq_nested_tail",), 4),
                    "dense": (DenseBlock, (), 4)}[case]
    ref = make(cls, *args, device=device)
    gm = torch.fx.symbolic_trace(convert(copy.deepcopy(ref)))
    assert_same(gm, ref, image(c=c, device=device), same_order=False)
