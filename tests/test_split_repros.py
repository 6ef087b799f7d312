"""Regression tests for issue 9's reproductions: in-place ops, tuple ops, in-place
statements whose value is unused, and parameters with spatial extent; plus channel-only
ops and reduce points (squeeze-and-excitation) through every kind of plan."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import meshdl
from meshdl.graph.plan import Plan


def _plans(g):
    plans = [dict(cuts=[], grids=[(1, 1)]), dict(cuts=[], grids=[(2, 2)]),
             dict(cuts=[], grids=[(4, 3)]), dict(cuts=[], row_ratios=[[3, 2, 1]])]
    if g.cut_points:
        plans.append(dict(cuts=[0], grids=[(1, 1), (2, 2)]))
        plans.append(dict(cuts=[0], grids=[(3, 1), (1, 1)]))
    return plans


def worst_error(model, shape=(1, 3, 16, 16), dtype=torch.float32):
    model = model.eval().to(dtype)
    g = meshdl.trace(model, shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        ref = model(x.clone())
    worst = 0.0
    for spec in _plans(g):
        plan = meshdl.manual_plan(g, **spec)
        plan = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))   # as sent on the wire
        y = meshdl.execute(plan, g, x.clone())
        worst = max(worst, (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12))
    return worst, g


class InplaceAfterWhole(nn.Module):      # repro 1
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(3, 8, 3, padding=1)
        s.act = nn.LeakyReLU(0.1, inplace=True)
        s.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(s, x):
        return s.c2(s.act(s.c1(x)))


class InplaceTwoConsumers(nn.Module):    # repro 1, second consumer with a wider halo
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(3, 8, 3, padding=1)
        s.c2 = nn.Conv2d(8, 8, 5, padding=2)
        s.c3 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(s, x):
        y = s.c1(x)
        z = s.c2(y)
        y.relu_()
        y += 1.0
        return s.c3(y) + z + F.relu(y, inplace=True) + torch.relu_(y)


class TupleOps(nn.Module):               # repro 2
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(2, 2, 3, padding=1)

    def forward(s, x):
        x = torch.cat([x, x[:, :1]], 1)
        a, b = torch.chunk(x, 2, dim=1)
        c, d = torch.split(x, 2, 1)
        e, f = x.split([1, 3], dim=1)
        v, _ = torch.max(x, 1, keepdim=True)
        srt, idx = torch.sort(x, 1)
        u = torch.unbind(x, 1)[2].unsqueeze(1)
        return torch.cat([s.c(a), b, c, d, e, f, v, srt, idx.float(), u], 1)


class UnusedInplace(nn.Module):          # repro 3
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(3, 4, 3, padding=1)
        s.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(s, x):
        y = s.c1(x)
        y.mul_(2.0)
        y.masked_fill_(y > 0.3, 0.3)
        y.clamp_(min=-0.2).add_(0.1)
        return s.c2(y)


class SpatialParameter(nn.Module):       # repro 4
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 4, 3, padding=1)
        s.pos = nn.Parameter(torch.randn(1, 4, 16, 16))
        s.register_buffer("rowbias", torch.randn(1, 1, 16, 1))

    def forward(s, x):
        return s.c(x) + s.pos + s.rowbias * 2.0


class ChannelShuffle(nn.Module):
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 8, 3, padding=1)
        s.d = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(s, x):
        x = s.c(x)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x = x.index_select(1, torch.tensor([7, 0, 3, 1, 2, 4, 5, 6])).narrow(1, 0, 6)
        x = torch.stack([x, -x], 2).flatten(1, 2)
        x = F.pad(x, (0, 0, 0, 0, 1, 1)).permute(0, 1, 2, 3)[:, 2:10]
        return s.d(F.softmax(x, dim=1) + x.sum(1, keepdim=True))


class SEBlock(nn.Module):
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 8, 3, padding=1)
        s.f1 = nn.Conv2d(8, 4, 1)
        s.f2 = nn.Conv2d(4, 8, 1)
        s.d = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        s.fc = nn.Linear(8, 8)

    def forward(s, x):
        x = F.relu(s.c(x))
        x = x * torch.sigmoid(s.f2(F.relu(s.f1(F.adaptive_avg_pool2d(x, 1)))))
        x = s.d(x)
        m = x.amax((2, 3), keepdim=True)           # CBAM-style max and mean
        y = s.fc(x.mean((2, 3))).view(1, 8, 1, 1)
        return F.hardswish(x * torch.sigmoid(m) + y)


@pytest.mark.parametrize("model", [InplaceAfterWhole, InplaceTwoConsumers, TupleOps,
                                   UnusedInplace, SpatialParameter, ChannelShuffle, SEBlock])
def test_repro_is_exact_under_every_plan(model):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", meshdl.SplitWarning)    # nothing runs whole
        err, g = worst_error(model())
    assert err <= 1e-5, err
    assert g.tiled_flops() == pytest.approx(g.flops)


def test_repros_are_exact_in_float64():
    for model in (InplaceTwoConsumers, UnusedInplace, SEBlock):
        torch.manual_seed(1)
        err, _ = worst_error(model(), dtype=torch.float64)
        assert err <= 1e-12, (model.__name__, err)


def test_user_model_is_not_mutated_by_tracing():
    m = InplaceAfterWhole().eval()
    meshdl.trace(m, (1, 3, 16, 16))
    assert m.act.inplace is True
    assert all(not name.startswith("_meshdl") for name, _ in m.named_modules())


def test_partial_view_mutation_runs_whole_and_exact():
    class ViewMutation(nn.Module):
        def __init__(s):
            super().__init__()
            s.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(s, x):
            y = s.c(x)
            y[:, :2].relu_()          # mutates part of y through a view
            return y * 2

    with pytest.warns(meshdl.SplitWarning, match="whole"):
        err, g = worst_error(ViewMutation())
    assert err <= 1e-6


def test_se_stage_holds_reduce_points_in_the_plan():
    g = meshdl.trace(SEBlock().eval(), (1, 3, 16, 16))
    plan = meshdl.manual_plan(g, cuts=[], grids=[(2, 2)])
    (stage,) = plan.stages
    assert stage.phases == 3 and len(stage.tasks) == 4
    assert [r.phase for r in stage.reduces] == [0, 1]
    assert all(r.nbytes > 0 for r in stage.reduces)
    assert plan.peers(stage.tasks[1]) == stage.tasks
    back = Plan.from_dict(plan.to_dict())
    assert back.stages[0].reduces == stage.reduces
    bad = plan.to_dict()
    del bad["stages"][0]["reduces"]
    with pytest.raises(meshdl.PlanError, match="reduce points"):
        meshdl.execute(Plan.from_dict(bad), g, torch.zeros(1, 3, 16, 16))


def test_simulator_costs_the_partials_exchange_as_transfers():
    g = meshdl.trace(SEBlock().eval(), (1, 3, 32, 32))
    mesh = meshdl.load_topology("home-4")
    devs = list(mesh.devices)
    plan = meshdl.manual_plan(g, cuts=[], grids=[(2, 2)], source=devs[0], sink=devs[0])
    for t, d in zip(plan.stages[0].tasks, devs):
        t.device = d
    score = meshdl.simulate(plan, g, mesh, schedule=True)
    names = score.schedule["tasks"]
    # three phases per tile; phase p+1 starts after every tile's phase p partials arrive
    assert {f"s0t{i}#p{p}" for i in range(4) for p in (1, 2)} <= set(names)
    exch = [tr for tr in score.schedule["transfers"] if "#p" in tr["dst"]]
    assert len(exch) == 2 * 4 * 4 and {tr["bytes"] for tr in exch} == {32, 64}
    for i in range(4):
        start = names[f"s0t{i}#p1"][1]
        for tr in exch:
            if tr["dst"] == f"s0t{i}#p1" and tr["hops"]:
                assert start >= tr["hops"][-1][3] - 1e-12
        assert start >= max(names[f"s0t{j}"][2] for j in range(4)) - 1e-12


def norm_global(x):
    return x / x.abs().amax()


torch.fx.wrap("norm_global")


def test_unknown_elementwise_ops_and_spatial_slices_tile_exactly():
    class Exotic(nn.Module):
        def __init__(s):
            super().__init__()
            s.c = nn.Conv2d(3, 8, 3, padding=1)
            s.p = nn.ZeroPad2d((1, 0, 1, 0))
            s.d = nn.Conv2d(8, 8, 3, stride=2)

        def forward(s, x):
            x = torch.erfinv(torch.tanh(s.c(x)) * 0.5)        # probed: elementwise
            y = s.d(s.p(x))[:, :, 1:, 1:]                       # NASNet-style crop
            z = F.avg_pool2d(x[..., 2:, 2:], 2, 2)
            return norm_global(z + y)                           # global: runs whole

    with pytest.warns(meshdl.SplitWarning, match="norm_global"):
        err, g = worst_error(Exotic(), shape=(1, 3, 20, 20))
    assert err <= 1e-6
    kinds = {op.name: op.kind for op in g.ops}
    assert kinds["getitem"] == "slice" and g.roles[[o.name for o in g.ops].index("erfinv")] == "map"
    assert g.tiled_flops() / g.flops > 0.9


def test_inspect_names_the_tiled_share_and_what_ends_each_run():
    from click.testing import CliRunner
    from meshdl.cli.inspect_cmd import inspect
    res = CliRunner().invoke(inspect, ["tiny_cnn"])
    assert res.exit_code == 0, res.output
    assert "tileable share of FLOPs" in res.output and "ended by" in res.output


def test_one_warning_for_each_op_ending_a_run_method_forms_included():
    class Transposed(nn.Module):
        def __init__(s):
            super().__init__()
            s.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(s, x):
            a = s.c(x)
            y = a.transpose(2, 3)                      # swaps H and W: followed, tiled
            z = a.reshape(1, 4, -1).softmax(-1).view_as(a)   # spatial softmax
            return a * z + y.transpose(2, 3)

    with pytest.warns(meshdl.SplitWarning) as rec:
        err, g = worst_error(Transposed())
    msgs = [str(r.message) for r in rec]
    assert any(".reshape()" in m for m in msgs)
    assert not any(".transpose()" in m for m in msgs)
    assert all(op.spatial for op in g.ops if op.kind == "transpose")
    assert err <= 1e-6
