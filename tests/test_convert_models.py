"""fusedbn.convert on small models in the shape of torchvision's blocks
(torchvision is not a dependency; benchmarks/torchvision_check.py runs the real
ones): MobileNetV2's inverted residual, EfficientNet's MBConv, MobileNetV3's
block, ResNet's bottleneck, DenseNet's dense block and transition.

For each: convert fuses every BatchNorm whose output feeds only an activation
or an add (the count is asserted, and the report gives each left one's
reason), and three SGD steps of the converted model give eager's losses,
gradients and running statistics: float64 to rounding, float32 within the
suite's rule against a float64 reference (``helpers.assert_close``, vs64),
contiguous and channels_last.
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedbn.convert import convert
from fusedbn.modules import _BatchNormAct
from helpers import DenseBlock, assert_close, randomize_bn

# Whole models in float64: many layers' roundings compound (as in test_convert).
TOL64 = dict(rtol=1e-9, atol=1e-10)


# ------------------------------------------------- torchvision-shaped blocks
class ConvNormAct(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv, BN, activation (None: none)."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True) if act is not nn.GELU else act())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation."""

    def __init__(self, c, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))

    def forward(self, x):
        return self._scale(x) * x


class InvertedResidual(nn.Module):
    """MobileNetV2: expand (ReLU6), depthwise (ReLU6), projection BN; x + conv(x)."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [ConvNormAct(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormAct(3, 8, 3, 1, act=nn.ReLU6),
            InvertedResidual(8, 8, 1, 2),        # skip
            InvertedResidual(8, 12, 2, 2),       # no skip: its projection feeds the next block
            InvertedResidual(12, 12, 1, 2),      # skip
            ConvNormAct(12, 16, 1, act=nn.ReLU6))
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth (p=0 here: deterministic, still a module
    between the projection BN and the add)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1 - self.p).div_(1 - self.p)


class MBConv(nn.Module):
    """EfficientNet: expand (SiLU), depthwise (SiLU), SE (SiLU / sigmoid),
    projection Conv2dNormActivation(activation=None); stochastic depth, then
    ``result += input``."""

    def __init__(self, cin, cout, expand, stride, sd_prob=0.0):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = cin * expand
        layers = [ConvNormAct(cin, hidden, 1, act=nn.SiLU)] if hidden != cin else []
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcitation(hidden, max(1, cin // 4), activation=nn.SiLU),
                   ConvNormAct(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class MBConvNoDepth(MBConv):
    """MBConv whose skip adds the projection directly (no stochastic depth)."""

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class EfficientNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormAct(3, 8, 3, 1, act=nn.SiLU),
            MBConv(8, 8, 1, 1),              # projection -> stochastic depth -> add: left
            MBConv(8, 12, 4, 2),             # no skip
            MBConvNoDepth(12, 12, 4, 1),     # projection -> add: identity residual
            ConvNormAct(12, 16, 1, act=nn.SiLU))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class InvertedResidualV3(nn.Module):
    """MobileNetV3: Hardswish or ReLU, SE with Hardsigmoid, ``result += input``."""

    def __init__(self, cin, hidden, cout, use_se, use_hs, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if use_hs else nn.ReLU
        layers = [ConvNormAct(cin, hidden, 1, act=act)] if hidden != cin else []
        layers.append(ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=act))
        if use_se:
            layers.append(SqueezeExcitation(hidden, max(1, hidden // 4),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormAct(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormAct(3, 8, 3, 1, act=nn.Hardswish),
            InvertedResidualV3(8, 8, 8, True, False, 1),      # skip, ReLU, SE
            InvertedResidualV3(8, 16, 12, False, True, 2),    # no skip
            InvertedResidualV3(12, 24, 12, True, True, 1),    # skip, Hardswish, SE
            ConvNormAct(12, 16, 1, act=nn.Hardswish))
        self.classifier = nn.Sequential(nn.Linear(16, 8), nn.Hardswish(), nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck."""

    def __init__(self, cin, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(Bottleneck(8, 4, 2, down), Bottleneck(16, 4))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseNetish(nn.Module):
    """torchvision DenseNet: features (stem, dense block, transition, dense
    block, norm5) then ``F.relu(features)`` in the parent forward."""

    def __init__(self, memory_efficient=False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
            DenseBlock(2, 4, 4, memory_efficient),
            nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(inplace=True),      # _Transition
                          nn.Conv2d(12, 4, 1, bias=False), nn.AvgPool2d(2)),
            DenseBlock(2, 4, 4, memory_efficient),
            nn.BatchNorm2d(12))                                            # norm5
        self.classifier = nn.Linear(12, 3)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


