"""meshdl.mesh: profiles, topologies, routing, generation, live state."""
from __future__ import annotations

import json
import time
from collections import Counter

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshdl.errors import TopologyError
from meshdl.mesh import (Device, Link, Mesh, MeshState, NodeOffline, NodeOnline, Power,
                         Telemetry, apply, changed_links, disnet_json_to_mesh, dump_topology,
                         fold, link_changed, list_profiles, list_topologies, load_profile,
                         load_topology, mix_counts, random_mesh)

REQUIRED_PROFILES = {"rpi3bplus_seed", "rpi4_seed", "rpi3bplus", "rpi4", "rpi5",
                     "jetson_nano", "jetson_nano_gpu", "jetson_orin_nano", "rpi_zero2w",
                     "rpi_zero", "orangepi_zero", "beaglebone_ai",
                     "jetson_nano_maxn", "jetson_nano_5w", "odroid", "laptop", "cloud_server",
                     "generic"}
REQUIRED_TOPOLOGIES = {"disnet-net0", "disnet-net1", "disnet-net2", "disnet-net3",
                       "distcnn-50", "edge-cloud", "home-4", "home-wifi",
                       "home-wifi-n", "home-jetson"}

# Transcribed from the DISNET seed's disnet_network0.json (facts, not read at test time).
DISNET0_NODES = {"0": 4, "1": 2, "2": 4, "3": 8, "4": 4, "5": 2, "6": 8, "7": 7, "8": 6,
                 "9": 9}
DISNET0_EDGES = [(0, 9, 26), (1, 2, 42), (1, 4, 14), (1, 8, 19), (2, 3, 15), (2, 5, 35),
                 (2, 6, 50), (2, 7, 50), (3, 4, 46), (4, 7, 49), (4, 8, 30), (4, 9, 43),
                 (5, 6, 44), (6, 7, 12), (6, 8, 17)]


def small_mesh() -> Mesh:
    p = Power(3.0, 1.0, 1.0, 0.5)
    devs = {d: Device(d, "generic", 1e9, 2**30, p) for d in "abcd"}
    links = (Link("a", "b", 10e6, 0.001), Link("b", "c", 10e6, 0.001),
             Link("a", "c", 1e6, 0.001), Link("c", "d", 100e6, 0.010))
    return Mesh("small", devs, links)


# ---- shipped data ---------------------------------------------------------------------
def test_required_profiles_and_topologies_are_shipped():
    assert REQUIRED_PROFILES <= set(list_profiles())
    assert REQUIRED_TOPOLOGIES <= set(list_topologies())


@pytest.mark.parametrize("name", sorted(REQUIRED_PROFILES))
def test_profile_loads(name):
    p = load_profile(name)
    assert p.name == name and p.flops > 0 and p.memory_bytes > 0
    assert min(p.power.to_dict().values()) >= 0 and p.power.compute_w > 0


def test_profile_seed_figures():
    assert load_profile("rpi3bplus_seed").flops == 560e6
    assert load_profile("rpi4_seed").flops == 1.12e9
    assert load_profile("orangepi_zero").memory_bytes == 131072 * 1024
    nano = load_profile("jetson_nano_maxn").power
    assert (nano.compute_w, nano.tx_w, nano.rx_w) == (7.253, 2.320, 2.260)
    five = load_profile("jetson_nano_5w").power
    assert (five.compute_w, five.tx_w, five.rx_w) == (4.205, 1.917, 1.912)


@pytest.mark.parametrize("name", sorted(REQUIRED_TOPOLOGIES))
def test_topology_loads_validates_and_round_trips(name):
    m = load_topology(name)
    assert m.validate() is m and m.is_connected()
    assert Mesh.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    for key in ("source", "sink"):
        if key in m.defaults:
            assert m.defaults[key] in m.devices


