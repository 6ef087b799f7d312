"""Telemetry: this node's load and link figures per mesh neighbour.

Emulated nodes report their topology's link figures (``rtt_s = 2 * latency``,
``throughput_bps = bandwidth``), with overrides set through ``set_link`` probes
(tests and demos degrade a link this way). Real nodes measure: a small ping gives
the RTT, a larger one the throughput (``extra bytes / extra time``), both over the
broker, a few peers per period in round robin.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Callable, Mapping

from meshdl.mesh import Mesh
from meshdl.node.probe import Probe, encode_probe
from meshdl.wire.topics import node_probe as probe_topic
from meshdl.wire.control import Telemetry

log = logging.getLogger(__name__)

SMALL_PAD = 64
BIG_PAD = 64 << 10
PROBE_TIMEOUT = 1.0


def host_load() -> float:
    """1-minute load average per CPU (0 when unknown)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return 0.0


def topology_links(base: Mesh | None, me: str,
                   overrides: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Link figures of an emulated node from its topology, overrides applied."""
    out: dict[str, dict[str, float]] = {}
    if base is not None and me in base.devices:
        for nb in base.neighbours(me):
            link = base.link(me, nb)
            out[nb] = {"rtt_s": 2.0 * link.latency_s, "throughput_bps": link.bandwidth_bps}
    for nb, fig in overrides.items():
        cur = out.setdefault(nb, {"rtt_s": 0.002, "throughput_bps": 1e8})
        if fig.get("latency_s") is not None:
            cur["rtt_s"] = 2.0 * float(fig["latency_s"])
        if fig.get("bandwidth_bps") is not None:
            cur["throughput_bps"] = float(fig["bandwidth_bps"])
    return out


def telemetry_message(node: str, session: int, links: Mapping[str, Mapping[str, float]],
                      view: tuple, role: str) -> Telemetry:
    """The periodic record; ``extra`` carries the session (stale-life filter) and the
    node's view (leader, term, adopted plan ids) so observers can check agreement."""
    return Telemetry(node, time.time(), host_load(), {k: dict(v) for k, v in links.items()},
                     {"session": session, "leader": view[0] or "", "term": view[1],
                      "plans": list(view[2]), "role": role})


class Prober:
    """Measures RTT/throughput to peers with ping/pong probes over the broker."""

    def __init__(self, bus, mesh: str, me: str, session: int) -> None:
        self._bus, self._mesh, self._me, self._session = bus, mesh, me, session
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[float]]] = {}
        self._results: dict[str, dict[str, float]] = {}
        self._cursor = 0

    def on_pong(self, p: Probe) -> None:
        with self._lock:
            entry = self._waiting.get(p.nonce)
        if entry is not None:
            entry[1].append(time.perf_counter())
            entry[0].set()

    def _ping(self, peer: str, pad: int) -> float | None:
        nonce = uuid.uuid4().hex[:16]
        done: tuple[threading.Event, list[float]] = (threading.Event(), [])
        with self._lock:
            self._waiting[nonce] = done
        try:
            t0 = time.perf_counter()
            self._bus.publish(probe_topic(self._mesh, peer),
                              encode_probe(Probe("ping", self._me, self._session, nonce,
                                                 time.time(), b"\0" * pad)))
            if not done[0].wait(PROBE_TIMEOUT):
                return None
            return done[1][0] - t0
        finally:
            with self._lock:
                self._waiting.pop(nonce, None)

    def measure(self, peer: str) -> dict[str, float] | None:
        small = self._ping(peer, SMALL_PAD)
        big = self._ping(peer, BIG_PAD) if small is not None else None
        if small is None or big is None:
            return None
        extra = max(big - small, 1e-6)
        fig = {"rtt_s": small, "throughput_bps": 2 * (BIG_PAD - SMALL_PAD) * 8 / extra}
        with self._lock:
            self._results[peer] = fig
        return fig

    def round(self, peers: list[str], count: int) -> None:
        """Probe ``count`` peers (round robin); forget peers that left."""
        peers = sorted(p for p in peers if p != self._me)
        with self._lock:
            self._results = {p: f for p, f in self._results.items() if p in peers}
        if not peers:
            return
        for i in range(min(count, len(peers))):
            peer = peers[(self._cursor + i) % len(peers)]
            try:
                if self.measure(peer) is None:
                    log.debug("no probe answer from %s", peer)
            except Exception as exc:  # a dead bus must not kill the probe thread
                log.debug("probe to %s failed: %s", peer, exc)
        self._cursor += count

    def results(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {p: dict(f) for p, f in self._results.items()}


class Periodic(threading.Thread):
    """Calls ``fn`` every ``period`` seconds until stopped (errors are logged)."""

    def __init__(self, period: float, fn: Callable[[], None], name: str) -> None:
        super().__init__(daemon=True, name=name)
        self._period, self._fn = period, fn
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._fn()
            except Exception:
                log.exception("%s failed; continuing", self.name)

    def stop(self) -> None:
        self._stop.set()
