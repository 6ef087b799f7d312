"""Emulated devices and links (DESIGN section 7): honest timings on a small machine.

- Compute: run the real computation, then wait until ``flops / device.flops``
  seconds have passed since it started (:func:`pace`). This is honest only while
  this machine computes the task faster than the emulated device would; when it
  does not, the real time stands and a warning says so.
- Links: every frame a node sends over a hop waits in that hop's FIFO queue
  (links serialised, one transfer at a time) and is delayed by the hop's
  ``latency`` (once per piece) + ``bytes * 8 / bandwidth`` before it is
  published (:class:`Links`). Tiny control frames (acks) skip the bandwidth
  queue and are delayed by the hop latency only (:class:`Delayer`).

- Star meshes (every piece through the MQTT broker, ``mesh.star``): a sender's frames
  all queue on its one uplink (``latency + bytes * 8 / up``), and a receiver holds
  every incoming piece frame in its one downlink queue (``bytes * 8 / down``, plus the
  latency on a piece's first chunk) before handling it (:meth:`Links.downlink`): the
  two access hops of the cost model, store and forward.
- Shaped links (``meshdl mesh up --netns``): the kernel shapes the bandwidth; the node
  adds only the latency (a pure delay, as netem would), since netem is absent.

Without emulation the same classes publish at once, so the data plane has one path.
A sender that is on no emulated link (the client) learns that its frames left its first
hop from the broker's acks (MQTT QoS 1 PUBACKs), when its publish returns them: its
retransmission timer then starts once the broker holds the piece, however slow its own
link (a client inside a device's namespace sends through that device's shaped uplink).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], object]   # may return the broker-ack handle (paho)
LinkLookup = Callable[[str, str], "tuple[float, float] | None"]   # -> (bandwidth_bps, latency_s)
# a star mesh: device -> (up_bps, down_bps, latency_s), None for the broker's own device;
# the lookup itself returns False when the mesh is not a star
AccessLookup = Callable[[str], "tuple[float, float, float] | None | bool"]
UPLINK = "@up"
DOWNLINK = "@down"
ACK_WAIT_S = 120.0       # at most this long for the broker's acks, then the timer starts


def pace(started: float, flops: float, device_flops: float, what: str,
         clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until ``flops / device_flops`` s have passed since ``started``; return the
    emulated duration. Warns when the real computation already took longer."""
    target = flops / device_flops if device_flops > 0 else 0.0
    elapsed = clock() - started
    if elapsed > target * 1.05 + 0.002:
        log.warning("%s: real compute took %.1f ms, longer than the emulated device's "
                    "%.1f ms; emulated times are too slow here (this machine is slower than "
                    "the device it emulates, or is overloaded)", what, elapsed * 1e3,
                    target * 1e3)
        return elapsed
    if target > elapsed:
        sleep(target - elapsed)
    return max(target, elapsed)


@dataclass
class _Item:
    topic: str
    payload: bytes
    delay_s: float
    on_sent: Callable[[], None] | None
    deliver: Callable[[], None] | None = None     # downlink: hand the frame on


@dataclass
class _Lane:
    """One emulated link: a FIFO of items, free again at ``free_at``."""
    items: deque = field(default_factory=deque)
    free_at: float = 0.0
    scheduled: bool = False