def test_disnet_net0_is_the_seed_mesh():
    m = load_topology("disnet-net0")
    assert set(m.devices) == set(DISNET0_NODES)
    for d, w in DISNET0_NODES.items():
        assert m.devices[d].flops == w * 1e9
    assert len(m.links) == 15
    assert {frozenset((str(a), str(b))): w * 1e6 for a, b, w in DISNET0_EDGES} == \
        {l.key: l.bandwidth_bps for l in m.links}
    assert m.link("2", "6").bandwidth_bps == 50e6 and m.link("6", "2") is m.link("2", "6")
    assert m.devices["9"].flops == 9e9
    assert dict(m.defaults) == {"source": "8", "sink": "4"}
    # power groups: intended 0-3/4-7/8-9, the seed's own 0-3/4-9
    assert m.devices["8"].power.compute_w == 1.2 and m.devices["5"].power.tx_w == 0.8
    assert m.devices["9"].meta["groups"] == {"intended": 2, "seed": 1}
    assert m.devices["2"].meta["groups"] == {"intended": 0, "seed": 0}


def test_disnet_json_format_matches_yaml(tmp_path):
    seed_json = {"name": "disnet-network0", "nodes": DISNET0_NODES,
                 "edges": [list(e) for e in DISNET0_EDGES]}
    path = tmp_path / "net0.json"
    path.write_text(json.dumps(seed_json))
    j, y = load_topology(path), load_topology("disnet-net0")
    assert {d: (v.flops, v.power) for d, v in j.devices.items()} == \
        {d: (v.flops, v.power) for d, v in y.devices.items()}
    assert {l.key: (l.bandwidth_bps, l.latency_s) for l in j.links} == \
        {l.key: (l.bandwidth_bps, l.latency_s) for l in y.links}
    assert disnet_json_to_mesh(seed_json).devices["9"].meta["groups"]["seed"] == 1


def test_distcnn_50():
    m = load_topology("distcnn-50")
    counts = Counter(d.profile for d in m.devices.values())
    assert len(m.devices) == 50 and m.is_connected()
    assert counts["rpi3bplus_seed"] == 5
    assert {counts["beaglebone_ai"], counts["orangepi_zero"]} == {22, 23}
    assert {l.bandwidth_bps for l in m.links} == {72.2e6}
    for d in m.devices.values():
        x, y = d.meta["pos"]
        assert -15 <= x <= 15 and -15 <= y <= 15
    for l in m.links:  # a radius graph: every link is shorter than 7.5 (4-decimal positions)
        (xa, ya), (xb, yb) = m.devices[l.a].meta["pos"], m.devices[l.b].meta["pos"]
        assert ((xa - xb) ** 2 + (ya - yb) ** 2) ** 0.5 < 7.5 + 1e-3


def test_distcnn_50_is_reproducible_from_its_recipe():
    stored = load_topology("distcnn-50")
    again = random_mesh(50, 0, radius=7.5, area=15, bandwidth_mbps=(72.2, 72.2),
                        latency_ms=(1, 1), connect=False, prefix="u")
    assert {l.key for l in again.links} == {l.key for l in stored.links}
    assert {d.id: d.profile for d in again.devices.values()} == \
        {d.id: d.profile for d in stored.devices.values()}


def test_edge_cloud_and_home_4():
    ec = load_topology("edge-cloud")
    assert ec.link("edge", "cloud").bandwidth_bps == pytest.approx(6.71e6)
    assert ec.devices["cloud"].flops > ec.devices["edge"].flops
    home = load_topology("home-4")
    assert Counter(d.profile for d in home.devices.values()) == \
        {"rpi4_seed": 2, "rpi3bplus_seed": 1, "jetson_nano_5w": 1}
    for l in home.links:
        assert 20e6 <= l.bandwidth_bps <= 100e6 and 0.002 <= l.latency_s <= 0.005


