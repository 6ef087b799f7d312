"""The cost model (exact figures on hand-made meshes) and the strategies local, meshdl,
optimal: never slower than local, energy/latency trade-off, within 5% of the exhaustive
optimum, plans that execute exactly, errors that say why, determinism."""
from __future__ import annotations

import json

import pytest
import torch

import meshdl
from meshdl.errors import PlanError
from meshdl.graph.runner import execute
from meshdl.graph.model_graph import trace
from meshdl.graph.plan import Plan, Region
from meshdl.graph.tiling import make_stage
from meshdl.mesh import Device, Link, Mesh, Power
from meshdl.planner import plan, simulate
from meshdl.planner.report import compare_table, plan_json, plan_png, plan_table

POWER = Power(compute_w=2.0, tx_w=1.0, rx_w=0.5, idle_w=0.25)


def dev(name: str, flops: float, memory: int = 1 << 30) -> Device:
    return Device(name, "test", flops, memory, POWER)


def make_mesh(name: str, flops: dict[str, float], links: list[tuple[str, str, float, float]],
              memory: int = 1 << 30) -> Mesh:
    """links: (a, b, Mbit/s, latency s)."""
    return Mesh(name, {d: dev(d, f, memory) for d, f in flops.items()},
                tuple(Link(a, b, mbps * 1e6, lat) for a, b, mbps, lat in links))


def hop(nbytes: float, mbps: float, lat: float) -> float:
    return lat + nbytes * 8 / (mbps * 1e6)


@pytest.fixture(scope="module")
def chain():
    return trace(meshdl.models.build("tiny_chain"), (1, 3, 32, 32), name="tiny_chain")


@pytest.fixture(scope="module")
def tiny():
    return trace(meshdl.models.build("tiny_cnn"), (1, 3, 32, 32), name="tiny_cnn")


@pytest.fixture(scope="module")
def resnet():
    return trace(meshdl.models.build("resnet18"), (1, 3, 64, 64), name="resnet18")


def whole(g, device: str, source: str, sink: str) -> Plan:
    return Plan(g.name, g.input_shape, len(g.ops), [make_stage(g, 0, 0, len(g.ops),
                                                                [(None, device)])],
                source=source, sink=sink)


TWO = make_mesh("two", {"a": 1e9, "b": 2e9}, [("a", "b", 8.0, 0.01)])


# ----- the simulator, by hand -----------------------------------------------------------
def test_two_devices_one_link_exact(chain):
    out_b, in_b = chain.tensor_bytes(len(chain.ops)), chain.tensor_bytes(0)
    s = simulate(whole(chain, "a", "a", "b"), chain, TWO)
    t_comp, t_out = chain.flops / 1e9, hop(out_b, 8.0, 0.01)
    assert s.latency_s == pytest.approx(t_comp + t_out, rel=1e-12)
    assert s.energy_by_device["a"] == pytest.approx(2.0 * t_comp + 1.0 * t_out)
    assert s.energy_by_device["b"] == pytest.approx(0.5 * t_out)
    assert s.energy_j == pytest.approx(2.0 * t_comp + 1.5 * t_out)
    assert s.bytes_moved == out_b and s.transfers == 1
    # offload: input a -> b, compute on b, answer b -> a
    s = simulate(whole(chain, "b", "a", "a"), chain, TWO)
    expect = hop(in_b, 8.0, 0.01) + chain.flops / 2e9 + hop(out_b, 8.0, 0.01)
    assert s.latency_s == pytest.approx(expect, rel=1e-12)
    assert s.compute_s_by_device["b"] == pytest.approx(chain.flops / 2e9)
    assert s.peak_memory_by_device["b"] == chain.weight_bytes + in_b + out_b
    assert s.stage_finish_s == [pytest.approx(hop(in_b, 8.0, 0.01) + chain.flops / 2e9)]
    idle = simulate(whole(chain, "b", "a", "a"), chain, TWO, include_idle=True)
    busy_a = s.busy_by_device["a"]
    assert idle.energy_by_device["a"] == pytest.approx(
        s.energy_by_device["a"] + 0.25 * (s.latency_s - busy_a))
    d = s.to_dict()
    assert json.loads(json.dumps(d))["latency_s"] == pytest.approx(expect)


