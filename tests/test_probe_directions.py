"""Per-direction access-link figures (issue 11): each direction of a node's access link
measured on its own (node/probe_dir.py) shapes the measured series rate into an uplink
and a downlink in the live mesh; a fake bus with known one-way rates is read back."""
from __future__ import annotations

import threading
import time

import pytest
import yaml

from meshdl.mesh import MeshState, NodeOnline, Telemetry, apply, parse_topology
from meshdl.node.probe import MIN_EXTRA_S
from meshdl.node.probe_dir import MAX_FAILS, DirectionProbe
from test_telemetry import STAR


def _live(links: list[dict]):
    base = parse_topology(yaml.safe_load(STAR))
    st = MeshState()
    for d in ("a", "b"):
        st = apply(st, NodeOnline(d, {"profile": "custom"}, 1))
    for fig in links:
        st = apply(st, Telemetry("a", 0.0, {"@broker": fig}, 1))
    return st.to_mesh(base=base).star.access["a"]


def test_measured_directions_shape_the_series_rate():
    # declared 10 up / 30 down; measured: the downlink alone slowed (tc on one side)
    acc = _live([{"rtt_s": 0.004, "throughput_bps": 0.8e6, "up_bps": 9e6, "down_bps": 1e6}])
    series = 1.0 / (1.0 / acc.up_bps + 1.0 / acc.down_bps)
    assert series == pytest.approx(0.8e6)                        # the series level holds
    assert acc.up_bps / acc.down_bps == pytest.approx(9.0)        # the measured shape
    # a later report without directions keeps the last measured shape
    acc2 = _live([{"rtt_s": 0.004, "throughput_bps": 0.8e6, "up_bps": 9e6, "down_bps": 1e6},
                  {"rtt_s": 0.004, "throughput_bps": 1.6e6}])
    assert acc2.up_bps / acc2.down_bps == pytest.approx(9.0)
    assert acc2.down_bps == pytest.approx(2 * acc.down_bps)
    # unusable directions are ignored: the declared shape (1:3) stays
    acc3 = _live([{"rtt_s": 0.004, "throughput_bps": 3.75e6, "up_bps": float("nan"),
                   "down_bps": -1.0}])
    assert (acc3.up_bps, acc3.down_bps) == pytest.approx((5e6, 15e6))


class _Info:
    def __init__(self, delay: float) -> None:
        self._at = time.perf_counter() + delay

    def wait_for_publish(self, timeout: float) -> None:
        time.sleep(max(0.0, min(timeout, self._at - time.perf_counter())))

    def is_published(self) -> bool:
        return time.perf_counter() >= self._at


class _Bus:
    """A broker behind links of ``up_bps`` and ``down_bps`` (1 ms fixed each way)."""

    def __init__(self, up_bps: float, down_bps: float) -> None:
        self.up, self.down = up_bps, down_bps
        self.retained: dict[str, bytes] = {}
        self.subs: dict[str, object] = {}

    def publish(self, topic, payload, qos=0, retain=False):
        if retain:
            self.retained[topic] = bytes(payload)
        return _Info(0.001 + len(payload) * 8 / self.up)

    def subscribe(self, topic, handler, qos=0):
        payload = self.retained.get(topic, b"")
        self.subs[topic] = handler
        delay = 0.001 + len(payload) * 8 / self.down
        threading.Timer(delay, lambda: self.subs.get(topic) and handler(
            topic, payload, True)).start()

    def unsubscribe(self, topic):
        self.subs.pop(topic, None)


@pytest.mark.parametrize("up,down", [(8e6, 2e6), (2e6, 8e6), (4e6, 4e6)])
def test_direction_probe_reads_each_direction(up, down):
    bus = _Bus(up, down)
    probe = DirectionProbe(bus, "m", "a", MIN_EXTRA_S)
    got = probe.measure(8 << 10, 32 << 10, lambda n: 2.0)
    assert got is not None
    assert got[0] == pytest.approx(up, rel=0.25)
    assert got[1] == pytest.approx(down, rel=0.25)
    assert set(probe.topics) <= set(bus.retained)
    assert not any(bus.retained.values()), "padding left retained on the broker"