# ---- routing ------------------------------------------------------------------------
def test_route_prefers_fast_path_and_caches():
    m = small_mesh()
    assert m.route("a", "c") == ["a", "b", "c"]          # 2 x 10 Mbit/s beats 1 Mbit/s
    assert m.route("a", "c", nbytes=10) == ["a", "c"]    # tiny message: latency wins
    assert m.route("a", "a") == ["a"]
    assert m.route("a", "d") == ["a", "b", "c", "d"]
    assert m.hops("a", "d") == 2
    assert m.transfer_time("a", "b", 1_250_000) == pytest.approx(0.001 + 1.0)
    assert m.routes_from("a")["d"] == ["a", "b", "c", "d"]
    assert m.neighbours("c") == ["a", "b", "d"]


@pytest.mark.parametrize("name", ["disnet-net0", "disnet-net3", "distcnn-50"])
def test_hop_counts_match_networkx_bfs(name):
    m = load_topology(name)
    g = nx.Graph([(l.a, l.b) for l in m.links])
    expected = dict(nx.all_pairs_shortest_path_length(g))
    assert m.hop_counts() == expected
    ids = sorted(m.devices)
    for a in ids[:5]:
        for b in ids:
            assert m.hops(a, b) == expected[a][b]
            assert len(m.route(a, b)) - 1 >= expected[a][b]


def test_disconnected_route_names_both_devices():
    m = small_mesh().without(["c"])
    with pytest.raises(TopologyError, match=r"'a'.*'d'"):
        m.route("a", "d")
    with pytest.raises(TopologyError, match="disconnected"):
        m.hops("a", "d")


def test_missing_link_and_device_errors():
    m = small_mesh()
    with pytest.raises(TopologyError, match="no link between 'a' and 'd'"):
        m.link("a", "d")
    with pytest.raises(TopologyError, match="no device 'z'.*known devices: a, b, c, d"):
        m.route("a", "z")


def test_bandwidth_cap():
    m = load_topology("disnet-net0")
    capped = m.with_bandwidth_cap(15)
    assert max(l.bandwidth_bps for l in capped.links) == 15e6
    assert capped.link("6", "7").bandwidth_bps == 12e6          # below the cap: unchanged
    assert m.link("2", "6").bandwidth_bps == 50e6               # original untouched
    assert m.with_bandwidth_cap(None) is m
    with pytest.raises(TopologyError):
        m.with_bandwidth_cap(0)


def test_derived_meshes():
    m = small_mesh()
    sub = m.subgraph(["a", "b", "c"])
    assert set(sub.devices) == {"a", "b", "c"} and len(sub.links) == 3
    w = m.without(["b"])
    assert w.route("a", "c") == ["a", "c"]
    m2 = m.with_link("a", "d", bandwidth_mbps=1000, latency_ms=0.1)
    assert m2.route("a", "d") == ["a", "d"] and m.find_link("a", "d") is None
    m3 = m.with_link("a", "b", latency_s=0.5)
    assert m3.link("a", "b").bandwidth_bps == 10e6 and m3.link("a", "b").latency_s == 0.5
    assert {l.latency_s for l in m.with_latency(0).links} == {0.0}
    with pytest.raises(TopologyError, match="needs a bandwidth"):
        m.with_link("a", "d")
    g = m.graph
    assert g.nodes["a"]["flops"] == 1e9 and g.edges["a", "b"]["bandwidth_bps"] == 10e6
    assert nx.is_frozen(g)


