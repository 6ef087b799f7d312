"""The receiver's side of flow control: what it holds, the credit it grants, its acks.

A node acks a piece as soon as it holds all of it, but it then keeps the piece until
the task (or the source's split, or the sink's stitch) that needs it has run. Those
acked but unused bytes are its *held* bytes (``CreditLedger.hold/release``), bounded
by ``capacity`` (the node's held-pieces cap). Every ack carries a grant
(``AckFrame.credit``): the bytes that sender may have unacked in flight to this node
from now on, ``(capacity - held) / active senders`` (at least ``min_grant`` while
anything is free, 0 when full). A sender keeps within it (``meshdl.node.flow``).

When pieces are used and bytes free up, a sender that was granted little hears of the
new room without waiting for new data: ``Acker.refresh(peer)`` re-sends the ack of the
last piece from that sender with the current grant (a duplicate ack is harmless). The
data plane refreshes after every release and once a second, so a lost update costs at
most a second.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

log = logging.getLogger(__name__)

Key = tuple[str, str]       # (job, what is held)


class CreditLedger:
    """Bytes held (acked, not yet used) and the grants made to senders. Thread-safe;
    every map is bounded (``max_entries`` held items, ``max_peers`` senders)."""

    def __init__(self, capacity: int = 256 << 20, min_grant: int = 1 << 20,
                 active_s: float = 2.0, max_entries: int = 65536, max_peers: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.min_grant = min_grant
        self.active_s = active_s
        self._max_entries = max_entries
        self._max_peers = max_peers
        self._clock = clock
        self._lock = threading.Lock()
        self._held: OrderedDict[Key, int] = OrderedDict()
        self._total = 0
        self._peers: OrderedDict[str, tuple[float, int]] = OrderedDict()  # -> (seen, grant)
        self.peak_held = 0

    # ----------------------------------------------------------------- held bytes
    def hold(self, job: str, what: str, nbytes: int) -> None:
        with self._lock:
            old = self._held.pop((job, what), 0)
            self._held[(job, what)] = int(nbytes)
            self._total += int(nbytes) - old
            self.peak_held = max(self.peak_held, self._total)
            while len(self._held) > self._max_entries:      # never grows without bound
                _, n = self._held.popitem(last=False)
                self._total -= n

    def release(self, job: str, what: str) -> int:
        with self._lock:
            n = self._held.pop((job, what), 0)
            self._total -= n
            return n

    def release_job(self, job: str) -> int:
        with self._lock:
            keys = [k for k in self._held if k[0] == job]
            n = sum(self._held.pop(k) for k in keys)
            self._total -= n
            return n

    @property
    def held(self) -> int:
        return self._total

    def entries(self) -> int:
        with self._lock:
            return len(self._held)

    # ----------------------------------------------------------------- grants
    def _fair(self, now: float) -> int:
        free = max(0, self.capacity - self._total)
        active = sum(1 for seen, _ in self._peers.values() if now - seen <= self.active_s)
        share = free // max(1, active)
        return max(share, min(free, self.min_grant))

    def grant(self, peer: str, active: bool = True) -> int:
        """The grant for ``peer`` now; ``active``: it just sent a piece (a refresh of an
        idle sender's grant is not)."""
        now = self._clock()
        with self._lock:
            seen = self._peers.pop(peer, (now, 0))[0] if not active else now
            self._peers[peer] = (seen, 0)
            while len(self._peers) > self._max_peers:
                self._peers.popitem(last=False)
            g = self._fair(now)
            self._peers[peer] = (seen, g)
            return g

    def stale(self) -> list[str]:
        """Senders whose last grant is well below what they would get now (room freed
        up since): they should hear the new grant."""
        now = self._clock()
        with self._lock:
            fair = self._fair(now)
            return [p for p, (seen, g) in self._peers.items()
                    if now - seen <= 60.0 and g < fair // 2 + (1 if fair else 0)
                    and g < self.capacity]

    def peers(self) -> int:
        with self._lock:
            return len(self._peers)


class Acker:
    """Sends a consumer's acks, batched: ``ack(hop, topic, job, piece, term, peer)``
    queues the ack of one piece (``topic`` is that piece's return route topic, ``peer``
    the device that sent it); a thread sends what is queued, one ``AckFrame`` per (hop,
    route, job, term) with the other pieces in ``more`` (at most ``MAX_ACK_BATCH``) and
    the peer's current grant (``credit(peer, active)``). An idle receiver acks each piece at
    once; one that receives faster than it can ack sends fewer, fuller acks, so acks
    cost fewer broker messages exactly when the transport is the bottleneck.
    ``reack(job, piece)`` answers a duplicate of a completed piece with its own ack;
    ``refresh(peer)`` re-sends the last ack to ``peer`` with a fresh grant."""

    def __init__(self, node_id: str, send: Callable[[str, str, bytes], None],
                 remember: int = 16384, credit: Callable[[str, bool], int] | None = None,
                 max_peers: int = 1024) -> None:
        self.node_id = node_id
        self._send = send
        self._remember = remember
        self._credit = credit
        self._max_peers = max_peers
        self._done: OrderedDict[Key, tuple[str, str, int, str]] = OrderedDict()
        self._last: OrderedDict[str, tuple[str, str, str, str, int]] = OrderedDict()
        self._queue: list[tuple[str, str, str, str, int, str, bool]] = []
        self._cv = threading.Condition()
        self._stopped = False
        self.frames = 0                  # ack frames sent (a batch counts once)
        self.refreshes = 0               # credit updates sent
        self._thread = threading.Thread(target=self._run, name=f"acks-{node_id}",
                                        daemon=True)
        self._thread.start()

    def ack(self, hop: str, topic: str, job: str, piece: str, term: int = 0,
            peer: str = "") -> None:
        with self._cv:
            self._done[(job, piece)] = (hop, topic, term, peer)
            while len(self._done) > self._remember:
                self._done.popitem(last=False)
            if peer:
                self._last.pop(peer, None)
                self._last[peer] = (hop, topic, job, piece, term)
                while len(self._last) > self._max_peers:
                    self._last.popitem(last=False)
            self._queue.append((hop, topic, job, piece, term, peer, True))
            self._cv.notify()

    def reack(self, job: str, piece: str) -> bool:
        """Send the ack of an already acked piece again; False if it is unknown."""
        with self._cv:
            item = self._done.get((job, piece))
        if item is None:
            return False
        hop, topic, term, peer = item
        self._emit(hop, topic, job, piece, term, (), peer)
        return True

    def refresh(self, peer: str) -> bool:
        """Tell ``peer`` its current grant (the last ack it got, again), from the acks
        thread (the caller never waits on the network)."""
        with self._cv:
            item = self._last.get(peer)
            if item is None or self._credit is None:
                return False
            self._queue.append((*item, peer, False))
            self.refreshes += 1
            self._cv.notify()
        return True

    def known_peers(self) -> int:
        with self._cv:
            return len(self._last)

    def stop(self, timeout: float = 2.0) -> None:
        """Send what is queued, then stop."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        from meshdl.wire.codec import MAX_ACK_BATCH
        while True:
            with self._cv:
                while not self._queue and not self._stopped:
                    self._cv.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            groups: dict[tuple, list[tuple[str, str]]] = {}
            for hop, topic, job, piece, term, peer, active in batch:
                route = topic.rsplit("/", 1)[0]           # the same for one sender's pieces
                groups.setdefault((hop, route, job, term, peer, active), []).append(
                    (topic, piece))
            for (hop, _, job, term, peer, active), items in groups.items():
                part: list[tuple[str, str]] = []
                size = 0
                for item in items + [None]:       # batches within the frame header limit
                    if part and (item is None or len(part) > MAX_ACK_BATCH
                                 or size + len(item[1]) > 3000):
                        self._emit(hop, part[0][0], job, part[0][1], term,
                                   tuple(p for _, p in part[1:]), peer, active)
                        part, size = [], 0
                    if item is not None:
                        part.append(item)
                        size += len(item[1]) + 3

    def _emit(self, hop: str, topic: str, job: str, piece: str, term: int,
              more: tuple[str, ...], peer: str = "", active: bool = True) -> None:
        from meshdl.errors import MeshdlError
        from meshdl.wire.codec import AckFrame, encode_ack
        credit = self._credit(peer, active) if (self._credit is not None and peer) else None
        try:
            self._send(hop, topic, encode_ack(AckFrame(job, piece, self.node_id, term,
                                                       more=more, credit=credit)))
            self.frames += 1
        except MeshdlError as exc:     # a lost ack: the sender retransmits, we re-ack
            log.warning("%s could not send an ack of %s/%s: %s", self.node_id, job, piece,
                        exc)
