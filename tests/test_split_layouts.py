"""Channels-last (N, H, W, C) blocks: the split engine follows where H and W are through
permutes and transposes. ConvNeXt-style blocks (LayerNorm / Linear / GELU / per-channel
scale over C in NHWC) tile exactly; ops that read across the moved H or W run whole
with a SplitWarning; never an error, never a wrong answer."""
from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import meshdl
from meshdl.errors import SplitWarning
from meshdl.graph.plan import Plan

SHAPE = (1, 3, 20, 24)


def _plans(g):
    plans = [dict(cuts=[], grids=[(1, 1)]), dict(cuts=[], grids=[(2, 2)]),
             dict(cuts=[], grids=[(3, 2)]), dict(cuts=[], row_ratios=[[3, 2, 1]])]
    n = len(g.cut_points)
    if n >= 2:   # multi-cut plans, some cuts inside the channels-last part
        plans.append(dict(cuts=[0, n - 1], grids=[(2, 1), (2, 2), (1, 3)]))
        for c in range(n):
            plans.append(dict(cuts=[c], grids=[(2, 2), (3, 1)]))
    return plans


def worst_error(model, shape=SHAPE, plans=None):
    model = model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = meshdl.trace(model, shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x.clone())
    worst = 0.0
    for spec in plans or _plans(g):
        plan = meshdl.manual_plan(g, **spec)
        plan = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
        y = meshdl.execute(plan, g, x.clone())
        assert y.shape == ref.shape, spec
        worst = max(worst, (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12))
    split_warnings = [w for w in caught if issubclass(w.category, SplitWarning)]
    return worst, g, split_warnings


class HandLayerNormNHWC(nn.Module):       # the report's repro, LayerNorm written out
    def __init__(s):
        super().__init__()
        s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        s.w, s.b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))

    def forward(s, x):
        y = s.c1(x).permute(0, 2, 3, 1)
        mu = y.mean(-1, keepdim=True)
        var = ((y - mu) ** 2).mean(-1, keepdim=True)
        y = (y - mu) / torch.sqrt(var + 1e-6) * s.w + s.b
        return s.c2(y.permute(0, 3, 1, 2))


