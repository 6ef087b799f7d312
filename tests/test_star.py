"""Realistic device profiles and the star (through-the-broker) cost model."""
from __future__ import annotations

import re

import pytest
import yaml

import meshdl
from meshdl.data import data_dir
from meshdl.errors import TopologyError
from meshdl.mesh import dump_topology, load_profile, load_topology, parse_topology
from meshdl.planner.local import whole_plan
from meshdl.planner.simulate import simulate

REALISTIC = ["rpi3bplus", "rpi4", "rpi5", "rpi_zero2w", "jetson_nano", "jetson_nano_gpu",
             "jetson_orin_nano", "laptop"]


@pytest.mark.parametrize("name", REALISTIC)
def test_realistic_profiles_cite_a_source_for_every_figure(name):
    text = (data_dir("nodes") / f"{name}.yaml").read_text()
    p = load_profile(name)
    assert p.net.get("bandwidth_mbps", 0) > 0      # a typical access link
    # every figure line is sourced (on its line or in the comment block just above)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*(flops|memory_bytes|compute_w|tx_w|rx_w|idle_w|net):", line):
            context = "\n".join(lines[max(0, i - 6):i + 1])
            assert "SOURCE" in context, f"{name}: {line.strip()} has no SOURCE"


def test_realistic_scale_against_the_seed_scale():
    f = {n: load_profile(n).flops for n in REALISTIC}
    assert f["rpi3bplus"] < f["rpi4"] < f["rpi5"] < f["jetson_nano_gpu"] < f["jetson_orin_nano"]
    assert f["jetson_nano"] < f["jetson_nano_gpu"]
    assert 4 <= f["rpi4"] / load_profile("rpi4_seed").flops <= 20    # the 5-20x
    assert load_profile("rpi4_seed").flops == 1.12e9                   # seeds keep numbers


STAR = """
name: s
broker: {host: router}
devices:
  d0: {flops: 1.0e+9, memory_bytes: 1 GiB, power: {compute_w: 2, tx_w: 1, rx_w: 0.5},
       access: {up_mbps: 10, down_mbps: 40, latency_ms: 5}}
  d1: {flops: 4.0e+9, memory_bytes: 1 GiB, power: {compute_w: 3, tx_w: 2, rx_w: 1},
       access: {bandwidth_mbps: 20, latency_ms: 1}}
"""


def tiny():
    return meshdl.trace(meshdl.models.build("tiny_cnn"), input_shape=(1, 3, 32, 32))


def test_star_piece_costs_uplink_broker_downlink():
    mesh = parse_topology(yaml.safe_load(STAR))
    g = tiny()
    plan = whole_plan(g, "d1", "d0", "d0")
    score = simulate(plan, g, mesh, schedule=True)
    nin, nout = g.tensor_bytes(0), g.tensor_bytes(len(g.ops))
    up0, down1 = 0.005 + nin * 8 / 10e6, 0.001 + nin * 8 / 20e6
    up1, down0 = 0.001 + nout * 8 / 20e6, 0.005 + nout * 8 / 40e6
    expect = up0 + down1 + g.flops / 4e9 + up1 + down0
    assert score.latency_s == pytest.approx(expect, rel=1e-9)
    hops = [h[:2] for tr in score.schedule["transfers"] for h in tr["hops"]]
    assert hops == [("d0", "@broker"), ("@broker", "d1"), ("d1", "@broker"), ("@broker", "d0")]
    # energy: the device radios, not the broker
    e0 = 1 * up0 + 0.5 * down0
    assert score.energy_by_device["d0"] == pytest.approx(e0, rel=1e-9)
    assert mesh.broker_path("d0", "d1") == ["d0", "@broker", "d1"]


