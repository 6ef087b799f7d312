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
from meshdl.node.probe import CONFIRM_FRACTION
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


# ---------------------------------------------------------------- step estimates (d11)
from meshdl.node.linkestimate import (Estimate, EstimatorParams, parse_net_dev,  # noqa: E402
                                      passive_series_bps, probe_loaded, run, update)
from meshdl.node.probe import probe_pads  # noqa: E402

PERIOD = 1.0


def _noisy(n: int, value: float, rel: float, seed: int) -> list[float]:
    import random
    rnd = random.Random(seed)
    return [value * (1 + rnd.uniform(-rel, rel)) for _ in range(n)]


def _first_step_after(ests: list[Estimate], i0: int) -> int | None:
    base = ests[i0 - 1].steps
    return next((i for i in range(i0, len(ests)) if ests[i].steps > base), None)


def _probe_clock(level, t_end: float, phase: float, p: EstimatorParams, seed: int):
    """The prober's schedule (``Prober.next_wait``: a period, ``CONFIRM_FRACTION`` of it
    while a sample waits for confirmation) over a link whose true figure is ``level(t)``,
    sampled with +-10% noise: [(probe time, estimate after it)]."""
    import random
    rnd = random.Random(seed)
    t, est, out = phase, Estimate(), []
    while t < t_end:
        est = update(est, level(t) * (1 + rnd.uniform(-0.1, 0.1)), p)
        out.append((t, est))
        t += PERIOD * CONFIRM_FRACTION if est.pending else PERIOD
    return out


@pytest.mark.parametrize("factor", [0.04, 0.3, 0.55, 1.8, 3.0, 25.0])
@pytest.mark.parametrize("phase", [0.0, 0.3, 0.7, 0.99])
def test_a_step_is_seen_within_two_telemetry_periods(factor, phase):
    """A real, persistent change beyond the threshold (50%) under +-10% noise, at any
    phase of the probe clock: the estimate follows within two telemetry periods (in
    fact ~1.1: one probe a period, the confirming one CONFIRM_FRACTION of a period later), not
    after a median of old samples turns over; the figure is the new level."""
    p = EstimatorParams(0.5)
    change = 20.0
    clock = _probe_clock(lambda t: 40e6 * (factor if t >= change else 1.0), 40.0,
                         phase, p, seed=int(phase * 100))
    before = [e for t, e in clock if t < change][-1]
    seen = next((t for t, e in clock if t >= change and e.steps > before.steps), None)
    assert seen is not None
    assert seen - change <= 2 * PERIOD
    assert seen - change <= (1 + CONFIRM_FRACTION) * PERIOD + 1e-9
    last = clock[-1][1]
    assert last.value == pytest.approx(40e6 * factor, rel=0.11)
    assert last.steps == before.steps + 1                 # and no flapping after it


def test_a_step_with_a_sample_back_in_band_is_confirmed_by_the_next_two():
    """A sample back inside the band drops the pending one; the next two confirm."""
    p = EstimatorParams(0.5)
    samples = [40e6] * 10 + [10e6, 40e6, 10e6, 10e6, 10e6]
    ests = run(samples, p)
    assert _first_step_after(ests, 10) == 13
    assert ests[-1].value == pytest.approx(10e6)


@pytest.mark.parametrize("seed", range(5))
def test_noise_of_ten_percent_never_steps_nor_replans(seed):
    """+-10% noise for 500 probes: no step, the figure stays within the noise, and the
    leader's re-plan check (threshold 50%, vs the planned mesh) never fires."""
    p = EstimatorParams(0.5)
    ests = run(_noisy(500, 40e6, 0.1, seed), p)
    assert ests[-1].steps == 0
    assert all(36e6 <= e.value <= 44e6 for e in ests)
    planned = _two(2 * ests[0].value)       # the access link of a: series = value
    gate = ReplanGate(0.5, 0.0)
    replans = [gate.check(planned, _two(2 * e.value), i * 0.5) for i, e in enumerate(ests)]
    assert not any(replans)


def test_isolated_outliers_and_opposite_pairs_never_step():
    p = EstimatorParams(0.5)
    samples = []
    for i in range(60):
        samples += [40e6, 40e6 * (0.2 if i % 2 else 5.0)]   # every other probe way off
    samples += [90e6, 10e6] * 20                              # opposite sides in a row
    assert run([40e6] + samples, p)[-1].steps == 0


def test_probe_padding_follows_the_estimate_not_each_sample():
    """Paddings are sized from the estimate, which +-10% noise barely moves (a padding
    that followed each sample fed back into the next one: samples of a shaped link
    alternated 2x)."""
    samples = _noisy(200, 14e6, 0.1, 7)
    from_est = {probe_pads(e.value) for e in run(samples, EstimatorParams(0.5))[5:]}
    from_raw = {probe_pads(x) for x in samples}
    assert len(from_est) <= 8 and len(from_raw) > 100, (len(from_est), len(from_raw))


