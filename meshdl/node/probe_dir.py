"""Each direction of a node's access link to the broker, measured on its own.

The self-ping of ``node.probe`` crosses the uplink and the downlink (ping and pong,
each up then down), so it reads their series rate; the star cost model prices a
device's uplink and downlink separately, and a link may be shaped (or fail) in one
direction only. Two messages of the sizes ``base`` and ``base + extra`` measure both:

- uplink: each is published retained, QoS 1, on a topic of this node's that nobody
  subscribes (``.../node/{id}/probe/d0`` and ``/d1``); the time to its PUBACK is the
  uplink carrying it (the PUBACK back is a few bytes);
- downlink: this node then subscribes to each topic; the broker re-sends the retained
  message, so the time from the SUBSCRIBE to its arrival is the downlink carrying it
  (the SUBSCRIBE up is a few bytes).

Each rate is the slope between the two sizes (the fixed costs cancel):
``extra x 8 / (t_big - t_base)``. A bus that does not report PUBACKs (no
``wait_for_publish``) or a broker that refuses the topics (a secure mesh's ACL) gives
no figure; after ``MAX_FAILS`` misses in a row, none measured before, the node
stops trying (once it has measured, a miss is a slow link, not a refusal).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from meshdl.wire.topics import node_probe_dirs

log = logging.getLogger(__name__)

MAX_FAILS = 3


class DirectionProbe:
    """Per-direction rates (bit/s) of this node's access link, one pair per call."""

    def __init__(self, bus, mesh: str, me: str, min_extra_s: float) -> None:
        self._bus = bus
        self.topics = node_probe_dirs(mesh, me)
        self._min_extra = min_extra_s
        self.fails = 0           # misses in a row
        self.worked = False      # measured once: misses are a slow link then, not a refusal

    @property
    def enabled(self) -> bool:
        return self.worked or self.fails < MAX_FAILS

    def measure(self, base: int, extra: int, timeout: Callable[[int], float]
                ) -> tuple[float, float] | None:
        """(up_bps, down_bps) from two messages of ``base`` and ``base + extra`` bytes
        (``timeout(nbytes)``: the longest wait for one), or None (a wait ran out). The
        retained messages are cleared afterwards: a node that dies leaves none behind."""
        try:
            return self._measure(base, extra, timeout)
        finally:
            self.clear()

    def _measure(self, base: int, extra: int, timeout: Callable[[int], float]
                 ) -> tuple[float, float] | None:
        sizes = (base, base + extra)
        up: list[float] = []
        for topic, n in zip(self.topics, sizes):    # a slow small one: no big one
            t = self._up(topic, n, timeout(n))
            if t is None:
                return self._missed("an uplink message was not acknowledged in time")
            up.append(t)
        down: list[float] = []
        for topic, n in zip(self.topics, sizes):
            t = self._down(topic, n, timeout(n))
            if t is None:
                return self._missed("a retained message did not come back in time")
            down.append(t)
        self.fails, self.worked = 0, True
        return (extra * 8.0 / max(up[1] - up[0], self._min_extra),
                extra * 8.0 / max(down[1] - down[0], self._min_extra))

    def _missed(self, why: str) -> None:
        self.fails += 1
        if not self.enabled:
            log.info("per-direction link probes stopped after %d misses (%s); the "
                     "access link is measured as a whole", self.fails, why)
        return None

    def _up(self, topic: str, nbytes: int, timeout: float) -> float | None:
        t0 = time.perf_counter()
        info = self._bus.publish(topic, b"\0" * nbytes, qos=1, retain=True)
        wait = getattr(info, "wait_for_publish", None)
        if wait is None:                 # this bus does not report PUBACKs
            self.fails, self.worked = MAX_FAILS, False
            return None
        try:
            wait(timeout)
        except (RuntimeError, ValueError):
            return None
        return time.perf_counter() - t0 if info.is_published() else None

    def _down(self, topic: str, nbytes: int, timeout: float) -> float | None:
        got: list[float] = []
        done = threading.Event()

        def arrived(t: str, payload, retained: bool) -> None:
            if len(payload) == nbytes and not done.is_set():
                got.append(time.perf_counter())
                done.set()
        t0 = time.perf_counter()
        self._bus.subscribe(topic, arrived, qos=0)
        try:
            if not done.wait(timeout):
                return None
        finally:
            self._bus.unsubscribe(topic)
        return got[0] - t0

    def clear(self) -> None:
        """Remove the retained messages (after each measurement, and as the node leaves)."""
        for topic in self.topics:
            try:
                self._bus.publish(topic, b"", qos=1, retain=True)
            except Exception as exc:
                log.debug("could not clear %s: %s", topic, exc)