# ---- validation ---------------------------------------------------------------------
BAD_FILES = [
    ("name: x\ndevices:\n  a: rpi4\n  b: [oops\n", r"bad\.yaml:5:.*YAML error.*line 4"),
    ("name: x\ndevices:\n  a: rpi4\n  a: rpi3bplus\n", r"bad\.yaml:4:.*duplicate key 'a'"),
    ("name: x\ndevices:\n  a: not_a_board\n", r"unknown device profile 'not_a_board'.*rpi4"),
    ("name: x\ndevices:\n  a: rpi4\nlinks:\n  - [a, ghost, 10]\n",
     r"unknown device 'ghost'"),
    ("name: x\ndevices:\n  a: rpi4\n  b: rpi4\nlinks:\n  - [a, b, 0]\n",
     r"bandwidth_mbps is 0\.0; it must be > 0"),
    ("name: x\ndevices:\n  a: rpi4\n  b: rpi4\nlinks:\n  - [a, b, -5]\n", r"must be > 0"),
    ("name: x\ndevices:\n  a: rpi4\nlinks:\n  - [a, a, 10]\n", r"self-loop"),
    ("name: x\ndevices:\n  a: rpi4\n  b: rpi4\nlinks:\n  - [a, b, 10]\n  - [b, a, 20]\n",
     r"listed twice"),
    ("name: x\ndevices:\n  a: {flops: 0, memory_bytes: 1 GiB, power: {compute_w: 1, tx_w: 1}}\n",
     r"flops is 0\.0; it must be a positive"),
    ("name: x\ndevices:\n  a: {flops: 1e9}\n", r"missing: memory_bytes, power"),
    ("name: x\ndevices:\n  a: {profile: rpi4, flop: 3}\n", r"unknown field\(s\) flop"),
    ("name: x\ndevices:\n  a: rpi4\ndefaults: {source: zz}\n", r"defaults\.source is 'zz'"),
    ("name: x\ndevices:\n  a/b: rpi4\n", r"device id 'a/b' is invalid"),
    ("name: x\ndevices: {}\n", r"non-empty mapping"),
    ("name: x\ndevices:\n  a: {profile: rpi4, memory_bytes: 12 parsecs}\n", r"12 parsecs"),
]


@pytest.mark.parametrize("text, pattern", BAD_FILES)
def test_bad_topology_files(tmp_path, text, pattern):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TopologyError, match=pattern):
        load_topology(path)


def test_unknown_topology_name_lists_known():
    with pytest.raises(TopologyError, match=r"unknown topology 'nope'.*disnet-net0"):
        load_topology("nope")
    with pytest.raises(TopologyError, match="file not found"):
        load_topology("/nonexistent/x.yaml")


def test_profile_overrides_and_explicit_devices(tmp_path):
    (tmp_path / "myboard.yaml").write_text(
        "name: myboard\nflops: 2.5e+9\nmemory_bytes: 512 MiB\n"
        "power: {compute_w: 4, tx_w: 2}\n")
    (tmp_path / "t.yaml").write_text(
        "name: t\ndevices:\n"
        "  a: {profile: rpi4, flops: 3.0e9, power: {idle_w: 0.1}}\n"
        "  b: {flops: 1e9, memory_bytes: 1 GiB, power: {compute_w: 2, tx_w: 1}}\n"
        "  c: {profile: myboard.yaml}\n"
        "  0: generic\n"
        "links:\n  - {a: a, b: b, bandwidth_mbps: 10}\n  - [b, c, 20, 4]\n  - [c, '0', 5]\n")
    m = load_topology(tmp_path / "t.yaml")
    a, b, c = m.devices["a"], m.devices["b"], m.devices["c"]
    assert a.flops == 3e9 and a.power.idle_w == 0.1 and a.power.compute_w == 6.4
    assert b.profile == "custom" and b.power.rx_w == 1 and b.memory_bytes == 2**30
    assert c.profile == "myboard" and c.memory_bytes == 512 * 2**20 and c.flops == 2.5e9
    assert m.link("a", "b").latency_s == 0.001 and m.link("b", "c").latency_s == 0.004
    assert "0" in m.devices
    # dump -> load gives the same mesh
    (tmp_path / "again.yaml").write_text(dump_topology(m))
    again = load_topology(tmp_path / "again.yaml")
    assert {d: (v.flops, v.memory_bytes, v.power) for d, v in again.devices.items()} == \
        {d: (v.flops, v.memory_bytes, v.power) for d, v in m.devices.items()}
    assert {l.key: (l.bandwidth_bps, l.latency_s) for l in again.links} == \
        {l.key: (l.bandwidth_bps, l.latency_s) for l in m.links}


