"""End-to-end reliability for tensor pieces: acks, retransmission, duplicate suppression.

mosquitto drops messages to a slow subscriber even at QoS 1 (DESIGN section 6), so
a PUBACK proves nothing about delivery. Every piece is therefore acknowledged by
its consumer, end to end:

- The consumer acks a piece once it holds all of its chunks (``AckFrame``). The ack
  travels back along the reverse of the piece's route (``topics.return_route``), so
  it crosses the same links, relayed hop by hop like a piece.
- The sender keeps the encoded frames of every unacked piece. Its retransmission
  timer starts when the last frame left the first hop (so a long emulated link queue
  is not mistaken for loss) and is ``rto_min + 2 x`` the expected time of the
  remaining hops, doubled on every retry. A retransmission resends every chunk with
  the same (term, seq): the consumer's reassembler keeps the chunks it already has,
  so each round fills the holes of the last. A consumer holding part of a piece
  answers a duplicate chunk with a selective ack (``ok=False`` + the chunks it has);
  the sender then resends only the missing chunks at once (a broker queue limit
  drops the tail of every burst, so resending everything would never converge).
  A round that brings new chunks resets the retry count. After ``max_retries`` the piece fails
  its job with an error naming the piece, the device and the route.
- The consumer remembers completed pieces (bounded) and answers a duplicate with
  another ack, never with a second delivery.
- A window caps the bytes awaiting acks per sender, so one node cannot flood the
  broker's per-client queues (``send`` waits for room, up to the piece's deadline).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

Key = tuple[str, str]       # (job, piece)


@dataclass
class Transfer:
    job: str
    piece: str
    dst: str
    path: list[str]
    frames: list[tuple[str, bytes]]
    nbytes: int
    expected_s: float
    rto_s: float
    on_fail: Callable[[str], None]
    attempts: int = 0
    timer_gen: int = 0
    acked: threading.Event = field(default_factory=threading.Event)
    first_sent: float = 0.0
    received: frozenset = frozenset()     # chunks the consumer reported (selective ack)
    sending: bool = False

    def missing_frames(self) -> list[tuple[str, bytes]]:
        if not self.received:
            return self.frames
        return [f for i, f in enumerate(self.frames) if i not in self.received]


class ReliableSender:
    """Sends pieces with end-to-end acks. ``transmit(transfer, frames, on_sent)`` puts
    the frames on the transfer's first hop and calls ``on_sent`` when they left."""

    def __init__(self, node_id: str, transmit: Callable[..., None],
                 *, rto_min_s: float = 1.0, max_retries: int = 6,
                 window_bytes: int = 256 << 20, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.node_id = node_id
        self._transmit = transmit
        self.rto_min_s = rto_min_s
        self.max_retries = max_retries
        self.window_bytes = window_bytes
        self._clock = clock
        self._lock = threading.Condition()
        self._live: dict[Key, Transfer] = {}
        self._inflight = 0
        self._timers: list[tuple[float, int, Key, int]] = []
        self._ids = itertools.count()
        self._stopped = False
        self.retransmissions = 0
        self.acks = 0
        self._thread = threading.Thread(target=self._run, name=f"flow-{node_id}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- API
    def send(self, job: str, piece: str, dst: str, path: list[str],
             frames: list[tuple[str, bytes]], expected_s: float,
             on_fail: Callable[[str], None], wait_s: float = 60.0) -> Transfer:
        """Start a reliable transfer (waits while the window is full, at most
        ``wait_s``; then fails the piece)."""
        nbytes = sum(len(p) for _, p in frames)
        tr = Transfer(job, piece, dst, list(path), frames, nbytes, expected_s,
                      self.rto_min_s + 2.0 * expected_s, on_fail)
        deadline = self._clock() + wait_s
        with self._lock:
            while (self._inflight and self._inflight + nbytes > self.window_bytes
                   and not self._stopped):
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.5))
            else:
                old = self._live.pop((job, piece), None)
                if old is not None:
                    self._inflight -= old.nbytes
                self._live[(job, piece)] = tr
                self._inflight += nbytes
                tr.attempts = 1
        if tr.attempts == 0:
            on_fail(f"piece {piece} of job {job} to {dst} via {'>'.join(path)}: "
                    f"{self._inflight} bytes still await acks after {wait_s:.0f} s; the "
                    "receivers are not acknowledging (down or overloaded)")
            return tr
        tr.first_sent = self._clock()
        self._send_round(tr)
        return tr

    def _send_round(self, tr: Transfer) -> None:
        with self._lock:
            tr.sending = True
            frames = tr.missing_frames()

        def sent() -> None:
            tr.sending = False
            self._arm(tr)
        self._transmit(tr, frames, sent)

    def on_ack(self, job: str, piece: str, ok: bool = True,
               chunks: tuple[int, ...] = ()) -> bool:
        """An ack arrived; True if it completed a live transfer. A selective ack
        (``ok=False``, ``chunks`` received so far) resends the missing chunks."""
        if not ok:
            with self._lock:
                tr = self._live.get((job, piece))
                if tr is None or tr.sending:
                    return False
                got = frozenset(c for c in chunks if 0 <= c < len(tr.frames))
                if len(got) <= len(tr.received) or len(got) >= len(tr.frames):
                    return False
                tr.received = got
                tr.attempts = 1                  # progress: a fresh retry budget
                self.retransmissions += 1
            log.debug("selective resend of %d/%d chunks of %s/%s", len(tr.frames) - len(got),
                      len(tr.frames), job, piece)
            self._send_round(tr)
            return False
        with self._lock:
            tr = self._live.pop((job, piece), None)
            if tr is None:
                return False
            self._inflight -= tr.nbytes
            self.acks += 1
            tr.acked.set()
            tr.frames = []
            self._lock.notify_all()
        log.debug("ack %s/%s after %d attempt(s), %.1f ms", job, piece, tr.attempts,
                  (self._clock() - tr.first_sent) * 1e3)
        return True

    def cancel_job(self, job: str) -> int:
        """Forget every transfer of ``job`` (failed or expired); returns how many."""
        with self._lock:
            keys = [k for k in self._live if k[0] == job]
            for k in keys:
                tr = self._live.pop(k)
                self._inflight -= tr.nbytes
                tr.frames = []
            self._lock.notify_all()
        return len(keys)

    def pending(self) -> list[Key]:
        with self._lock:
            return list(self._live)

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(2.0)

    # ----------------------------------------------------------------- timers
    def _arm(self, tr: Transfer) -> None:
        with self._lock:
            if (tr.job, tr.piece) not in self._live or tr.acked.is_set():
                return
            tr.timer_gen += 1
            due = self._clock() + tr.rto_s
            entry = (due, next(self._ids), (tr.job, tr.piece), tr.timer_gen)
            heapq.heappush(self._timers, entry)
            if self._timers[0] is entry:      # the timer thread sleeps until the earliest
                self._lock.notify_all()

    def _run(self) -> None:
        while True:
            fire: list[Transfer] = []
            with self._lock:
                if self._stopped:
                    return
                now = self._clock()
                while self._timers and self._timers[0][0] <= now:
                    _, _, key, gen = heapq.heappop(self._timers)
                    tr = self._live.get(key)
                    if tr is not None and tr.timer_gen == gen:
                        fire.append(tr)
                if not fire:
                    wait = 0.5 if not self._timers else max(0.0, self._timers[0][0] - now)
                    self._lock.wait(min(wait, 0.5))
                    continue
            for tr in fire:
                self._expired(tr)

    def _expired(self, tr: Transfer) -> None:
        with self._lock:
            if (tr.job, tr.piece) not in self._live:
                return
            if tr.attempts > self.max_retries:
                self._live.pop((tr.job, tr.piece))
                self._inflight -= tr.nbytes
                tr.frames = []
                self._lock.notify_all()
                give_up = True
            else:
                tr.attempts += 1
                tr.rto_s *= 2.0
                self.retransmissions += 1
                give_up = False
        if give_up:
            msg = (f"piece {tr.piece} of job {tr.job} ({tr.nbytes} bytes) from "
                   f"{self.node_id} to device {tr.dst} via route {'>'.join(tr.path)} was not "
                   f"acknowledged after {tr.attempts} attempts; a device on the route is down "
                   "or the broker drops its messages")
            log.warning("%s", msg)
            tr.on_fail(msg)
            return
        log.info("retransmitting %s/%s to %s (attempt %d, next timeout %.2f s)", tr.job,
                 tr.piece, tr.dst, tr.attempts, tr.rto_s)
        self._send_round(tr)


