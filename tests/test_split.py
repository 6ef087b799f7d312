"""The split engine's promise: any plan computes what the unsplit model computes."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import meshdl
from meshdl import PlanError, Region, TraceError
from meshdl.errors import SplitWarning
from meshdl.graph import make_stage, split_ratio
from meshdl.graph.model_graph import REDUCE
from meshdl.graph.plan import Plan


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return (y - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1e-6)


# ----- random spatial networks -------------------------------------------------------

def _out(n, k, s, p, d=1, ceil=False):
    span = n + 2 * p - d * (k - 1) - 1
    if span < 0:
        return 0
    o = -(-span // s) + 1 if ceil else span // s + 1
    if ceil and (o - 1) * s >= n + p:
        o -= 1
    return o


class RandomNet(nn.Module):
    """A DAG of spatial ops described by ``specs`` (static Python: fx unrolls it)."""

    def __init__(self, specs, c_in):
        super().__init__()
        self.specs = specs
        self.layers = nn.ModuleList()
        c = c_in
        for spec in specs:
            kind = spec[0]
            if kind == "conv":
                _, co, k, s, p, d, g = spec
                self.layers.append(nn.Conv2d(c, co * g, k, s, p, d, groups=g))
                c = co * g
            elif kind == "res":      # x + conv(x), shape preserving
                _, k, d = spec
                self.layers.append(nn.Conv2d(c, c, k, 1, d * (k - 1) // 2, d, groups=c))
            elif kind == "cat":      # cat([x, bn(relu(conv1x1(x)))])
                self.layers.append(nn.Sequential(nn.Conv2d(c, 2, 1), nn.ReLU(),
                                                 nn.BatchNorm2d(2)))
                c += 2
            elif kind == "max":
                _, k, s, p, ceil = spec
                self.layers.append(nn.MaxPool2d(k, s, p, ceil_mode=ceil))
            elif kind == "avg":
                _, k, s, p, ceil, cip = spec
                self.layers.append(nn.AvgPool2d(k, s, p, ceil_mode=ceil,
                                                count_include_pad=cip))
            elif kind == "pad":
                self.layers.append(nn.ZeroPad2d(spec[1]))
            elif kind == "inplace":       # in-place activations, x.add_(), x += ...
                self.layers.append(nn.ModuleList([
                    nn.Conv2d(c, c, 3, padding=1),
                    [nn.LeakyReLU(0.1, inplace=True), nn.Identity(),
                     nn.Hardswish(inplace=True)][spec[1]]]))
            elif kind == "split":         # tuple ops along channels
                self.layers.append(nn.Conv2d(c // 2, c // 2, 3, padding=1))
                c += 1
            elif kind == "shuffle":
                self.layers.append(nn.Identity())
            elif kind == "se":            # squeeze-and-excitation (avg or max, two gates)
                sq = max(1, c // 2)
                self.layers.append(nn.Sequential(nn.Conv2d(c, sq, 1), nn.ReLU(inplace=True),
                                                 nn.Conv2d(sq, c, 1)))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        self.eval()

    def forward(self, x):
        for spec, layer in zip(self.specs, self.layers):
            kind = spec[0]
            if kind == "res":
                x = F.relu(x + layer(x))
            elif kind == "cat":
                x = torch.cat([x, layer(x)], dim=1)
            elif kind == "conv":
                x = F.relu6(layer(x))
            elif kind == "inplace":
                conv, act = layer
                z = conv(x)                   # reads x before it is mutated
                if spec[1] == 1:
                    x.add_(1.0)
                    x = F.leaky_relu(x, 0.2, inplace=True)
                else:
                    x = act(x)
                    x += 0.5
                x = x + z
            elif kind == "split":
                c = x.shape[1]
                a, b = x.split([c // 2, c - c // 2], dim=1)
                v, _ = torch.max(x, 1, keepdim=True)
                x = torch.cat([b, layer(a), v], 1)
            elif kind == "shuffle":
                n, c, h, w = x.size()
                x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
            elif kind == "se":
                pooled = (F.adaptive_avg_pool2d(x, 1) if spec[1] == 0
                          else x.amax(dim=(2, 3), keepdim=True))
                gate = layer(pooled)
                x = x * (torch.sigmoid(gate) if spec[1] == 0 else F.hardsigmoid(gate))
            else:
                x = layer(x)
        return x


EXTRA_KINDS = ["inplace", "split", "shuffle", "se"]


@st.composite
def random_net(draw, extra: bool = False):
    h, w = draw(st.integers(9, 30)), draw(st.integers(9, 30))
    specs, c = [], 3
    kinds = ["conv", "res", "cat", "max", "avg", "pad"] + (EXTRA_KINDS * 2 if extra else [])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(kinds))
        if kind in EXTRA_KINDS:
            if (kind == "split" and c < 2) or (kind == "shuffle" and c % 2):
                continue
            spec = (kind, draw(st.integers(0, 2 if kind == "inplace" else 1)))
            specs.append(spec)
            c = c + 1 if kind == "split" else c
            continue
        if kind == "conv":
            k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
            p = draw(st.integers(0, (d * (k - 1)) // 2 + 1))
            groups = draw(st.sampled_from([1, 2])) if c % 2 == 0 else 1
            spec = ("conv", draw(st.integers(1, 3)), k, s, p, d, groups)
            h2, w2 = _out(h, k, s, p, d), _out(w, k, s, p, d)
        elif kind == "res":
            k = draw(st.sampled_from([1, 3, 5]))
            spec, h2, w2 = ("res", k, draw(st.integers(1, 2))), h, w
        elif kind == "cat":
            spec, h2, w2 = ("cat",), h, w
        elif kind in ("max", "avg"):
            k = draw(st.integers(1, 4))
            s, p, ceil = draw(st.integers(1, 3)), draw(st.integers(0, k // 2)), draw(st.booleans())
            spec = ("max", k, s, p, ceil) if kind == "max" else ("avg", k, s, p, ceil,
                                                                  draw(st.booleans()))
            h2, w2 = _out(h, k, s, p, 1, ceil), _out(w, k, s, p, 1, ceil)
        else:
            pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
            spec, h2, w2 = ("pad", pads), h + pads[2] + pads[3], w + pads[0] + pads[1]
        if h2 < 1 or w2 < 1:
            continue
        specs.append(spec)
        h, w = h2, w2
        c = spec[1] * spec[6] if kind == "conv" else c + 2 if kind == "cat" else c
    assume(specs)
    return specs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=random_net(extra=True), data=st.data())
def test_random_net_with_inplace_tuple_shuffle_se_equals_unsplit(specs, data):
    """In-place activations, tuple ops, channel shuffles and SE blocks (reduce points)
    tile end to end and stay exact under any grid, row ratios and cuts."""
    torch.manual_seed(0)
    net = RandomNet(specs, 3)
    shape = (1, 3, data.draw(st.integers(9, 30)), data.draw(st.integers(9, 30)))
    x = torch.randn(shape)
    try:
        ref = net(x.clone())
    except RuntimeError:
        assume(False)
    g = meshdl.trace(net, shape)
    # nothing runs whole, except a pool that covers the whole last map: that is a
    # global reduction ending the model, run on the gathered map like a classifier's
    end = len(g.ops)
    while end > 0 and g.roles[end - 1] == REDUCE:
        end -= 1
    assert end > 0 and g.spatial_runs == [(0, end)], specs
    cuts = sorted(data.draw(st.sets(st.integers(0, max(0, len(g.cut_points) - 1)),
                                    max_size=2))) if g.cut_points else []
    bounds = [0, *(g.cut_points[c] for c in cuts), len(g.ops)]
    if data.draw(st.booleans()):
        spec = dict(grids=[data.draw(tiles_for(g.tensor_shape(b))) for b in bounds[1:]])
    else:
        spec = dict(row_ratios=[data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)
                                          .filter(any)) for _ in bounds[1:]])
    plan = meshdl.manual_plan(g, cuts=cuts, **spec)
    y = meshdl.execute(plan, g, x.clone())
    assert y.shape == ref.shape
    assert close(y, ref), (specs, cuts, spec, (y - ref).abs().max().item())


@st.composite
def tiles_for(draw, shape):
    h, w = shape[-2:]
    rows = draw(st.integers(1, min(h, 4)))
    cols = draw(st.integers(1, min(w, 4)))
    return rows, cols


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=random_net(), data=st.data())
def test_random_spatial_net_any_grid_equals_unsplit(specs, data):
    torch.manual_seed(0)
    net = RandomNet(specs, 3)
    shape = (1, 3, data.draw(st.integers(9, 30)), data.draw(st.integers(9, 30)))
    try:
        ref = net(torch.randn(shape))
    except RuntimeError:
        assume(False)
    x = torch.randn(shape)
    ref = net(x)
    g = meshdl.trace(net, shape)
    # a pool whose window covers its whole input map is a global reduction: it ends the
    # spatial run (exactly) instead of tiling; every other op of these nets tiles
    assert all(op.spatial or op.out_shape[-2:] == (1, 1) for op in g.ops)
    cuts = sorted(data.draw(st.sets(st.integers(0, max(0, len(g.cut_points) - 1)),
                                    max_size=2))) if g.cut_points else []
    bounds = [0, *(g.cut_points[c] for c in cuts), len(g.ops)]
    grids = [data.draw(tiles_for(g.tensor_shape(b))) for b in bounds[1:]]
    plan = meshdl.manual_plan(g, cuts=cuts, grids=grids)
    y = meshdl.execute(plan, g, x)
    assert y.shape == ref.shape
    assert close(y, ref), (specs, cuts, grids, (y - ref).abs().max().item())


@settings(max_examples=40, deadline=None)
@given(specs=random_net(), data=st.data())
def test_random_tile_needs_exactly_its_region(specs, data):
    """Any single tile computed from just its input region equals that crop."""
    net = RandomNet(specs, 3)
    shape = (1, 3, 24, 27)
    try:
        ref = net(torch.zeros(shape))
    except RuntimeError:
        assume(False)
    x = torch.randn(shape)
    ref = net(x)
    g = meshdl.trace(net, shape)
    h, w = ref.shape[-2:]
    h0 = data.draw(st.integers(0, h - 1))
    w0 = data.draw(st.integers(0, w - 1))
    r = Region(h0, data.draw(st.integers(h0 + 1, h)), w0, data.draw(st.integers(w0 + 1, w)))
    ir = g.input_region(0, len(g.ops), r)
    y = g.run_range(0, len(g.ops), x[..., ir.h0:ir.h1, ir.w0:ir.w1], ir, r)
    assert close(y, ref[..., r.h0:r.h1, r.w0:r.w1])


def test_split_ratio_sums_and_respects_ratios():
    assert split_ratio(224, [9, 8, 7, 6, 4, 2]) == [56, 50, 44, 37, 25, 12]
    assert sum(split_ratio(224, [9, 8, 7, 6, 4, 2])) == 224
    assert split_ratio(7, [9, 8, 7, 6, 4, 2]) == [2, 1, 1, 1, 1, 1]
    with pytest.raises(PlanError, match="cannot each get a row"):
        split_ratio(3, [1, 1, 1, 1])


# ----- ops that cannot be split, models that cannot be traced ------------------------

class WithUnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.odd = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.odd(self.a(x))))


def test_unsplittable_op_runs_whole_with_a_warning_naming_it():
    m = WithUnknownOp().eval()
    with pytest.warns(SplitWarning, match="odd"):
        g = meshdl.trace(m, (1, 3, 16, 16))
    assert [op.name for op in g.ops if not op.spatial] == ["odd"]
    plan = meshdl.manual_plan(g, cuts=[], grids=[(2, 2)])
    assert any("odd" in n for n in plan.notes)
    x = torch.randn(1, 3, 16, 16)
    assert close(meshdl.execute(plan, g, x), m(x))
    assert [len(s.tasks) for s in plan.stages] == [4, 1, 4]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.c(x)
        return x


def test_untraceable_model_error_names_the_construct():
    with pytest.raises(TraceError, match=r"x\.sum\(\) > 0|control flow"):
        meshdl.trace(Untraceable(), (1, 3, 8, 8))


def _simple():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 4, 3, padding=1)).eval()
    return m, meshdl.trace(m, (1, 3, 12, 12))


def test_bad_tiles_are_refused_with_clear_messages():
    _, g = _simple()
    end = len(g.ops)
    cases = {
        "outside": [(Region(0, 7, 0, 6), "d0")],
        "empty": [(Region(0, 0, 0, 6), "d0"), (Region(0, 6, 0, 6), "d1")],
        "overlap": [(Region(0, 4, 0, 6), "d0"), (Region(3, 6, 0, 6), "d1")],
        "missing": [(Region(0, 3, 0, 6), "d0"), (Region(4, 6, 0, 6), "d1")],
    }
    for word, tiles in cases.items():
        with pytest.raises(PlanError, match=word):
            make_stage(g, 0, 0, end, tiles)
    shrunk = meshdl.manual_plan(g, grids=[(7, 1)])       # 6 output rows: grid shrinks
    assert len(shrunk.stages[0].tasks) == 6 and "does not fit" in shrunk.notes[0]
    with pytest.raises(PlanError, match="index g.cut_points"):
        meshdl.manual_plan(g, cuts=[99])
    with pytest.raises(PlanError, match="one per stage"):
        meshdl.manual_plan(g, cuts=[0], grids=[(1, 1)])


def test_hand_edited_plan_is_checked_before_running():
    m, g = _simple()
    plan = meshdl.manual_plan(g, grids=[(2, 1)])
    d = plan.to_dict()
    d["stages"][0]["tasks"][1]["out_region"] = [2, 6, 0, 6]     # now overlaps tile 0
    with pytest.raises(PlanError, match="overlap"):
        meshdl.execute(Plan.from_dict(d), g, torch.randn(1, 3, 12, 12))
    d = plan.to_dict()
    d["stages"][0]["tasks"][1]["in_region"] = [5, 12, 0, 12]    # too small a halo
    with pytest.raises(PlanError, match="needs"):
        meshdl.execute(Plan.from_dict(d), g, torch.randn(1, 3, 12, 12))


def test_plan_round_trips_as_plain_data():
    import json
    _, g = _simple()
    plan = meshdl.manual_plan(g, cuts=[0], grids=[(2, 2), (1, 3)])
    d = json.loads(json.dumps(plan.to_dict()))
    assert Plan.from_dict(d).to_dict() == plan.to_dict()
    with pytest.raises(PlanError, match="version"):
        Plan.from_dict({**d, "version": 99})


def test_graph_facts_for_a_known_net():
    m, g = _simple()
    conv = g.ops[0]
    assert conv.kind == "conv2d" and conv.out_shape == (1, 4, 12, 12)
    assert conv.flops == 2 * 4 * 12 * 12 * 3 * 9
    assert conv.weight_bytes == (4 * 3 * 9 + 4) * 4
    assert g.cut_points == [1, 2, 3]
    assert g.spatial_runs == [(0, 4)]
    r = Region(0, 2, 0, 6)
    # output rows [0,2) <- conv3x3/p1: pool rows [0,3) <- pool 2/2: rows [0,6)
    # <- conv3x3/p1: input rows [0,7) (the halo row 6; row -1 is border padding)
    assert g.input_region(0, 4, r) == Region(0, 7, 0, 12)
    assert g.tile_flops(0, 4, Region.full(g.output_shape)) == pytest.approx(g.flops)


class NegativeAndValuedPads(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.p = nn.ZeroPad2d((-1, 2, 1, -2))         # crops one side, pads the other
        self.c2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.c2(F.pad(self.p(self.c(x)), (2, -1, -1, 3), value=0.5))


def test_negative_and_valued_padding_split_exactly():
    m = NegativeAndValuedPads().eval()
    g = meshdl.trace(m, (1, 3, 17, 19))
    assert [op.kind for op in g.ops] == ["conv2d", "pad", "pad", "conv2d"]
    x = torch.randn(1, 3, 17, 19)
    for grid in [(2, 2), (3, 3), (4, 1)]:
        assert close(meshdl.execute(meshdl.manual_plan(g, grids=[grid]), g, x), m(x))
