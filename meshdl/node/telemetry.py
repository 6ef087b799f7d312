"""Telemetry: this node's load and link figures per mesh neighbour.

Emulated nodes report their topology's link figures (``rtt_s = 2 * latency``,
``throughput_bps = bandwidth``), with overrides set through ``set_link`` probes
(tests and demos degrade a link this way). Real nodes measure (``node.probe.Prober``):
an empty ping gives the RTT, two padded ones the throughput (``extra bytes / extra
time``, past any burst), all over the broker, a few peers per period in round robin.

Nodes on shaped links (``mesh up --netns``) measure their own access link: a ping
to themselves crosses the uplink and the downlink (through the broker) and the pong
does again; it is reported as the link to ``@broker`` (throughput = the series rate
``1 / (1/up + 1/down)``; latency = the latency the node adds itself, since a veth
adds next to none and a ping queued behind data would overstate it). Figures are
step-detecting estimates (``node/linkestimate.py``): a change beyond the threshold
seen by two probes in a row is published at once (the confirming probe runs a
quarter period after the first), noise within it never moves a figure past it, and probes
queued behind this node's own data are skipped (on shaped links the leader re-plans
on a 50% change); a probe whose padded ping is not measurably slower than the small one (a fast link, e.g.
loopback) is reported at the probe's resolution ``2 * extra pad / MIN_EXTRA_S`` instead
of dividing by almost nothing (the 1,047,552 Mbit/s figures of hand-started nodes).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Mapping

from meshdl.mesh import Mesh
from meshdl.node.probe import (BIG_PAD, BROKER, MIN_EXTRA_S, SAMPLES, SMALL_PAD,  # noqa: F401
                               Prober, median_figures, probe_figures)
from meshdl.wire.control import Telemetry

log = logging.getLogger(__name__)


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


def access_latency(base: Mesh | None, me: str) -> float:
    """The latency a node on a shaped link adds itself (its topology access figure)."""
    if base is None or base.star is None:
        return 0.0
    acc = base.star.link_of(me)
    return acc.latency_s if acc is not None else 0.0


class Periodic(threading.Thread):
    """Calls ``fn`` every ``period`` seconds until stopped (errors are logged);
    ``period`` may be a callable, asked before each wait."""

    def __init__(self, period: float | Callable[[], float], fn: Callable[[], None],
                 name: str) -> None:
        super().__init__(daemon=True, name=name)
        self._period, self._fn = period, fn
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self._period() if callable(self._period) else self._period):
            try:
                self._fn()
            except Exception:
                log.exception("%s failed; continuing", self.name)

    def stop(self) -> None:
        self._stop.set()