def test_mesh_constructor_validates():
    p = Power(1, 1, 1)
    with pytest.raises(TopologyError, match="unknown device 'x'"):
        Mesh("m", {"a": Device("a", "g", 1e9, 1, p)}, (Link("a", "x", 1e6),))
    with pytest.raises(TopologyError, match="positive"):
        Mesh("m", {"a": Device("a", "g", -1.0, 1, p)})


# ---- generation ---------------------------------------------------------------------
@pytest.mark.parametrize("n, mix, expected", [
    (50, {"x": .45, "y": .45, "z": .10}, {"x": 23, "y": 22, "z": 5}),
    (10, {"x": 1, "y": 1}, {"x": 5, "y": 5}),
    (3, {"x": .5, "y": .3, "z": .2}, {"x": 1, "y": 1, "z": 1}),   # 1.5, .9, .6
    (7, {"only": 1.0}, {"only": 7}),
])
def test_mix_counts(n, mix, expected):
    assert mix_counts(n, mix) == expected


def test_random_mesh_500_connected_and_fast():
    random_mesh(20, 0)  # warm the profile files
    t0 = time.perf_counter()
    m = random_mesh(500, seed=1)
    elapsed = time.perf_counter() - t0
    assert len(m.devices) == 500 and m.is_connected()
    assert elapsed < 0.5, f"random_mesh(500) took {elapsed:.3f} s"
    assert all(20e6 <= l.bandwidth_bps <= 100e6 for l in m.links)
    assert random_mesh(500, seed=1) == m          # deterministic


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 10_000), radius=st.floats(0.5, 10))
def test_random_mesh_always_connected(n, seed, radius):
    m = random_mesh(n, seed, radius=radius, mix={"generic": 1.0})
    assert len(m.devices) == n and m.is_connected()


# ---- live state ---------------------------------------------------------------------
CAPS = {"profile": "rpi4", "flops": 1.12e9, "memory_bytes": 2**32,
        "power": {"compute_w": 6.4, "tx_w": 3.6, "rx_w": 3.4, "idle_w": 2.7}}
ON_A1, ON_B1 = NodeOnline("a", CAPS, 1), NodeOnline("b", CAPS, 1)
TEL_A = Telemetry("a", load=0.5, links={"b": {"rtt_s": 0.004, "throughput_bps": 30e6}})

FOLDS = [
    ("join", [ON_A1, ON_B1], ["a", "b"]),
    ("leave", [ON_A1, ON_B1, NodeOffline("b", 1)], ["a"]),
    ("rejoin newer session", [ON_A1, NodeOffline("a", 1), NodeOnline("a", CAPS, 2)], ["a"]),
    ("stale offline ignored", [ON_A1, NodeOnline("a", CAPS, 2), NodeOffline("a", 1)], ["a"]),
    ("stale online ignored", [NodeOnline("a", CAPS, 2), NodeOffline("a", 2),
                              NodeOnline("a", CAPS, 1)], []),
    ("reconnect after the will fired", [ON_A1, NodeOffline("a", 1), ON_A1], ["a"]),
    ("offline before any online", [NodeOffline("a", 3), NodeOnline("a", CAPS, 2)], []),
    ("telemetry from unknown node ignored", [TEL_A], []),
    ("duplicate online refreshes", [ON_A1, ON_A1, ON_B1], ["a", "b"]),
]


@pytest.mark.parametrize("name, events, online", FOLDS, ids=[f[0] for f in FOLDS])
def test_mesh_state_fold(name, events, online):
    state = fold(events)
    assert state.online == online
    # purity: folding again from scratch gives the same, and the input is untouched
    assert fold(events) == state
    empty = MeshState()
    apply(empty, ON_A1)
    assert empty.members == {}


