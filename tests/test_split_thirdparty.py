"""A third-party-style mini zoo (written the way popular model repositories write
them: in-place activations, chunk/split, channel shuffles, SE/SK/split-attention,
dense concatenation, inception branches) through trace / manual_plan / execute with
1 tile, 2x2, 4x3, row ratios and multi-cut mixed plans at odd, non-square sizes, with
randomised BN statistics: exact, no meshdl errors, attention models tiled end to end."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import meshdl
from meshdl.models.se_nets import V3Block


def bn(c):
    return nn.BatchNorm2d(c)


def cbr(i, o, k=3, s=1, g=1, act=None):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), bn(o),
                         act or nn.ReLU(inplace=True))


def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleV2Unit(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        half = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(inp, inp, 3, stride, 1, groups=inp,
                                                   bias=False), bn(inp),
                                         nn.Conv2d(inp, half, 1, bias=False), bn(half),
                                         nn.ReLU(inplace=True))
        b2_in = inp if stride > 1 else half
        self.branch2 = nn.Sequential(cbr(b2_in, half, 1),
                                     nn.Conv2d(half, half, 3, stride, 1, groups=half,
                                               bias=False), bn(half), cbr(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class SKUnit(nn.Module):
    def __init__(self, c, r=2):
        super().__init__()
        self.convs = nn.ModuleList([cbr(c, c, 3, g=2), nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 2, dilation=2, groups=2, bias=False), bn(c),
            nn.ReLU(inplace=True))])
        self.fc = nn.Linear(c, c // r)
        self.fcs = nn.ModuleList([nn.Linear(c // r, c) for _ in range(2)])

    def forward(self, x):
        feats = torch.stack([conv(x) for conv in self.convs], dim=1)
        u = feats.sum(dim=1)
        z = F.relu(self.fc(u.mean(-1).mean(-1) if False else u.mean((2, 3))))
        att = torch.stack([fc(z) for fc in self.fcs], dim=1).softmax(dim=1)
        att = att.unsqueeze(-1).unsqueeze(-1)
        return (feats * att).sum(dim=1) + x


class SplitAttention(nn.Module):
    """ResNeSt's split-attention conv (radix 2, cardinality 1) with rSoftMax."""

    def __init__(self, c, radix=2):
        super().__init__()
        self.radix, self.c = radix, c
        self.conv = nn.Conv2d(c, c * radix, 3, 1, 1, groups=radix, bias=False)
        self.bn0 = bn(c * radix)
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.bn1 = bn(c // 2)
        self.fc2 = nn.Conv2d(c // 2, c * radix, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(x)), inplace=True)
        batch = x.size(0)
        s0, s1 = torch.split(x, x.size(1) // self.radix, dim=1)   # radix 2, fx-traceable
        gap = s0 + s1
        gap = F.adaptive_avg_pool2d(gap, 1)
        gap = F.relu(self.bn1(self.fc1(gap)))
        atten = self.fc2(gap).view(batch, 1, self.radix, -1).transpose(1, 2)
        atten = F.softmax(atten, dim=1).reshape(batch, -1).view(batch, -1, 1, 1)
        a0, a1 = torch.split(atten, x.size(1) // self.radix, dim=1)
        return a0 * s0 + a1 * s1


class SEBasicBlock(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), bn(c)
        self.relu = nn.ReLU(inplace=True)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(inplace=True),
                                nn.Linear(c // r, c), nn.Sigmoid())

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        b, c, _, _ = out.size()
        y = self.fc(self.avg(out).view(b, c)).view(b, c, 1, 1)
        out = out * y.expand_as(out) if False else out * y
        out += identity
        return self.relu(out)


class CBAM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, c // 2), nn.ReLU(),
                                 nn.Linear(c // 2, c))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        avg = self.mlp(F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3))))
        mx = self.mlp(F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3))))
        x = x * torch.sigmoid(avg + mx).unsqueeze(2).unsqueeze(3)
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), 1)
        return x * torch.sigmoid(self.spatial(pooled))


class DenseBlock(nn.Module):
    def __init__(self, c, growth=6, n=3):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(bn(c + i * growth), nn.ReLU(inplace=True),
                                                   nn.Conv2d(c + i * growth, growth, 3, 1, 1))
                                     for i in range(n)])
        self.out = c + n * growth

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class Inception(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.b1 = cbr(c, 8, 1)
        self.b2 = nn.Sequential(cbr(c, 6, 1), cbr(6, 8, 3))
        self.b3 = nn.Sequential(cbr(c, 4, 1), cbr(4, 6, 3), cbr(6, 6, 3))
        self.b4 = cbr(c, 6, 1)

    def forward(self, x):
        pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(pool)], 1)


