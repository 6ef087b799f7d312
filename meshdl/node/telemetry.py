"""Telemetry: this node's load and link figures per mesh neighbour.

Emulated nodes report their topology's link figures (``rtt_s = 2 * latency``,
``throughput_bps = bandwidth``), with overrides set through ``set_link`` probes
(tests and demos degrade a link this way). Real nodes measure: a small ping gives
the RTT, a larger one the throughput (``extra bytes / extra time``), both over the
broker, a few peers per period in round robin.

Nodes on shaped links (``mesh up --netns``) measure their own access link: a ping
to themselves crosses the uplink and the downlink (through the broker) and the pong
does again; it is reported as the link to ``@broker`` (throughput = the series rate
``1 / (1/up + 1/down)``; latency = the latency the node adds itself, since a veth
adds next to none and a ping queued behind data would overstate it). Figures are
the median of the last ``SAMPLES`` probes (on shaped links the leader re-plans on a
50% change); a probe whose padded ping is not measurably slower than the small one (a fast link, e.g.
loopback) is reported at the probe's resolution ``2 * pad / MIN_EXTRA_S`` instead
of dividing by almost nothing (the 1,047,552 Mbit/s figures of hand-started nodes).
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
MIN_EXTRA_S = 0.002        # the probe cannot resolve a rate whose extra time is below this
BIG_TIMEOUT = 3.0          # a padded probe slower than this: the link is at most pad/this
MIN_PAD = 16 << 10
TARGET_EXTRA_S = 0.05      # padding sized so a probe adds ~this much on the last rate
SAMPLES = 5                # median of the last probes per peer
BROKER = "@broker"


def probe_figures(small_s: float, big_s: float, pad_bytes: int = BIG_PAD - SMALL_PAD,
                  crossings: int = 2) -> dict[str, float]:
    """RTT and throughput (bit/s) from a small and a padded ping whose padding
    crosses the path ``crossings`` times (ping there, pong back)."""
    extra = max(big_s - small_s, MIN_EXTRA_S)
    return {"rtt_s": small_s, "throughput_bps": crossings * pad_bytes * 8.0 / extra}


def median_figures(samples: list[dict[str, float]]) -> dict[str, float]:
    import statistics
    return {k: float(statistics.median(s[k] for s in samples)) for k in samples[-1]}


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
        acc = base.star.link_of(me) if base.star is not None else None
        if acc is not None:       # a star: the access link (series rate, as measured)
            out[BROKER] = {"rtt_s": 2.0 * acc.latency_s,
                           "throughput_bps": 1.0 / (1.0 / acc.up_bps + 1.0 / acc.down_bps)}
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

    def __init__(self, bus, mesh: str, me: str, session: int,
                 access_latency_s: float | None = None) -> None:
        """``access_latency_s`` set: measure this node's access link to the broker
        (shaped links) instead of peers; the value is the latency the node itself adds."""
        self._bus, self._mesh, self._me, self._session = bus, mesh, me, session
        self._access = access_latency_s
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[float]]] = {}
        self._results: dict[str, dict[str, float]] = {}
        self._samples: dict[str, list[dict[str, float]]] = {}
        self._cursor = 0

    def on_pong(self, p: Probe) -> None:
        with self._lock:
            entry = self._waiting.get(p.nonce)
        if entry is not None:
            entry[1].append(time.perf_counter())
            entry[0].set()

    def _ping(self, peer: str, pad: int, timeout: float = PROBE_TIMEOUT) -> float | None:
        nonce = uuid.uuid4().hex[:16]
        done: tuple[threading.Event, list[float]] = (threading.Event(), [])
        with self._lock:
            self._waiting[nonce] = done
        try:
            t0 = time.perf_counter()
            self._bus.publish(probe_topic(self._mesh, peer),
                              encode_probe(Probe("ping", self._me, self._session, nonce,
                                                 time.time(), b"\0" * pad)))
            if not done[0].wait(timeout):
                return None
            return done[1][0] - t0
        finally:
            with self._lock:
                self._waiting.pop(nonce, None)

    def measure(self, peer: str) -> dict[str, float] | None:
        """Probe ``peer`` (``@broker``: this node's own access link); the median of the
        last SAMPLES figures is kept as its result."""
        target = self._me if peer == BROKER else peer
        with self._lock:
            last = self._results.get(peer)
        pad = BIG_PAD
        if last is not None:      # a slow link gets a smaller probe (bounded time)
            pad = int(min(BIG_PAD, max(MIN_PAD, last["throughput_bps"] * TARGET_EXTRA_S / 16)))
        small = self._ping(target, SMALL_PAD)
        if small is None:
            return None
        big = self._ping(target, pad, BIG_TIMEOUT)
        if big is None:           # slower than the timeout allows: report that bound
            big = small + BIG_TIMEOUT
        fig = probe_figures(small, big, pad - SMALL_PAD)
        if peer == BROKER:
            # the latency is the node's own (netem is absent; a veth adds ~0); a small
            # ping queued behind data on the shaped link would overstate it badly
            fig["rtt_s"] = 2.0 * (self._access or 0.0)
        with self._lock:
            samples = self._samples.setdefault(peer, [])
            samples.append(fig)
            del samples[:-SAMPLES]
            self._results[peer] = median_figures(samples)
            return dict(self._results[peer])

    def round(self, peers: list[str], count: int) -> None:
        """Probe ``count`` peers (round robin); forget peers that left. Measuring the
        access link: probe it once."""
        if self._access is not None:
            try:
                if self.measure(BROKER) is None:
                    log.debug("no answer to the access-link probe")
            except Exception as exc:      # a dead bus must not kill the probe thread
                log.debug("access probe failed: %s", exc)
            return
        peers = sorted(p for p in peers if p != self._me)
        with self._lock:
            self._results = {p: f for p, f in self._results.items() if p in peers}
            self._samples = {p: f for p, f in self._samples.items() if p in peers}
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


def access_latency(base: Mesh | None, me: str) -> float:
    """The latency a node on a shaped link adds itself (its topology access figure)."""
    if base is None or base.star is None:
        return 0.0
    acc = base.star.link_of(me)
    return acc.latency_s if acc is not None else 0.0


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