class LayerNormNHWC(nn.Module):           # the report's repro with nn.LayerNorm
    def __init__(s):
        super().__init__()
        s.c1, s.ln, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8), \
            nn.Conv2d(8, 8, 3, padding=1)

    def forward(s, x):
        return s.c2(s.ln(s.c1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class ConvNeXtBlock(nn.Module):           # dwconv -> NHWC LN -> pointwise MLP -> scale
    def __init__(s, c=8):
        super().__init__()
        s.stem = nn.Conv2d(3, c, 3, padding=1)
        s.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        s.ln = nn.LayerNorm(c, eps=1e-6)
        s.fc1, s.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        s.gamma = nn.Parameter(torch.rand(c) + 0.5)
        s.head = nn.Conv2d(c, 4, 3, stride=2, padding=1)

    def forward(s, x):
        x = s.stem(x)
        y = s.dw(x).permute(0, 2, 3, 1)
        y = s.fc2(F.gelu(s.fc1(s.ln(y)))) * s.gamma
        return s.head(x + y.permute(0, 3, 1, 2))


class TransposeNWHC(nn.Module):           # transpose(1, 3): (N, W, H, C)
    def __init__(s):
        super().__init__()
        s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        s.ln = nn.LayerNorm(8)
        s.fc = nn.Linear(8, 8)
        s.bias = nn.Parameter(torch.randn(1, 1, 1, 8))

    def forward(s, x):
        y = s.c1(x).transpose(1, 3)
        y = F.silu(s.fc(s.ln(y))) + s.bias
        y = torch.softmax(y, dim=-1) * y
        return s.c2(y.transpose(1, 3))


class ReadsAcrossMovedH(nn.Module):       # softmax over H in NHWC: must run whole
    def __init__(s):
        super().__init__()
        s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(s, x):
        y = s.c1(x).permute(0, 2, 3, 1)
        y = torch.softmax(y, dim=1) + y.cumsum(2)
        return s.c2(y.permute(0, 3, 1, 2))


class MergesHW(nn.Module):                # NHWC then a reshape merging H, W (tokens)
    def __init__(s):
        super().__init__()
        s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        s.fc = nn.Linear(8, 8)

    def forward(s, x):
        y = s.c1(x)
        n, c, h, w = y.shape
        t = s.fc(y.flatten(2).transpose(1, 2))            # (N, HW, C)
        t = t - t.mean(1, keepdim=True)                    # mixes tokens
        return s.c2(t.transpose(1, 2).reshape(n, c, h, w))


class CatAndSliceNHWC(nn.Module):         # concatenation and slicing along C in NHWC
    def __init__(s):
        super().__init__()
        s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        s.fc = nn.Linear(8, 4)

    def forward(s, x):
        y = s.c1(x).permute(0, 2, 3, 1)
        y = torch.cat([y[..., :4] * 2.0, F.gelu(s.fc(y))], dim=-1)
        y = torch.cat((y[:, :, :, 4:], y[..., 0:4]), 3)
        return s.c2(y.permute(0, 3, 1, 2))


TILE = [HandLayerNormNHWC, LayerNormNHWC, ConvNeXtBlock, TransposeNWHC, CatAndSliceNHWC]


@pytest.mark.parametrize("cls", TILE, ids=lambda c: c.__name__)
def test_channels_last_blocks_tile_exactly(cls):
    torch.manual_seed(0)
    worst, g, warned = worst_error(cls())
    assert worst <= 1e-4, f"{cls.__name__}: max|diff| / max|out| = {worst}"
    assert not warned, [str(w.message) for w in warned]
    assert all(op.spatial for op in g.ops), [op.name for op in g.ops if not op.spatial]
    assert g.tiled_flops() == pytest.approx(g.flops)
    # channels-last tensors exist inside the block but never bound a tiled stage
    assert any(len(op.out_shape) == 4 and op.hw != (2, 3) for op in g.ops)
    for p in [p for p in g.positions if len(g.tensor_shape(p)) == 4 and not g.is_map(p)]:
        assert not any(p in (a, b) for a, b in g.spatial_runs)


@pytest.mark.parametrize("cls", [ReadsAcrossMovedH, MergesHW], ids=lambda c: c.__name__)
def test_ops_across_moved_axes_run_whole_exactly(cls):
    torch.manual_seed(0)
    worst, g, warned = worst_error(cls())
    assert worst <= 1e-4, f"{cls.__name__}: max|diff| / max|out| = {worst}"
    assert warned, "an op reading across H or W of a moved map must warn"
    assert any(not op.spatial for op in g.ops)


class PermuteThenLN(nn.Module):
    """Any permutation of (N, C, H, W), LayerNorm and Linear over the last dim, back."""

    def __init__(s, perm, c=6):
        super().__init__()
        s.perm, s.inv = perm, tuple(perm.index(i) for i in range(4))
        s.c1, s.c2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 5, 3, padding=1)
        last = (1, c, 12, 10)[perm[-1]]
        s.ln, s.fc = nn.LayerNorm(last), nn.Linear(last, last)

    def forward(s, x):
        y = s.c1(x).permute(*s.perm)
        y = F.gelu(s.fc(s.ln(y)))
        return s.c2(y.permute(*s.inv))


@pytest.mark.parametrize("perm", list(itertools.permutations(range(4))), ids=str)
def test_every_permutation_is_exact(perm):
    torch.manual_seed(1)
    plans = [dict(cuts=[], grids=[(2, 2)]), dict(cuts=[], row_ratios=[[1, 2]])]
    worst, g, warned = worst_error(PermuteThenLN(perm), shape=(1, 3, 12, 10), plans=plans)
    assert worst <= 1e-4, f"perm {perm}: {worst}"
    spatial_last = perm[-1] in (2, 3)        # LN/Linear read across H or W
    assert bool(warned) == spatial_last, (perm, [str(w.message) for w in warned])


class AcrossHThenChannelBias(nn.Module):   # a whole op in NHWC, then a per-channel bias
    def __init__(s):
        super().__init__()
        s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        s.b = nn.Parameter(torch.randn(8))

    def forward(s, x):
        y = torch.softmax(s.c1(x).permute(0, 2, 3, 1), dim=2)     # over W
        return s.c2((F.gelu(y) + s.b).permute(0, 3, 1, 2))


class WidthVector(nn.Module):              # NCHW times a 1-D constant along W
    def __init__(s):
        super().__init__()
        s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        s.v = nn.Parameter(torch.randn(SHAPE[-1]))

    def forward(s, x):
        return s.c2(s.c1(x) * s.v)


@pytest.mark.parametrize("cls", [AcrossHThenChannelBias, WidthVector],
                         ids=lambda c: c.__name__)
def test_constants_along_moved_or_spatial_axes_are_exact(cls):
    torch.manual_seed(2)
    worst, g, warned = worst_error(cls())
    assert worst <= 1e-4, f"{cls.__name__}: {worst}"
    assert warned
    assert g.ops[0].spatial and g.ops[-1].spatial      # both convs still tile


@pytest.mark.parametrize("cls", [HandLayerNormNHWC, LayerNormNHWC, ConvNeXtBlock,
                                 TransposeNWHC], ids=lambda c: c.__name__)
def test_channels_last_onnx_below_opset_17_tiles_exactly(cls, tmp_path):
    """LayerNorm exported at opset < 17 is decomposed (ReduceMean, Sub, Pow, ...)."""
    from model_zoo_user import export_onnx
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(SHAPE)
    path = tmp_path / "nhwc.onnx"
    export_onnx(model, x, path, opset=13)
    lm = meshdl.models.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = lm.trace()
    assert not [w for w in caught if issubclass(w.category, SplitWarning)]
    with torch.no_grad():
        ref = model(x)
    for spec in _plans(g):
        y = meshdl.execute(meshdl.manual_plan(g, **spec), g, x)
        assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), spec


