"""Telemetry measures and does not flap: probe arithmetic, the re-plan gate, measured
access links on a star, plan ids stable across jobs on hand-started nodes."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

import meshdl
from meshdl.mesh import MeshState, NodeOnline, ReplanGate, Telemetry, apply, parse_topology
from meshdl.node.telemetry import BIG_PAD, MIN_EXTRA_S, SMALL_PAD, median_figures, probe_figures


def test_probe_figures_units_and_resolution():
    # 64 KiB padding crossing twice in 10.5 ms more than the small ping: ~100 Mbit/s
    fig = probe_figures(0.002, 0.002 + 2 * (BIG_PAD - SMALL_PAD) * 8 / 100e6)
    assert fig["throughput_bps"] == pytest.approx(100e6)
    assert fig["rtt_s"] == 0.002
    # a padded ping no slower than the small one (loopback): the probe's resolution, not
    # 1,047,552 Mbit/s (what dividing by 1 us gave)
    fast = probe_figures(0.0010, 0.0009)
    assert fast["throughput_bps"] == pytest.approx(2 * (BIG_PAD - SMALL_PAD) * 8 / MIN_EXTRA_S)
    assert fast["throughput_bps"] < 1e9
    assert median_figures([{"x": 1.0}, {"x": 9.0}, {"x": 2.0}]) == {"x": 2.0}


STAR = """
name: s
broker: {host: r}
devices:
  a: {flops: 1.0e+9, memory_bytes: 1 GiB, power: {compute_w: 1, tx_w: 1},
      access: {up_mbps: 10, down_mbps: 30, latency_ms: 2}}
  b: {flops: 1.0e+9, memory_bytes: 1 GiB, power: {compute_w: 1, tx_w: 1},
      access: {bandwidth_mbps: 20, latency_ms: 1}}
"""


def test_measured_access_link_replaces_the_declared_one():
    base = parse_topology(yaml.safe_load(STAR))
    st = MeshState()
    for d in ("a", "b"):
        st = apply(st, NodeOnline(d, {"profile": "custom"}, 1))
    # a measured its access link: series rate 3.75 Mbit/s (declared 7.5), latency 4 ms
    st = apply(st, Telemetry("a", 0.0, {"@broker": {"rtt_s": 0.008,
                                                    "throughput_bps": 3.75e6}}, 1))
    live = st.to_mesh(base=base)
    acc = live.star.access["a"]
    assert (acc.up_bps, acc.down_bps) == pytest.approx((5e6, 15e6))   # ratio kept
    assert acc.latency_s == pytest.approx(0.004)
    assert live.star.access["b"] == base.star.access["b"]


def _two(bw_a: float) -> meshdl.Mesh:
    return parse_topology(yaml.safe_load(STAR)).with_access("a", bandwidth_bps=bw_a)


@pytest.mark.parametrize("seq, expect", [
    # (time, bandwidth of a) -> re-plan?  threshold 30 %, confirm 1 s
    ([(0.0, 10e6)], [False]),                                  # no change
    ([(0.0, 5e6), (0.5, 5e6), (1.1, 5e6)], [False, False, True]),   # persists: re-plan
    ([(0.0, 5e6), (0.5, 10e6), (1.2, 5e6), (2.3, 5e6)], [False, False, False, True]),
    ([(0.0, 8e6), (2.0, 8e6)], [False, False]),                # within the threshold
])
def test_replan_gate_needs_a_change_that_persists(seq, expect):
    planned = _two(10e6)
    gate = ReplanGate(0.3, 1.0)
    got = [gate.check(planned, _two(bw), t) for t, bw in seq]
    assert got == expect


def test_replan_gate_replans_at_once_when_devices_change():
    planned = _two(10e6)
    gate = ReplanGate(0.3, 10.0)
    assert gate.check(None, planned, 0.0)
    assert gate.check(planned, planned.without(["b"]), 0.0)


@pytest.mark.slow
def test_plan_id_stable_across_jobs_on_hand_started_nodes(tmp_path):
    """Three real (not emulated) nodes, as a new user starts them: every job of a stable
    mesh gets the same plan (it used to re-plan every job on absurd link figures)."""
    from meshdl.client import MeshClient
    from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    import torch
    with EmbeddedBroker(backend="mosquitto") as b:
        procs = []
        try:
            for n in ("h1", "h2", "h3"):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "meshdl.cli", "node", "start", "--broker", b.url,
                     "--mesh", "i11hand", "--id", n, "--models", "tiny_cnn",
                     "--telemetry-period", "0.5"],
                    stdout=open(tmp_path / f"{n}.log", "w"), stderr=subprocess.STDOUT))
            from meshdl.node.status import MeshWatcher
            from meshdl.transport.paho_bus import PahoBus
            bus = PahoBus(b.url)
            try:
                snap = MeshWatcher(bus, "i11hand").wait_for(
                    lambda s: len(s.online) == 3 and s.agreed(need_plan=True), 120)
            finally:
                bus.close()
            assert snap is not None, "three hand-started nodes did not form a mesh"
            with MeshClient(b.url, "i11hand") as c:
                x = torch.randn(1, 3, 32, 32)
                deadline = time.monotonic() + 120
                ids = []
                while len(ids) < 6 and time.monotonic() < deadline:
                    r = c.infer(x, model="tiny_cnn", timeout=60)
                    ids.append(r.plan.plan_id)
                    time.sleep(0.6)          # a telemetry period between jobs
            assert len(ids) == 6
            assert len(set(ids[2:])) == 1, ids      # after the first measurements settle
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(20)


def test_emulated_star_node_reports_its_access_link_and_a_trace_override():
    from meshdl.node.telemetry import topology_links
    base = parse_topology(yaml.safe_load(STAR))
    links = topology_links(base, "a", {})
    assert links["@broker"]["throughput_bps"] == pytest.approx(1 / (1 / 10e6 + 1 / 30e6))
    assert links["@broker"]["rtt_s"] == pytest.approx(0.004)
    # what emulator_apply sends for a trace event "a: 4 Mbit/s" (series 2 Mbit/s)
    links = topology_links(base, "a", {"@broker": {"bandwidth_bps": 2e6}})
    st = MeshState()
    for d in ("a", "b"):
        st = apply(st, NodeOnline(d, {"profile": "custom"}, 1))
    st = apply(st, Telemetry("a", 0.0, links, 1))
    acc = st.to_mesh(base=base).star.access["a"]
    assert 1 / (1 / acc.up_bps + 1 / acc.down_bps) == pytest.approx(2e6)
    assert acc.latency_s == pytest.approx(0.002)