class ReceiveLog:
    """Completed pieces, remembered (bounded) so duplicates are re-acked, not redelivered."""

    def __init__(self, remember: int = 16384, reack_gap_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._done: OrderedDict[Key, float] = OrderedDict()
        self._remember = remember
        self._gap = reack_gap_s
        self._clock = clock
        self._lock = threading.Lock()

    def seen(self, key: Key) -> bool:
        with self._lock:
            return key in self._done

    def should_reack(self, key: Key) -> bool:
        """For a duplicate: True at most once per ``reack_gap_s`` (one ack per
        retransmission round, not one per chunk)."""
        now = self._clock()
        with self._lock:
            last = self._done.get(key)
            if last is None or now - last < self._gap:
                return False
            self._done[key] = now
            return True

    def mark(self, key: Key) -> bool:
        """Record a completed piece; False if it was already recorded."""
        with self._lock:
            if key in self._done:
                return False
            self._done[key] = self._clock()
            while len(self._done) > self._remember:
                self._done.popitem(last=False)
            return True

    def forget_job(self, job: str) -> None:
        with self._lock:
            for k in [k for k in self._done if k[0] == job]:
                del self._done[k]



class Acker:
    """Sends a consumer's acks, batched: ``ack(hop, topic, job, piece, term)`` queues
    the ack of one piece (``topic`` is that piece's return route topic); a thread
    sends what is queued, one ``AckFrame`` per (hop, route, job, term) with the other
    pieces in ``more`` (at most ``MAX_ACK_BATCH``). An idle receiver acks each piece at
    once; one that receives faster than it can ack sends fewer, fuller acks, so acks
    cost fewer broker messages exactly when the transport is the bottleneck.
    ``reack(job, piece)`` answers a duplicate of a completed piece with its own ack."""

    def __init__(self, node_id: str, send: Callable[[str, str, bytes], None],
                 remember: int = 16384) -> None:
        self.node_id = node_id
        self._send = send
        self._remember = remember
        self._done: OrderedDict[Key, tuple[str, str, int]] = OrderedDict()
        self._queue: list[tuple[str, str, str, str, int]] = []
        self._cv = threading.Condition()
        self._stopped = False
        self.frames = 0                  # ack frames sent (a batch counts once)
        self._thread = threading.Thread(target=self._run, name=f"acks-{node_id}",
                                        daemon=True)
        self._thread.start()

    def ack(self, hop: str, topic: str, job: str, piece: str, term: int = 0) -> None:
        with self._cv:
            self._done[(job, piece)] = (hop, topic, term)
            while len(self._done) > self._remember:
                self._done.popitem(last=False)
            self._queue.append((hop, topic, job, piece, term))
            self._cv.notify()

    def reack(self, job: str, piece: str) -> bool:
        """Send the ack of an already acked piece again; False if it is unknown."""
        with self._cv:
            item = self._done.get((job, piece))
        if item is None:
            return False
        hop, topic, term = item
        self._emit(hop, topic, job, piece, term, ())
        return True

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
            for hop, topic, job, piece, term in batch:
                route = topic.rsplit("/", 1)[0]           # the same for one sender's pieces
                groups.setdefault((hop, route, job, term), []).append((topic, piece))
            for (hop, _, job, term), items in groups.items():
                part: list[tuple[str, str]] = []
                size = 0
                for item in items + [None]:       # batches within the frame header limit
                    if part and (item is None or len(part) > MAX_ACK_BATCH
                                 or size + len(item[1]) > 3000):
                        self._emit(hop, part[0][0], job, part[0][1], term,
                                   tuple(p for _, p in part[1:]))
                        part, size = [], 0
                    if item is not None:
                        part.append(item)
                        size += len(item[1]) + 3

    def _emit(self, hop: str, topic: str, job: str, piece: str, term: int,
              more: tuple[str, ...]) -> None:
        from meshdl.errors import MeshdlError
        from meshdl.wire.codec import AckFrame, encode_ack
        try:
            self._send(hop, topic, encode_ack(AckFrame(job, piece, self.node_id, term,
                                                       more=more)))
            self.frames += 1
        except MeshdlError as exc:     # a lost ack: the sender retransmits, we re-ack
            log.warning("%s could not send an ack of %s/%s: %s", self.node_id, job, piece,
                        exc)