def _block_ops(c):
    """(name, reads across H or W in NHWC, module factory) of channels-last steps."""
    return [
        ("ln", False, lambda: nn.LayerNorm(c)),
        ("fc", False, lambda: nn.Linear(c, c)),
        ("gelu", False, lambda: nn.GELU()),
        ("scale", False, lambda: _Fn(lambda s, y: y * s.p, torch.randn(c))),
        ("softmax_c", False, lambda: _Fn(lambda s, y: torch.softmax(y, -1) + y)),
        ("center_c", False, lambda: _Fn(lambda s, y: y - y.mean(-1, keepdim=True))),
        ("softmax_h", True, lambda: _Fn(lambda s, y: torch.softmax(y, 1) * y)),
        ("cumsum_w", True, lambda: _Fn(lambda s, y: y.cumsum(2))),
        ("cat_w", True, lambda: _Fn(lambda s, y: torch.cat([y[:, :, 1:], y[:, :, :1]], 2))),
        ("roll_c", False, lambda: _Fn(lambda s, y: torch.cat([y[..., 1:], y[..., :1]], -1))),
    ]


class _Fn(nn.Module):
    def __init__(s, fn, p=None):
        super().__init__()
        s.fn = fn
        s.p = nn.Parameter(p) if p is not None else None

    def forward(s, y):
        return s.fn(s, y)


class RandomNHWCBlock(nn.Module):
    def __init__(s, steps, c=6):
        super().__init__()
        table = {n: f for n, _, f in _block_ops(c)}
        s.c1, s.c2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 4, 3, padding=1)
        s.steps = nn.ModuleList(table[n]() for n in steps)

    def forward(s, x):
        y = s.c1(x).permute(0, 2, 3, 1)
        for m in s.steps:
            y = m(y)
        return s.c2(y.permute(0, 3, 1, 2))


def test_random_channels_last_blocks_are_exact():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    names = [n for n, _, _ in _block_ops(6)]
    across = {n for n, a, _ in _block_ops(6) if a}

    @hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.sampled_from(names), min_size=1, max_size=4))
    def check(steps):
        torch.manual_seed(len(steps))
        plans = [dict(cuts=[], grids=[(2, 2)]), dict(cuts=[], grids=[(3, 1)])]
        worst, g, warned = worst_error(RandomNHWCBlock(steps), shape=(1, 3, 11, 13),
                                       plans=plans)
        assert worst <= 1e-4, (steps, worst)
        assert bool(warned) == bool(set(steps) & across), steps
    check()


@pytest.mark.parametrize("cls", [ConvNeXtBlock, TransposeNWHC], ids=lambda c: c.__name__)
def test_every_strategy_plans_channels_last_models_exactly(cls):
    """Planners choose cuts by themselves, channels-last positions included."""
    from pathlib import Path
    mesh = meshdl.load_topology(Path(__file__).resolve().parent.parent / "topologies"
                                / "home-4.yaml")
    torch.manual_seed(0)
    model = cls().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = meshdl.trace(model, (1, 3, 48, 40))
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        ref = model(x)
    for name in meshdl.strategies():
        res = meshdl.plan(g, mesh, strategy=name)
        plan = getattr(res, "plan", res)
        y = meshdl.execute(plan, g, x)
        assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), name


class FunctionalPerChannel(nn.Module):
    """F.batch_norm and F.prelu (the forms .pt2 graphs and ONNX imports produce): their
    vectors index C (dim 1), so they tile, even when W happens to equal C."""

    def __init__(s):
        super().__init__()
        s.c1, s.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        s.register_buffer("mean", torch.randn(8))
        s.register_buffer("var", torch.rand(8) + 0.5)
        s.w, s.b, s.a = (nn.Parameter(torch.randn(8)) for _ in range(3))

    def forward(s, x):
        y = F.batch_norm(s.c1(x), s.mean, s.var, s.w, s.b, False, 0.0, 1e-5)
        return s.c2(F.prelu(y, s.a))


def test_functional_per_channel_ops_tile_exactly():
    worst, g, warned = worst_error(FunctionalPerChannel(), shape=(1, 3, 17, 8))
    assert worst <= 1e-4 and not warned and all(op.spatial for op in g.ops)