class Pacer:
    """One thread for any number of emulated links (issue 12: one thread, not a thread
    per peer). Each lane (a hop, a node's uplink or downlink) is a FIFO served one item
    at a time: an item runs ``delay_s`` after its lane became free for it (the previous
    item done, or its arrival), as a thread per lane sleeping through each item would;
    ``after(delay, fn)`` runs ``fn`` once at a due time (acks). The heap holds at most
    one entry per busy lane plus the timed callbacks; idle lanes beyond
    ``max_idle_lanes`` are forgotten. Callbacks run on this thread in due order; one
    that raises is logged and never kills the thread."""

    def __init__(self, name: str, run: Callable[[str, _Item], None],
                 max_idle_lanes: int = 256) -> None:
        self._run_item = run
        self._lanes: dict[str, _Lane] = {}
        self._heap: list[tuple[float, int, str | None, Callable[[], None] | None]] = []
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._stopped = False
        self._max_idle = max_idle_lanes
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, lane: str, item: _Item) -> None:
        with self._cv:
            ln = self._lanes.get(lane)
            if ln is None:
                ln = self._lanes[lane] = _Lane()
                if len(self._lanes) > self._max_idle:
                    self._forget_idle(lane)
            ln.items.append(item)
            if not ln.scheduled:
                self._schedule(lane, ln, time.monotonic())

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._ids), None, fn))
            self._cv.notify()

    def backlog(self) -> int:
        with self._cv:
            return sum(len(ln.items) for ln in self._lanes.values())

    def lanes(self) -> int:
        with self._cv:
            return len(self._lanes)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(2.0)

    def _schedule(self, name: str, ln: _Lane, now: float) -> None:
        due = max(now, ln.free_at) + ln.items[0].delay_s
        heapq.heappush(self._heap, (due, next(self._ids), name, None))
        ln.scheduled = True
        self._cv.notify()

    def _forget_idle(self, keep: str) -> None:
        now = time.monotonic()
        for name in [n for n, ln in self._lanes.items()
                     if n != keep and not ln.items and not ln.scheduled and ln.free_at <= now]:
            del self._lanes[name]
            if len(self._lanes) <= self._max_idle:
                break

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap
                                             or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap
                                  else self._heap[0][0] - time.monotonic())
                if self._stopped:
                    return
                _, _, lane, fn = heapq.heappop(self._heap)
                item = self._lanes[lane].items.popleft() if lane is not None else None
            try:
                if fn is not None:
                    fn()
                else:
                    self._run_item(lane, item)
            except Exception:
                log.exception("a paced send or delivery failed")
            if lane is not None:
                with self._cv:
                    ln = self._lanes[lane]
                    ln.free_at = time.monotonic()
                    ln.scheduled = False
                    if ln.items:
                        self._schedule(lane, ln, ln.free_at)
                    elif len(self._lanes) > self._max_idle:
                        del self._lanes[lane]         # many peers: idle lanes go