def test_loaded_probes_are_skipped_unless_the_link_stays_busy():
    """Probes queued behind the node's own data read noise, either way: skipped (no
    step), unless the link stays busy past max_skip (a slowed busy link is still
    seen, after at most confirm x (max_skip + 1) probes)."""
    p = EstimatorParams(0.5, max_skip=2)
    base = [40e6] * 5
    # busy now and then: loaded samples read 4x low or 3x high, never > max_skip in a row
    samples = base + [10e6, 40e6, 120e6, 10e6, 40e6] * 10
    loaded = [False] * 5 + [True, False, True, True, False] * 10
    ests = run(samples, p, loaded)
    assert ests[-1].steps == 0 and ests[-1].value == pytest.approx(40e6)
    # the link really slows while busy: seen after at most confirm x (max_skip + 1)
    ests = run(base + [2e6] * 8, p, [False] * 5 + [True] * 8)
    at = _first_step_after(ests, 5)
    assert at is not None and at - 5 + 1 <= p.confirm * (p.max_skip + 1)
    assert ests[-1].value == pytest.approx(2e6)


def test_rtt_estimates_have_an_absolute_floor():
    p = EstimatorParams(0.5, floor=0.002)
    # 1 ms RTT jittering to 2.5 ms: under the 2 ms floor, no step
    assert run([0.001, 0.0025, 0.0024, 0.0012, 0.0026, 0.0025], p)[-1].steps == 0
    assert run([0.001, 0.030, 0.031], p)[-1].value == pytest.approx(0.031)


def test_unusable_samples_change_nothing():
    e = update(Estimate(), 5e6)
    for bad in (float("nan"), float("inf"), -1.0, "x", None):
        assert update(e, bad) == e


def test_interface_counters_and_loaded_probes():
    text = ("Inter-|   Receive |  Transmit\n face |bytes packets|bytes packets\n"
            "    lo: 1000 5 0 0 0 0 0 0 1000 5 0 0 0 0 0 0\n"
            "  veth0: 300 3 0 0 0 0 0 0 700 4 0 0 0 0 0 0\n"
            "  eth1: 10 1 0 0 0 0 0 0 20 1 0 0 0 0 0 0\n")
    assert parse_net_dev(text) == (310, 720)
    # a busy access link carried 250 kB down in 1 s: its series rate is at least 1 Mbit/s
    assert passive_series_bps(250_000, 1_000, 1.0) == pytest.approx(1e6)
    assert passive_series_bps(10, 10, 0.0) == 0.0
    assert not probe_loaded(None, 1000)
    assert not probe_loaded(4 * 16384 + 2000, 4 * 16384)     # the probe and some control
    assert probe_loaded(4 * 16384 + 200_000, 4 * 16384)      # a data piece went by


def test_plan_ids_stay_stable_over_jobs_on_a_stable_noisy_mesh():
    """The pure pipeline a leader runs per job on a stable mesh whose measured access
    links jitter +-10% (and now and then read 3x low, one probe at a time): the gate
    never fires, so every job gets the plan made at the start (same id)."""
    base = parse_topology(yaml.safe_load(STAR))
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), input_shape=(1, 3, 32, 32),
                     name="tiny_cnn")
    p = EstimatorParams(0.5)
    est = {"a": Estimate(), "b": Estimate()}
    true = {"a": 7.5e6, "b": 10e6}                      # series rates of the declared links
    import random
    rnd = random.Random(11)
    gate, planned, ids = ReplanGate(0.5, 0.0), None, []
    for job in range(60):
        for d in est:                                     # two probes per job
            for _ in range(2):
                x = true[d] * rnd.uniform(0.9, 1.1) * (0.33 if rnd.random() < 0.1 else 1)
                est[d] = update(est[d], x, p)
        st = MeshState()
        for d in ("a", "b"):
            st = apply(st, NodeOnline(d, {"profile": "custom"}, 1))
            st = apply(st, Telemetry(d, 0.0, {"@broker": {"rtt_s": 0.004,
                                                          "throughput_bps": est[d].value}}, 1))
        live = st.to_mesh(base=base)
        if gate.check(planned, live, float(job)):
            planned = live
            ids.append(meshdl.plan(g, live, strategy="meshdl", source="a",
                                   sink="a").plan_id)
        else:
            ids.append(ids[-1])
    assert len(set(ids)) == 1, ids


def test_both_ends_of_a_link_reporting_different_figures_do_not_alternate():
    """Two ends measure one device-to-device link differently: the folded figure is
    the conservative pair whichever reported last (it used to be the last report, so
    the leader saw the link flip every period), and it recovers once both say so."""
    mesh = meshdl.load_topology("home-4")
    st = MeshState()
    for d in mesh.devices:
        st = apply(st, NodeOnline(d, {"profile": "custom"}, 1))
    key = frozenset(("pi4-a", "pi4-b"))
    seen = []
    for i in range(6):
        a = Telemetry("pi4-a", 0.0, {"pi4-b": {"rtt_s": 0.004, "throughput_bps": 1e5}}, 1)
        b = Telemetry("pi4-b", 0.0, {"pi4-a": {"rtt_s": 0.002, "throughput_bps": 5e7}}, 1)
        for ev in ((a, b) if i % 2 else (b, a)):
            st = apply(st, ev)
            seen.append((st.links[key].throughput_bps, st.links[key].rtt_s))
    assert set(seen[1:]) == {(1e5, 0.004)}
    st = apply(st, Telemetry("pi4-a", 0.0, {"pi4-b": {"throughput_bps": 6e7}}, 1))
    assert st.links[key].throughput_bps == 5e7         # both ends now say fast