def test_link_contention_serialises_two_pieces(chain):
    """Two row tiles on b both fetch their input over the one a-b link: the second
    piece waits for the first; b computes them one after the other."""
    end = 3                                    # conv s2 + relu + maxpool: 8x8 output
    assert end in chain.positions and chain.is_spatial(0, end)
    h, w = chain.tensor_shape(end)[-2:]
    tiles = [(Region(0, h // 2, 0, w), "b"), (Region(h // 2, h, 0, w), "b")]
    s0 = make_stage(chain, 0, 0, end, tiles)
    s1 = make_stage(chain, 1, end, len(chain.ops), [(None, "b")])
    p = Plan(chain.name, chain.input_shape, len(chain.ops), [s0, s1], source="a", sink="b")
    t0, t1 = s0.tasks
    h0 = hop(chain.tensor_bytes(0, t0.in_region), 8.0, 0.01)
    h1 = hop(chain.tensor_bytes(0, t1.in_region), 8.0, 0.01)
    c0, c1 = t0.flops / 2e9, t1.flops / 2e9
    done0 = h0 + c0
    done1 = max(h0 + h1, done0) + c1         # piece 2 queued behind piece 1 on the link
    expect = done1 + s1.tasks[0].flops / 2e9  # then the head on b; b is the sink
    s = simulate(p, chain, TWO)
    assert s.latency_s == pytest.approx(expect, rel=1e-12)
    assert s.transfers == 2 and s.busy_by_device["a"] == pytest.approx(h0 + h1)
    # half-duplex: a piece going the other way shares the link too
    back = Plan(chain.name, chain.input_shape, len(chain.ops), [s0, s1], source="a",
                sink="a")
    s2 = simulate(back, chain, TWO)
    assert s2.latency_s == pytest.approx(
        expect + hop(chain.tensor_bytes(len(chain.ops)), 8.0, 0.01))


def test_two_hop_route_costs_both_hops_and_relay_energy(chain):
    mesh = make_mesh("line", {"a": 1e9, "r": 1e9, "b": 1e9},
                     [("a", "r", 10.0, 0.002), ("r", "b", 5.0, 0.003)])
    out_b = chain.tensor_bytes(len(chain.ops))
    p = plan(chain, mesh, "local", source="a", sink="b")
    assert p.routes["a>b"] == ["a", "r", "b"]
    h1, h2 = hop(out_b, 10.0, 0.002), hop(out_b, 5.0, 0.003)
    assert p.latency_s == pytest.approx(chain.flops / 1e9 + h1 + h2, rel=1e-12)
    s = simulate(p, chain, mesh)
    assert s.energy_by_device["r"] == pytest.approx(0.5 * h1 + 1.0 * h2)
    assert s.bytes_moved == 2 * out_b and s.transfers == 1


def test_same_device_transfers_are_free(chain):
    p = meshdl.manual_plan(chain, cuts=[1], source="a", sink="a")
    for t in p.tasks():
        t.device = "a"
    s = simulate(p, chain, TWO)
    assert s.latency_s == pytest.approx(chain.flops / 1e9, rel=1e-12)
    assert s.energy_j == pytest.approx(2.0 * chain.flops / 1e9)
    assert s.transfers == 0 and s.bytes_moved == 0


def test_bandwidth_cap_slows_transfers(chain):
    p = whole(chain, "b", "a", "a")
    fast, capped = simulate(p, chain, TWO), simulate(p, chain, TWO, bandwidth_cap_mbps=2)
    in_b, out_b = chain.tensor_bytes(0), chain.tensor_bytes(len(chain.ops))
    assert capped.latency_s - fast.latency_s == pytest.approx(
        (in_b + out_b) * 8 * (1 / 2e6 - 1 / 8e6))


# ----- strategies -----------------------------------------------------------------------
def test_local_latency_is_flops_over_device_flops(resnet):
    p = plan(resnet, TWO, "local", source="b", sink="b")
    assert p.latency_s == pytest.approx(resnet.flops / 2e9, rel=1e-12)
    assert len(p.stages) == 1 and [t.device for t in p.tasks()] == ["b"]


def _meshes():
    fast = {f"f{i}": 1e9 for i in range(4)}
    full = [(f"f{i}", f"f{j}", 1000.0, 0.0002) for i in range(4) for j in range(i + 1, 4)]
    return {
        "equal-fast": make_mesh("equal-fast", fast, full),
        "hetero": make_mesh("hetero", {"s": 2e8, "x": 1e9, "y": 5e8, "z": 3e8},
                            [("s", "x", 50.0, 0.002), ("x", "y", 20.0, 0.002),
                             ("s", "z", 10.0, 0.005), ("y", "z", 30.0, 0.002)]),
        "slow-links": make_mesh("slow-links", {"s": 1e9, "x": 1e9, "y": 1e9},
                                [("s", "x", 1.0, 0.01), ("x", "y", 1.0, 0.01)]),
        "home-4": meshdl.load_topology("home-4"),
    }


MESHES = _meshes()


@pytest.mark.parametrize("name", sorted(MESHES))
def test_meshdl_never_slower_than_local(resnet, name):
    mesh = MESHES[name]
    src = sorted(mesh.devices)[0]
    loc = plan(resnet, mesh, "local", source=src, alpha=1.0)
    best = plan(resnet, mesh, "meshdl", source=src, alpha=1.0)
    assert best.latency_s <= loc.latency_s * (1 + 1e-9)
    if name == "equal-fast":
        assert loc.latency_s / best.latency_s >= 1.3
        assert len({t.device for t in best.tasks()}) >= 2
    if name == "slow-links":          # transfers cost more than they save: stay local
        assert {t.device for t in best.tasks()} == {src}


def test_alpha_zero_spends_no_more_energy(resnet):
    mesh = MESHES["hetero"]
    e0 = plan(resnet, mesh, "meshdl", source="s", alpha=0.0)
    e1 = plan(resnet, mesh, "meshdl", source="s", alpha=1.0)
    assert e0.energy_j <= e1.energy_j * (1 + 1e-9)
    assert e1.latency_s <= e0.latency_s * (1 + 1e-9)


@pytest.mark.parametrize("model,mesh_name,alpha", [
    ("tiny", "hetero", 1.0), ("resnet", "hetero", 1.0), ("resnet", "hetero", 0.5),
    ("resnet", "equal-fast", 1.0), ("resnet", "home-4", 0.5)])
def test_meshdl_within_5_percent_of_optimal(request, model, mesh_name, alpha):
    g = request.getfixturevalue(model)
    mesh = MESHES[mesh_name]
    src = sorted(mesh.devices)[0]
    opt = plan(g, mesh, "optimal", source=src, alpha=alpha)
    got = plan(g, mesh, "meshdl", source=src, alpha=alpha)
    assert got.meta["search"]["objective"] <= 1.05 * opt.meta["search"]["objective"]
    if alpha == 1.0:
        assert got.latency_s <= 1.05 * opt.latency_s


def test_optimal_refuses_large_meshes(tiny):
    mesh = meshdl.load_topology("disnet-net0")
    with pytest.raises(PlanError, match="use strategy 'meshdl'"):
        plan(tiny, mesh, "optimal", source="8", sink="4")


def test_plans_execute_exactly(tiny):
    """Slow devices on fast links: meshdl really splits, and every plan computes the
    model's answer."""
    mesh = make_mesh("slow-dev", {f"p{i}": 2e5 for i in range(3)},
                     [("p0", "p1", 1000.0, 0.0), ("p1", "p2", 1000.0, 0.0),
                      ("p0", "p2", 1000.0, 0.0)])
    x = torch.randn(tiny.input_shape, generator=torch.Generator().manual_seed(0))
    ref = tiny.forward(x)
    tasks = {}
    for strategy in ("local", "meshdl", "optimal"):
        p = plan(tiny, mesh, strategy, source="p0", sink="p1", alpha=1.0)
        y = execute(Plan.from_dict(json.loads(json.dumps(p.to_dict()))), tiny, x)
        assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
        tasks[strategy] = sum(len(s.tasks) for s in p.stages)
    assert tasks["meshdl"] > 1 and tasks["optimal"] > 1


# ----- errors -----------------------------------------------------------------------------
def test_unknown_source(tiny):
    with pytest.raises(PlanError, match="not in mesh"):
        plan(tiny, TWO, "meshdl", source="nope", sink="a")


def test_source_cut_off_from_sink(tiny):
    mesh = make_mesh("split", {"a": 1e9, "b": 1e9, "c": 1e9}, [("a", "b", 10.0, 0.001)])
    with pytest.raises(PlanError, match="cannot reach"):
        plan(tiny, mesh, "meshdl", source="a", sink="c")


def test_model_no_device_can_hold(resnet):
    mesh = make_mesh("tiny-mem", {"a": 1e9, "b": 1e9}, [("a", "b", 10.0, 0.001)],
                     memory=1 << 20)
    with pytest.raises(PlanError, match="memory"):
        plan(resnet, mesh, "meshdl", source="a", sink="b")
    with pytest.raises(PlanError, match="MiB"):
        plan(resnet, mesh, "local", source="a", sink="b")


def test_memory_forces_a_split(resnet):
    """No device holds all of resnet18, but two together do: meshdl spreads it."""
    cap = int(resnet.weight_bytes * 0.8)
    mesh = make_mesh("halves", {"a": 1e9, "b": 1e9}, [("a", "b", 100.0, 0.001)],
                     memory=cap)
    p = plan(resnet, mesh, "meshdl", source="a", sink="a")
    s = simulate(p, resnet, mesh)
    assert not s.over_memory and max(s.peak_memory_by_device.values()) <= cap
    assert {t.device for t in p.tasks()} == {"a", "b"}


# ----- determinism and reports ------------------------------------------------------------
def test_deterministic(resnet):
    mesh = MESHES["hetero"]
    a = plan(resnet, mesh, "meshdl", source="s", alpha=0.5).to_dict()
    b = plan(resnet, mesh, "meshdl", source="s", alpha=0.5).to_dict()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_reports(resnet, tmp_path):
    mesh = MESHES["hetero"]
    plans = {s: plan(resnet, mesh, s, source="s", alpha=1.0) for s in ("local", "meshdl")}
    text = plan_table(plans["meshdl"], resnet)
    assert "meshdl" in text and "latency" in text
    assert json.loads(plan_json(plans["meshdl"]))["strategy"] == "meshdl"
    table = compare_table({**plans, "disnet": None})
    assert "skipped" in table and "speed-up vs local" in table
    png = plan_png(plans["meshdl"], mesh, tmp_path / "plan.png")
    assert png.stat().st_size > 1000


# ----- the energy/latency trade-off -------------------------------------------------------
def trade_off_mesh() -> Mesh:
    """A slow, frugal source and a fast, power-hungry neighbour on a fast link: latency
    wants the neighbour, energy wants the source."""
    return Mesh("trade-off", {
        "s": Device("s", "test", 1e9, 1 << 30, Power(1.0, 0.2, 0.2, 0.0)),
        "f": Device("f", "test", 8e9, 1 << 30, Power(20.0, 0.5, 0.5, 0.0)),
        "m": Device("m", "test", 3e9, 1 << 30, Power(4.0, 0.3, 0.3, 0.0))},
        (Link("s", "f", 200e6, 0.0005), Link("s", "m", 200e6, 0.0005),
         Link("f", "m", 200e6, 0.0005)))


def _structure(p: Plan) -> tuple:
    return tuple((s.start, s.end, tuple((t.device, None if t.out_region is None else
                                          tuple(t.out_region.to_list())) for t in s.tasks))
                 for s in p.stages)


def _objective(p: Plan, ref: Plan, alpha: float) -> float:
    return alpha * p.latency_s / ref.latency_s + (1 - alpha) * p.energy_j / ref.energy_j


def test_alpha_sweep_is_monotone_with_a_real_trade_off(resnet):
    mesh = trade_off_mesh()
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    plans = [plan(resnet, mesh, "meshdl", source="s", alpha=a) for a in alphas]
    for lo, hi in zip(plans, plans[1:]):          # alpha grows from lo to hi
        assert hi.latency_s <= lo.latency_s * (1 + 1e-9)
        assert lo.energy_j <= hi.energy_j * (1 + 1e-9)
    assert len({_structure(p) for p in plans}) >= 2
    assert plans[-1].latency_s < plans[0].latency_s and plans[0].energy_j < plans[-1].energy_j
    loc = plan(resnet, mesh, "local", source="s")
    assert plans[0].energy_j <= loc.energy_j * (1 + 1e-9)
    front = plans[0].meta["search"]["pareto"]      # the archive: non-dominated points
    assert len(front) >= 2 and all(b[1] < a[1] for a, b in zip(front, front[1:]))


@pytest.mark.parametrize("name", sorted(MESHES) + ["trade-off"])
def test_meshdl_objective_never_above_local(resnet, name):
    mesh = MESHES.get(name) or trade_off_mesh()
    src = sorted(mesh.devices)[0]
    loc = plan(resnet, mesh, "local", source=src)
    for alpha in (0.0, 0.5, 1.0):
        got = plan(resnet, mesh, "meshdl", source=src, alpha=alpha)
        assert _objective(got, loc, alpha) <= 1.0 + 1e-9
        assert got.meta["search"]["objective"] == pytest.approx(_objective(got, loc, alpha))