def test_broker_on_a_device_makes_its_own_hop_free():
    data = yaml.safe_load(STAR)
    data["broker"] = {"device": "d0"}
    mesh = parse_topology(data)
    g = tiny()
    score = simulate(whole_plan(g, "d1", "d0", "d0"), g, mesh)
    nin, nout = g.tensor_bytes(0), g.tensor_bytes(len(g.ops))
    expect = (0.001 + nin * 8 / 20e6) + g.flops / 4e9 + (0.001 + nout * 8 / 20e6)
    assert score.latency_s == pytest.approx(expect, rel=1e-9)
    assert mesh.broker_path("d0", "d1") == ["d0", "d1"]


def test_uplink_is_shared_by_transfers_to_different_devices():
    """Two pieces from d0 to d1 and d2 serialise on d0's uplink (one radio), which a
    device-to-device model with two links would not."""
    text = STAR + """  d2: {flops: 4.0e+9, memory_bytes: 1 GiB, power: {compute_w: 3, tx_w: 2},
       access: {bandwidth_mbps: 20, latency_ms: 1}}
"""
    mesh = parse_topology(yaml.safe_load(text))
    g = tiny()
    plan = meshdl.manual_plan(g, cuts=[], grids=[(1, 3)], source="d0", sink="d0")
    s = simulate(plan, g, mesh, schedule=True)
    ups = sorted((h[2], h[3]) for tr in s.schedule["transfers"] for h in tr["hops"]
                 if h[0] == "d0" and h[1] == "@broker")
    assert len(ups) == 2            # tile 0 stays on d0; tiles 1, 2 go to d1, d2
    for (s0, e0), (s1, _) in zip(ups, ups[1:]):
        assert s1 >= e0 - 1e-12        # one at a time


def test_shared_medium_serialises_every_access_hop():
    data = yaml.safe_load(STAR)
    mesh_free = parse_topology(data)
    data["medium"] = "all"
    mesh_cell = parse_topology(data)
    g = tiny()
    plan = meshdl.manual_plan(g, cuts=[], grids=[(1, 2)], source="d0", sink="d0")
    assert simulate(plan, g, mesh_cell).latency_s >= simulate(plan, g, mesh_free).latency_s


def test_star_topologies_load_roundtrip_and_dilate():
    for name in ("home-wifi", "home-wifi-n", "home-jetson"):
        m = load_topology(name)
        assert m.star is not None and m.is_connected()
        again = parse_topology(yaml.safe_load(dump_topology(m)))
        assert again.star == m.star and again.devices == m.devices
        assert meshdl.Mesh.from_dict(m.to_dict()) == m
        k = m.dilated(4)
        assert k.time_scale == 4
        for d, dev in m.devices.items():
            assert k.devices[d].flops == dev.flops / 4
        for d, acc in m.star.access.items():
            assert k.star.access[d].up_bps == acc.up_bps / 4
            assert k.star.access[d].latency_s == pytest.approx(acc.latency_s * 4)
    assert load_topology("home-wifi-n").star.broker_device == "pi5"


def test_dilation_scales_every_predicted_time():
    g = tiny()
    m = load_topology("home-wifi")
    plan = meshdl.plan(g, m, strategy="meshdl", source="pi5", sink="pi5", alpha=1.0)
    assert simulate(plan, g, m.dilated(3)).latency_s == \
        pytest.approx(3 * simulate(plan, g, m).latency_s, rel=1e-9)


def test_planner_never_slower_than_local_on_a_star():
    g = meshdl.trace(meshdl.models.build("resnet18"), input_shape=(1, 3, 224, 224))
    for name in ("home-wifi", "home-wifi-n", "home-jetson"):
        m = load_topology(name)
        src = m.defaults["source"]
        best = meshdl.plan(g, m, strategy="meshdl", source=src, sink=src, alpha=1.0)
        local = simulate(whole_plan(g, src, src, src), g, m).latency_s
        assert best.latency_s <= local * (1 + 1e-9)
        for dev in m.devices:      # best single device, input shipped to it
            single = simulate(whole_plan(g, dev, src, src), g, m).latency_s
            assert best.latency_s <= single * (1 + 1e-9), (name, dev)