def test_state_is_immutable():
    state = fold([ON_A1])
    with pytest.raises(TypeError):
        state.members["x"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        state.members = {}  # type: ignore[misc]


@pytest.mark.parametrize("events, expected_bw, expected_lat", [
    ([ON_A1, ON_B1, TEL_A], 30e6, 0.002),                       # measured
    ([ON_A1, ON_B1], 10e6, 0.001),                              # base fallback
    ([ON_A1, ON_B1, Telemetry("a", 0.1, {"b": {"rtt_s": 0.02}})], 10e6, 0.01),  # partial
    # both ends report: the conservative pair (b's rate, a's RTT: b measured none)
    ([ON_A1, ON_B1, TEL_A, Telemetry("b", 0.2, {"a": {"throughput_bps": 5e6}})], 5e6, 0.002),
])
def test_telemetry_updates_links(events, expected_bw, expected_lat):
    base = small_mesh()
    live = fold(events).to_mesh(base)
    assert set(live.devices) == {"a", "b"}
    link = live.link("a", "b")
    assert link.bandwidth_bps == expected_bw and link.latency_s == pytest.approx(expected_lat)


def test_to_mesh(caplog):
    base = small_mesh()
    state = fold([ON_A1, ON_B1, NodeOnline("c", {"flops": 5e9}, 7), TEL_A,
                  Telemetry("c", 0.9, {"d": {"rtt_s": 0.1, "throughput_bps": 1e6}})])
    live = state.to_mesh(base)
    assert set(live.devices) == {"a", "b", "c"}            # d never joined
    assert live.devices["a"].flops == 1.12e9 and live.devices["a"].meta["load"] == 0.5
    assert live.devices["c"].flops == 5e9                  # advertised
    assert live.devices["c"].memory_bytes == 2**30         # from the base device
    assert {l.key for l in live.links} == {frozenset("ab"), frozenset("bc"), frozenset("ac")}
    # a node going offline drops its measurements; a rejoin does not resurrect them
    later = fold([NodeOffline("a", 1), NodeOnline("a", CAPS, 2)], state)
    assert later.to_mesh(base).link("a", "b").bandwidth_bps == 10e6
    # partial power is completed from the base device
    part = fold([NodeOnline("a", {"power": {"compute_w": 9.0}}, 1)]).to_mesh(base)
    assert part.devices["a"].power == Power(9.0, 1.0, 1.0, 0.5)
    # without a base, a node must advertise every figure
    assert fold([ON_A1]).to_mesh().devices["a"].power.compute_w == 6.4
    # ... else it is left out with a logged reason (it never stops planning)
    with caplog.at_level("WARNING"):
        assert not fold([NodeOnline("x", {"flops": 1e9}, 1)]).to_mesh().devices
    assert "advertised no 'memory_bytes', 'power'" in caplog.text


def test_stale_telemetry_session_ignored():
    state = fold([ON_A1, NodeOnline("a", CAPS, 2), ON_B1,
                  Telemetry("a", 0.3, {"b": {"throughput_bps": 1e6}}, session=1)])
    assert state.links == {} and state.members["a"].load == 0.0


@pytest.mark.parametrize("old, new, changed", [
    (Link("a", "b", 10e6, 0.002), Link("a", "b", 12e6, 0.002), False),
    (Link("a", "b", 10e6, 0.002), Link("a", "b", 6e6, 0.002), True),
    (Link("a", "b", 10e6, 0.002), Link("a", "b", 14e6, 0.002), True),
    (Link("a", "b", 10e6, 0.002), Link("a", "b", 10e6, 0.0025), False),   # under 1 ms floor
    (Link("a", "b", 10e6, 0.010), Link("a", "b", 10e6, 0.020), True),
    (None, Link("a", "b", 10e6), True),
    (Link("a", "b", 10e6), None, True),
    (None, None, False),
])
def test_link_changed(old, new, changed):
    assert link_changed(old, new, threshold=0.3) is changed


def test_changed_links_between_meshes():
    m = small_mesh()
    m2 = m.with_link("a", "b", bandwidth_mbps=1).without(["d"])
    assert changed_links(m, m2) == [("a", "b"), ("c", "d")]