class Links:
    """Per-hop send queues of one node.

    ``send(hop, frames, on_sent)`` publishes ``frames`` (topic, payload) towards
    neighbour ``hop``; ``on_sent`` runs after the last one left. With ``link`` (a
    lookup of the emulated link to ``hop``) each hop is a FIFO lane that holds every
    frame for its transfer time first; without, frames go out at once on the caller's
    thread. All lanes of a node share one ``Pacer`` thread for what it sends and one
    for its star downlink, however many next hops there are.
    """

    def __init__(self, node_id: str, publish: Publish, link: LinkLookup | None = None,
                 max_queued: int = 100000, access: AccessLookup | None = None,
                 shaped: bool = False) -> None:
        self.node_id = node_id
        self._publish = publish
        self._link = link
        self._access = access if link is not None else None
        self._shaped = shaped and link is not None
        self._max_queued = max_queued        # kept for callers; the credit window bounds it
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._out = Pacer(f"links-{node_id}", self._run_item) if link is not None else None
        self._in: Pacer | None = None          # the star downlink, made on first use
        self._acked: deque = deque()           # (broker acks, on_sent, deadline) to wait for
        self._acked_cv = threading.Condition(self._lock)
        self._acker: threading.Thread | None = None

    @property
    def emulated(self) -> bool:
        return self._link is not None

    def hop_figures(self, hop: str) -> tuple[float, float]:
        """(bandwidth_bps, latency_s) of the hop to ``hop`` (inf, 0 when not emulated
        or unknown)."""
        fig = self._link(self.node_id, hop) if self._link is not None else None
        return fig if fig is not None else (float("inf"), 0.0)

    def send(self, hop: str, frames: list[tuple[str, bytes]],
             on_sent: Callable[[], None] | None = None) -> None:
        if not frames:
            if on_sent is not None:
                on_sent()
            return
        if self._link is None:
            handles = [self._publish(topic, payload) for topic, payload in frames]
            if on_sent is not None:
                self._when_acked(handles, on_sent)
            return
        star = self._star(self.node_id)
        if self._shaped:
            # the kernel shapes the bandwidth: add the latency only, as a pure delay
            latency = self._star_latency(hop) if star is not False else self.hop_figures(hop)[1]
            assert self._out is not None

            # the kernel holds the bytes until they crossed: the sender's retransmission
            # timer starts once they could have (else a slow link resends everything)
            bps = self.hop_figures(hop)[0]
            wire_s = sum(len(p) for _, p in frames) * 8.0 / bps if bps > 0 else 0.0

            def go() -> None:
                for topic, payload in frames:
                    self._publish(topic, payload)
                if on_sent is not None:
                    self._out.after(wire_s, on_sent)
            self._out.after(latency, go)
            return
        if star is not False:
            bps, latency = (float("inf"), 0.0) if star is None else (star[0], star[2])
            lane = UPLINK
        else:
            bps, latency = self.hop_figures(hop)
            lane = hop
        last = len(frames) - 1
        assert self._out is not None
        for i, (topic, payload) in enumerate(frames):
            delay = (latency if i == 0 else 0.0) + len(payload) * 8.0 / bps
            self._out.put(lane, _Item(topic, payload, delay, on_sent if i == last else None))

    def _when_acked(self, handles: list, on_sent: Callable[[], None]) -> None:
        """``on_sent`` once the broker acknowledged every frame (the frames crossed this
        sender's own link), or at once when the publish gave no acks to wait for."""
        if not handles or not all(callable(getattr(h, "is_published", None))
                                  for h in handles):
            on_sent()
            return
        with self._acked_cv:
            self._acked.append((handles, on_sent, time.monotonic() + ACK_WAIT_S))
            if self._acker is None:
                self._acker = threading.Thread(target=self._wait_acks, daemon=True,
                                               name=f"acked-{self.node_id}")
                self._acker.start()
            self._acked_cv.notify()

    def _wait_acks(self) -> None:
        """One thread per sender: in order, waits for each send's broker acks (or its
        deadline, or a publish that failed: the retransmission timer decides then)."""
        while True:
            with self._acked_cv:
                while not self._acked and not self._stopped.is_set():
                    self._acked_cv.wait(0.5)
                if self._stopped.is_set():
                    return
                handles, on_sent, deadline = self._acked.popleft()
            for h in handles:
                while not self._stopped.is_set() and time.monotonic() < deadline:
                    try:
                        if h.is_published():
                            break
                        h.wait_for_publish(min(0.2, max(0.0, deadline - time.monotonic())))
                    except (ValueError, RuntimeError):     # not queued, or failed
                        break
            if self._stopped.is_set():
                return
            try:
                on_sent()
            except Exception:
                log.exception("on_sent callback failed")

    def _star(self, dev: str):
        """Access figures of ``dev`` on a star mesh; False when the mesh is no star."""
        if self._access is None:
            return False
        return self._access(dev)

    def _star_latency(self, hop: str) -> float:
        """One-way latency of a piece to ``hop`` through the broker (both access links)."""
        total = 0.0
        for dev in (self.node_id, hop):
            acc = self._star(dev)
            if acc:
                total += acc[2]
        return total

    def downlink(self, nbytes: int, first: bool, deliver: Callable[[], None]) -> None:
        """An incoming piece frame on a star mesh: hold it for this node's downlink
        (``bytes * 8 / down``, + latency on a piece's first chunk), then ``deliver``.
        Delivers at once when not emulated, when the kernel shapes the link, or when
        the mesh is no star."""
        star = self._star(self.node_id) if not self._shaped else False
        if not star:
            deliver()
            return
        delay = (star[2] if first else 0.0) + nbytes * 8.0 / star[1]
        with self._lock:
            if self._in is None:
                self._in = Pacer(f"downlink-{self.node_id}", self._run_item)
            pacer = self._in
        pacer.put(DOWNLINK, _Item("", b"", delay, None, deliver))

    def send_small(self, hop: str, topic: str, payload: bytes) -> None:
        """A control frame (ack): delayed by the hop latency only, never queued
        behind tensor data."""
        if self._out is None:
            self._publish(topic, payload)
            return
        latency = (self._star_latency(hop) if self._star(self.node_id) is not False
                   else self.hop_figures(hop)[1])
        self._out.after(latency, lambda: self._publish(topic, payload))

    def backlog(self) -> int:
        return sum(p.backlog() for p in (self._out, self._in) if p is not None)

    def lanes(self) -> int:
        """Links (next hops, uplink, downlink) this node has used and still knows."""
        return sum(p.lanes() for p in (self._out, self._in) if p is not None)

    def stop(self) -> None:
        self._stopped.set()
        with self._acked_cv:
            self._acked_cv.notify_all()
        for p in (self._out, self._in):
            if p is not None:
                p.stop()

    def _run_item(self, hop: str, item: _Item) -> None:
        """On a pacer thread, once ``item`` crossed its link: hand it on."""
        if self._stopped.is_set():
            return
        if item.deliver is not None:
            try:
                item.deliver()
            except Exception:
                log.exception("%s: handling a frame from the downlink failed", self.node_id)
            return
        t0 = time.monotonic()
        try:
            self._publish(item.topic, item.payload)
        except Exception as exc:   # a dead bus: the sender's retransmission timer decides
            log.warning("link %s->%s: publish failed (%s)", self.node_id, hop, exc)
        if item.on_sent is not None:
            try:
                item.on_sent()
            except Exception:
                log.exception("on_sent callback failed")
        log.debug("link %s->%s: %d bytes, published in %.1f ms", self.node_id, hop,
                  len(item.payload), (time.monotonic() - t0) * 1e3)