class Net(nn.Module):
    """stem -> body -> global pool -> linear, like the repositories' models."""

    def __init__(self, body: nn.Module, c_body: int, c_out: int, stem: int = 16):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, stem, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.adapt = cbr(stem, c_body, 1) if stem != c_body else nn.Identity()
        self.body = body
        self.fc = nn.Linear(c_out, 10)

    def forward(self, x):
        x = self.body(self.adapt(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def darknet():
    leaky = lambda: nn.LeakyReLU(0.1, inplace=True)   # noqa: E731

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = cbr(c, c // 2, 1, act=leaky()), cbr(c // 2, c, 3, act=leaky())

        def forward(self, x):
            return x + self.b(self.a(x))

    body = nn.Sequential(cbr(16, 32, 3, 2, act=leaky()), Res(32), Res(32),
                         cbr(32, 32, 3, 1, act=leaky()))
    return Net(body, 16, 32)


ZOO = {
    "shufflenet": lambda: Net(nn.Sequential(ShuffleV2Unit(16, 32, 2), ShuffleV2Unit(32, 32, 1),
                                            ShuffleV2Unit(32, 32, 1)), 16, 32),
    "sknet": lambda: Net(nn.Sequential(SKUnit(16), cbr(16, 24, 3, 2), SKUnit(24)), 16, 24),
    "resnest": lambda: Net(nn.Sequential(SplitAttention(16), cbr(16, 16, 3, 2),
                                         SplitAttention(16)), 16, 16),
    "darknet": darknet,
    "se_resnet": lambda: Net(nn.Sequential(SEBasicBlock(16), SEBasicBlock(16)), 16, 16),
    "cbam": lambda: Net(nn.Sequential(cbr(16, 16), CBAM(16), cbr(16, 16, 3, 2), CBAM(16)),
                        16, 16),
    "densenet": lambda: Net(nn.Sequential(DenseBlock(16), nn.Conv2d(34, 16, 1),
                                          nn.AvgPool2d(2), DenseBlock(16)), 16, 34),
    "inception": lambda: Net(nn.Sequential(Inception(16), Inception(28)), 16, 28),
    "mobilenetv3_block": lambda: Net(nn.Sequential(
        V3Block(16, 3, 64, 24, True, "HS", 2), V3Block(24, 5, 72, 24, True, "HS", 1),
        V3Block(24, 3, 72, 24, False, "RE", 1)), 16, 24),
}
ATTENTION = {"sknet", "resnest", "se_resnet", "cbam", "mobilenetv3_block"}
SIZES = {"shufflenet": (96, 131), "sknet": (113, 97), "resnest": (96, 96),
         "darknet": (131, 99), "se_resnet": (97, 128), "cbam": (100, 115),
         "densenet": (96, 101), "inception": (99, 96), "mobilenetv3_block": (120, 97)}


def build(name: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(sum(map(ord, name)))
    m = ZOO[name]()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.2)
    return m.eval().to(dtype)


def plans(g):
    n = len(g.cut_points)
    few = sorted({n // 4, n // 2, (3 * n) // 4}) if n >= 3 else list(range(n))
    return {
        "1 tile": dict(grids=[(1, 1)]),
        "2x2": dict(grids=[(2, 2)]),
        "4x3": dict(grids=[(4, 3)]),
        "rows 5:3:2:1": dict(row_ratios=[[5, 3, 2, 1]]),
        "cuts + mixed": dict(cuts=few, grids=[(2, 2), (3, 1), (1, 3), (2, 1)][:len(few) + 1]),
    }


@pytest.mark.parametrize("name", list(ZOO))
def test_thirdparty_style_model_is_exact_under_every_plan(name):
    m = build(name)
    h, w = SIZES[name]
    shape = (1, 3, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error", meshdl.SplitWarning)   # nothing here runs whole
        g = meshdl.trace(m, shape, name=name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = m(x.clone())
    bound = 1e-4 * ref.abs().max().item()
    for label, spec in plans(g).items():
        y = meshdl.execute(meshdl.manual_plan(g, **spec), g, x.clone())
        diff = (y - ref).abs().max().item()
        assert diff <= bound, f"{name} {label}: max diff {diff:.3g} > {bound:.3g}"
    share = g.tiled_flops() / g.flops
    plan = meshdl.manual_plan(g, grids=[(2, 2)])
    tiled = sum(g.flops_between(s.start, s.end) for s in plan.stages if s.tiled) / g.flops
    assert tiled == pytest.approx(share)
    assert share >= 0.9, f"{name}: only {100 * share:.1f}% of FLOPs tiled"
    if name in ATTENTION:
        assert any(s.reduces for s in plan.stages), f"{name}: no reduce point"


@pytest.mark.parametrize("name", ["darknet", "se_resnet", "sknet"])
def test_thirdparty_style_model_is_exact_in_float64(name):
    m = build(name, torch.float64)
    shape = (1, 3, 99, 107)
    g = meshdl.trace(m, shape, name=name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ref = m(x.clone())
    for spec in (dict(grids=[(4, 3)]), dict(row_ratios=[[2, 1, 1]])):
        y = meshdl.execute(meshdl.manual_plan(g, **spec), g, x.clone())
        assert (y - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()


def test_se_zoo_model_tiles_at_least_90_percent_in_one_2x2_stage():
    name = "mobilenet_v3_small"
    m = meshdl.models.build(name)
    shape = (1, 3, 128, 112)
    g = meshdl.trace(m, shape, name=name)
    plan = meshdl.manual_plan(g, grids=[(2, 2)])
    tiled = sum(g.flops_between(s.start, s.end) for s in plan.stages if s.tiled) / g.flops
    assert tiled >= 0.9
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
    y = meshdl.execute(plan, g, x)
    assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