@pytest.mark.parametrize("text, match", [
    ("name: x\nbroker: {host: r}\ndevices:\n  a: {flops: 1e9, memory_bytes: 1 GiB, "
     "power: {compute_w: 1, tx_w: 1}}\n", r"no access link"),
    ("name: x\nbroker: {device: zz}\ndevices:\n  a: rpi4\n", r"broker.device 'zz'"),
    ("name: x\nbroker: {host: r}\ndevices:\n  a: rpi4\n  b: rpi4\nlinks:\n  - [a, b, 10]\n",
     r"remove 'links'"),
    ("name: x\nmedium: [a]\ndevices:\n  a: rpi4\n", r"'medium' needs a 'broker'"),
    ("name: x\nbroker: {host: r}\ndevices:\n  a: {profile: rpi4, access: {up_mbps: 0, "
     "down_mbps: 5}}\n", r"must be > 0"),
])
def test_star_topology_errors(text, match):
    with pytest.raises(TopologyError, match=match):
        parse_topology(yaml.safe_load(text))


def test_link_trace_parses_and_gives_the_mesh_of_each_moment():
    from meshdl.node.linktrace import TraceError, parse_trace
    m = load_topology("home-jetson")
    tr = parse_trace("# t, device, Mbit/s[, ms]\n5, jetson, 4\n1.5 pi4-b 20 9\n").check(m)
    assert [e.t for e in tr.events] == [1.5, 5.0]
    assert tr.mesh_at(m, 1.0) == m
    mid = tr.mesh_at(m, 2.0)
    assert mid.star.access["pi4-b"].up_bps == 20e6
    assert mid.star.access["pi4-b"].latency_s == pytest.approx(0.009)
    late = tr.mesh_at(m, 9.0)
    assert late.star.access["jetson"].down_bps == 4e6
    g = tiny()
    # the oracle's point: a slower link makes the same plan slower
    p = meshdl.plan(g, m, strategy="meshdl", source="pi4-a", sink="pi4-a", alpha=1.0)
    assert simulate(p, g, late).latency_s >= simulate(p, g, m).latency_s
    for bad, match in (("1, ghost, 5\n", "not a device"), ("1, jetson\n", "expected"),
                       ("x, jetson, 5\n", "numbers"), ("1, jetson, 0\n", "bandwidth > 0"),
                       ("", "no events")):
        with pytest.raises(TraceError, match=match):
            parse_trace(bad).check(m)


def test_input_time_to_the_source_sets_the_clients_resend_timer():
    """A client's input crosses the source's downlink; the leader records that time in
    the plan (meta input_s) and the client's resend timer uses it: a fixed 50 ms timer
    resent a slow link's input twice per job, ahead of the answer (2.3x the prediction)."""
    from meshdl.client_jobs import input_s
    mesh = meshdl.load_topology("home-wifi-n")
    star = mesh.star
    assert star.inbound_time("pi5", 1e6) == 0.0            # the broker's own device
    acc = star.access["zero"]
    assert star.inbound_time("zero", 602112) == pytest.approx(
        acc.latency_s + 602112 * 8 / acc.down_bps)
    assert mesh.dilated(10).star.inbound_time("zero", 602112) == pytest.approx(
        10 * star.inbound_time("zero", 602112))
    from meshdl.node.leader import make_plan
    from meshdl.node.leaderproto import StandingRequest
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), input_shape=(1, 3, 32, 32))
    plan = make_plan(StandingRequest("tiny_cnn", "local", source="zero", sink="zero"), mesh, g)
    assert input_s(plan) == pytest.approx(star.inbound_time("zero", 4 * 3 * 32 * 32))
    plan = meshdl.plan(g, mesh, strategy="local", source="zero", sink="zero")
    assert input_s(plan) == 0.05                           # not given: the old default
    import dataclasses
    for bad in (-1.0, float("nan"), "2", 1e9):
        assert input_s(dataclasses.replace(plan, meta={"input_s": bad})) == 0.05
    assert input_s(dataclasses.replace(plan, meta={"input_s": 2.5})) == 2.5