def test_direction_probe_stops_after_misses():
    bus = _Bus(8e6, 2e6)
    bus.subscribe = lambda topic, handler, qos=0: None      # a broker that refuses them
    probe = DirectionProbe(bus, "m", "a", MIN_EXTRA_S)
    for _ in range(MAX_FAILS):
        assert probe.enabled
        assert probe.measure(1024, 4096, lambda n: 0.05) is None
    assert not probe.enabled


def _directions(up, node: str):
    snap = up.watcher.snapshot()
    t = snap.telemetry.get(node)
    fig = (t.links or {}).get("@broker", {}) if t is not None else {}
    return fig.get("up_bps"), fig.get("down_bps")


def _until(up, node: str, ok, timeout: float):
    end, last = time.monotonic() + timeout, (None, None)
    while time.monotonic() < end:
        last = _directions(up, node)
        if None not in last and ok(*last):
            return last
        time.sleep(0.2)
    return last


@pytest.mark.slow
def test_one_direction_shaped_with_tc_is_read_in_that_direction(tmp_path):
    """``mesh up home-wifi --netns``; tc changes pi4-b's downlink alone, then its uplink
    alone: the node's telemetry reports the changed direction within 25% of the new
    rate and the other one still well above it."""
    from meshdl.node.netns import unavailable_reason
    from meshdl.node.netns_up import NetnsMeshUp
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"netns tests: {reason}")
    dev, slow = "pi4-b", 6e6                      # declared 60 / 60 Mbit/s
    with NetnsMeshUp("home-wifi", mesh="dirs", log_dir=tmp_path / "logs",
                     telemetry_period=0.5) as up:
        up.wait_ready(300)
        near = lambda v, want: abs(v - want) <= 0.25 * want       # noqa: E731
        got = _until(up, dev, lambda u, d: near(u, 60e6) and near(d, 60e6), 30)
        assert None not in got and near(got[0], 60e6) and near(got[1], 60e6), got
        up.shape(dev, down_bps=slow)                               # downlink only
        got = _until(up, dev, lambda u, d: near(d, slow) and u > 4 * slow, 30)
        assert near(got[1], slow) and got[0] > 4 * slow, got
        up.shape(dev, up_bps=slow, down_bps=60e6)                  # now the uplink only
        got = _until(up, dev, lambda u, d: near(u, slow) and d > 4 * slow, 30)
        assert near(got[0], slow) and got[1] > 4 * slow, got


def test_path_time_prices_a_star_route_and_leaves_out_a_paced_first_uplink():
    from meshdl.node.pathtime import path_time
    mesh = parse_topology(yaml.safe_load(STAR))        # a: 10 up / 30 down, b: 20 / 20
    n = 1_000_000
    full = path_time(mesh, ["a", "b"], n)
    assert full == pytest.approx(0.002 + 8e6 / 10e6 + 0.001 + 8e6 / 20e6)
    assert path_time(mesh, ["a", "b"], n, first_up=False) == pytest.approx(0.001 + 0.4)
    relay = path_time(mesh, ["a", "b", "a"], n, first_up=False)
    assert relay == pytest.approx(0.001 + 0.4 + (0.001 + 0.4) + (0.002 + 8e6 / 30e6))


def test_direction_probe_keeps_measuring_after_it_once_worked():
    bus = _Bus(8e6, 2e6)
    probe = DirectionProbe(bus, "m", "a", MIN_EXTRA_S)
    assert probe.measure(8 << 10, 32 << 10, lambda n: 2.0) is not None
    bus.subscribe = lambda topic, handler, qos=0: None      # the link stalls
    for _ in range(MAX_FAILS + 1):
        assert probe.measure(1024, 4096, lambda n: 0.05) is None
    assert probe.enabled                        # a slow link, not a refusal