# (model, {BatchNorm left: what its output feeds}); every other BatchNorm feeds
# only an activation or an add and must be fused.
MODELS = {
    # (a block without skip: its projection is the block's output)
    "mobilenet_v2": (MobileNetV2ish, {"features.2.conv.3": "the output of features.2"}),
    "efficientnet": (EfficientNetish, {"features.1.block.2.1": "stochastic_depth",
                                       "features.2.block.3.1": "the output of features.2"}),
    "mobilenet_v3": (MobileNetV3ish, {"features.2.block.2.1": "the output of features.2"}),
    # the downsample BN feeds the add whose other operand, bn3, is fused with it
    "resnet": (ResNetish, {"layer1.0.downsample.1": "add"}),
    "densenet": (DenseNetish, {}),
    # layers under torch.utils.checkpoint: not traced, fused by swapping modules
    "densenet_memory_efficient": (functools.partial(DenseNetish, memory_efficient=True), {}),
}
def build(name, dtype, device, memory_format):
    cls = MODELS[name][0]
    torch.manual_seed(0)
    model = randomize_bn(cls()).to(device=device, dtype=dtype)
    return model.to(memory_format=memory_format)


def bn_names(model, fused):
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and isinstance(m, _BatchNormAct) == fused}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_bn_feeding_an_activation_or_add_is_fused(name):
    model = build(name, torch.float64, "cpu", torch.contiguous_format)
    everything = bn_names(model, False)
    left_expected = MODELS[name][1]
    model, report = convert(model, report=True)
    assert bn_names(model, False) == set(left_expected)
    assert bn_names(model, True) == everything - set(left_expected)
    assert report.fused == len(report) == len(everything) - len(left_expected)
    assert report.total == len(everything)
    left = dict(report.left)
    for bn, feeds in left_expected.items():
        assert feeds in left[bn], (bn, left[bn])


def step(model, x, g, lr=0.05):
    """One SGD step: (loss, output, input grad, {param: grad}); then the update."""
    model.train()
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    out = model(xi)
    loss = (out * g).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)
    return loss.detach(), out.detach(), xi.grad.detach(), grads


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_three_sgd_steps_match_eager(device, name, dtype, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    eager = build(name, dtype, device, fmt)
    # float64 is compared with eager alone (check): no separate reference.
    ref64 = None if dtype == torch.float64 else copy.deepcopy(eager).double()
    model = convert(copy.deepcopy(eager))
    assert bn_names(model, True)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64).to(device).contiguous(memory_format=fmt)
    g = torch.randn(4, 3, dtype=torch.float64).to(device)
    for i in range(3):
        got = step(model, x.to(dtype), g.to(dtype))
        want = step(eager, x.to(dtype), g.to(dtype))
        r64 = want if ref64 is None else step(ref64, x, g)
        for what, a, e, r in zip(("loss", "output", "input grad"), got, want, r64):
            check(a, e, r, f"step {i} {what}", dtype)
        assert got[3].keys() == want[3].keys()
        for k in want[3]:
            check(got[3][k], want[3][k], r64[3][k], f"step {i} grad {k}", dtype)
        buffers64 = dict((eager if ref64 is None else ref64).named_buffers())
        want_buffers = dict(eager.named_buffers())
        for k, b in model.named_buffers():
            check(b, want_buffers[k], buffers64[k], f"step {i} {k}", dtype)


def check(actual, expected, ref64, name, dtype):
    if dtype == torch.float64 or not actual.is_floating_point():
        torch.testing.assert_close(actual, expected, **TOL64, msg=lambda m: f"{name}: {m}")
    else:
        # float32 through convolutions and several BatchNorms: eager's own
        # error is far above one op's tight tolerance, so the 2x-eager rule.
        assert_close(actual, expected, ref64, name=name, vs64=True)
