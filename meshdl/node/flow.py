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
  remaining hops, doubled on every retry. When it fires, the expected time is taken
  again on the links' current figures (``expect``): a link that slowed since the piece
  left (a step the probes measured meanwhile) still carries it, behind the other unacked
  bytes to the same receiver, so the timer is
  re-armed for the rest instead of queueing another copy behind it on that link (a
  Jetson whose link fell 225x got three copies of each piece, ~20 s of its downlink
  that the next job's request to the leader waited behind; issue 11). A retransmission resends every chunk with
  the same (term, seq): the consumer's reassembler keeps the chunks it already has,
  so each round fills the holes of the last. A consumer holding part of a piece
  answers a duplicate chunk with a selective ack (``ok=False`` + the chunks it has);
  the sender then resends only the missing chunks at once (a broker queue limit
  drops the tail of every burst, so resending everything would never converge).
  A round that brings new chunks resets the retry count. After ``max_retries`` the piece fails
  its job with an error naming the piece, the device and the route.
- The consumer remembers completed pieces (bounded) and answers a duplicate with
  another ack, never with a second delivery.
- Credit: each receiver grants the bytes it can still hold on its acks
  (``AckFrame.credit``; ``meshdl.node.credit``), and a sender keeps at most that many
  unacked bytes in flight to it. A piece without credit waits in the receiver's queue
  (``send`` never blocks; the flow thread sends it when credit arrives) and fails with
  a named reason after its wait, or at once when the receiver is dropped.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
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
    sent_at: float = 0.0                  # when the last round left (its timer's start)
    ahead: int = 0                        # its bytes + those unacked to dst when sent
    basis: float | None = None            # ``ahead``'s expected time when it was sent
    received: frozenset = frozenset()     # chunks the consumer reported (selective ack)
    sending: bool = False
    first_queued: float = 0.0             # when it was handed to ``send``
    wait_until: float = 0.0               # queued for credit: fails after this
    why_late: str = ""

    def missing_frames(self) -> list[tuple[str, bytes]]:
        if not self.received:
            return self.frames
        return [f for i, f in enumerate(self.frames) if i not in self.received]


@dataclass
class _Peer:
    """What a sender knows of one receiver: its latest grant and what is in flight."""
    grant: int
    inflight: int = 0
    queue: deque = field(default_factory=deque)       # transfers waiting for credit
    granted_at: float = 0.0


class ReliableSender:
    """Sends pieces with end-to-end acks, within each receiver's credit.
    ``transmit(transfer, frames, on_sent)`` puts the frames on the transfer's first
    hop and calls ``on_sent`` when they left.

    Credit: a receiver grants bytes on its acks (``AckFrame.credit``, see
    ``meshdl.node.credit``); until its first grant ``initial_grant`` applies. A piece
    goes when the receiver's unacked bytes plus the piece fit its latest grant (or
    nothing is in flight to it and the grant is not zero: a piece larger than the whole
    grant goes alone); otherwise it waits in that receiver's FIFO queue. ``send``
    never blocks: queued pieces leave from the flow thread when credit arrives, or fail
    (named) after ``wait_s``, when the receiver is dropped (``fail_peer``) or when more
    than ``max_queued_bytes`` wait. ``window_bytes`` caps all receivers together."""

    def __init__(self, node_id: str, transmit: Callable[..., None],
                 *, rto_min_s: float = 1.0, max_retries: int = 6,
                 window_bytes: int = 256 << 20, initial_grant: int = 16 << 20,
                 max_queued_bytes: int = 1 << 30, credit: bool = True,
                 max_peers: int = 4096, clock: Callable[[], float] = time.monotonic,
                 expect: Callable[[Transfer, int, bool], float | None] | None = None
                 ) -> None:
        self.node_id = node_id
        # expect(transfer, nbytes, fresh): nbytes' time along the transfer's path on the
        # links' figures (fresh: of now, not a cached view; None: unknown)
        self._expect = expect
        self._transmit = transmit
        self.rto_min_s = rto_min_s
        self.max_retries = max_retries
        self.window_bytes = window_bytes
        self.initial_grant = initial_grant
        self.max_queued_bytes = max_queued_bytes
        self.credit = credit
        self._max_peers = max_peers
        self._clock = clock
        self._lock = threading.Condition()
        self._live: dict[Key, Transfer] = {}
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._inflight = 0
        self._queued = 0
        self._timers: list[tuple[float, int, Key, int]] = []
        self._ids = itertools.count()
        self._pump = False
        self._resend: list[Transfer] = []        # selective acks: resend the missing chunks
        self._stopped = False
        self.retransmissions = 0
        self.acks = 0
        self.credit_waits = 0            # pieces that had to wait for credit
        self._thread = threading.Thread(target=self._run, name=f"flow-{node_id}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- API
    def send(self, job: str, piece: str, dst: str, path: list[str],
             frames: list[tuple[str, bytes]], expected_s: float,
             on_fail: Callable[[str], None], wait_s: float = 60.0) -> Transfer:
        """Start a reliable transfer: at once when ``dst``'s credit allows, else queued
        (at most ``wait_s``; then the piece fails with a named reason). Never blocks."""
        nbytes = sum(len(p) for _, p in frames)
        tr = Transfer(job, piece, dst, list(path), frames, nbytes, expected_s,
                      self.rto_min_s + 2.0 * expected_s, on_fail)
        tr.first_queued = self._clock()
        tr.wait_until = tr.first_queued + wait_s
        tr.ahead = nbytes + self.inflight_to(dst)
        tr.basis = self._basis(tr, False)
        refused = None
        with self._lock:
            self._forget((job, piece))
            peer = self._peer(dst)
            if self._stopped:
                refused = "the sender is stopped"
            elif not peer.queue and self._fits(peer, nbytes):
                self._admit(peer, tr)
            elif self._queued + nbytes > self.max_queued_bytes:
                refused = (f"{self._queued} bytes already wait for credit here (limit "
                           f"{self.max_queued_bytes}); the receivers are not consuming")
            else:
                peer.queue.append(tr)
                self._queued += nbytes
                self.credit_waits += 1
                heapq.heappush(self._timers, (tr.wait_until, next(self._ids), (job, piece), -1))
                self._lock.notify_all()
        if refused is not None:
            on_fail(f"piece {piece} of job {job} to {dst} via {'>'.join(path)} not sent: "
                    f"{refused}")
        elif tr.attempts:
            self._send_round(tr)
        return tr

    def _peer(self, dst: str) -> _Peer:
        peer = self._peers.get(dst)
        if peer is None:
            peer = self._peers[dst] = _Peer(self.initial_grant)
            if len(self._peers) > self._max_peers:       # forget idle receivers (LRU)
                for name in list(self._peers):
                    p = self._peers[name]
                    if len(self._peers) <= self._max_peers:
                        break
                    if name != dst and not p.inflight and not p.queue:
                        del self._peers[name]
        else:
            self._peers.move_to_end(dst)
        return peer

    def _fits(self, peer: _Peer, nbytes: int) -> bool:
        if self._inflight and self._inflight + nbytes > self.window_bytes:
            return False
        if not self.credit:
            return True
        if peer.grant <= 0:
            return False
        return not peer.inflight or peer.inflight + nbytes <= peer.grant

    def _admit(self, peer: _Peer, tr: Transfer) -> None:
        self._live[(tr.job, tr.piece)] = tr
        self._inflight += tr.nbytes
        peer.inflight += tr.nbytes
        tr.attempts = 1
        tr.first_sent = self._clock()

    def _forget(self, key: Key) -> Transfer | None:
        """Drop a live or queued transfer from the books (lock held)."""
        tr = self._live.pop(key, None)
        if tr is not None:
            self._inflight -= tr.nbytes
            peer = self._peers.get(tr.dst)
            if peer is not None:
                peer.inflight -= tr.nbytes
            tr.frames = []
            self._pump = True
            self._lock.notify_all()
            return tr
        for peer in self._peers.values():
            for q in peer.queue:
                if (q.job, q.piece) == key:
                    peer.queue.remove(q)
                    self._queued -= q.nbytes
                    q.frames = []
                    return q
        return None

    def _send_round(self, tr: Transfer) -> None:
        with self._lock:
            tr.sending = True
            frames = tr.missing_frames()

        def sent() -> None:
            tr.sending = False
            self._arm(tr)
        self._transmit(tr, frames, sent)

    def on_credit(self, node: str, credit: int) -> None:
        """Receiver ``node`` grants ``credit`` bytes of unacked data."""
        if not self.credit:
            return
        with self._lock:
            peer = self._peers.get(node)
            if peer is None:
                if len(self._peers) >= self._max_peers:
                    return
                peer = self._peer(node)
            peer.grant = max(0, int(credit))
            peer.granted_at = self._clock()
            if peer.queue:
                self._pump = True
                self._lock.notify_all()

    def on_ack_frame(self, frame) -> None:
        """An ``AckFrame``: apply its credit, then ack (or selectively ack) its pieces."""
        credit = getattr(frame, "credit", None)
        if credit is not None and frame.node:
            self.on_credit(frame.node, credit)
        for piece in frame.pieces:
            self.on_ack(frame.job, piece, frame.ok, frame.chunks)

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
                tr.sending = True                # the flow thread resends (never this one)
                self._resend.append(tr)
                self._pump = True
                self._lock.notify_all()
            log.debug("selective resend of %d/%d chunks of %s/%s", len(tr.frames) - len(got),
                      len(tr.frames), job, piece)
            return False
        with self._lock:
            if (job, piece) not in self._live:
                return False
            tr = self._forget((job, piece))
            self.acks += 1
            tr.acked.set()
        log.debug("ack %s/%s after %d attempt(s), %.1f ms", job, piece, tr.attempts,
                  (self._clock() - tr.first_sent) * 1e3)
        return True

    def cancel_job(self, job: str) -> int:
        """Forget every transfer of ``job``, sent or waiting (failed or expired)."""
        with self._lock:
            keys = [k for k in self._live if k[0] == job]
            keys += [(t.job, t.piece) for p in self._peers.values() for t in p.queue
                     if t.job == job]
            for k in keys:
                self._forget(k)
            self._lock.notify_all()
        return len(keys)

    def fail_peer(self, dst: str, reason: str) -> int:
        """Receiver ``dst`` is gone: fail every transfer to it, sent or waiting, with
        ``reason``; returns how many."""
        with self._lock:
            keys = [k for k, t in self._live.items() if t.dst == dst]
            peer = self._peers.get(dst)
            keys += [(t.job, t.piece) for t in (peer.queue if peer else ())]
            gone = [t for t in (self._forget(k) for k in keys) if t is not None]
            self._peers.pop(dst, None)
        for tr in gone:
            tr.on_fail(f"piece {tr.piece} of job {tr.job} to {dst}: {reason}")
        return len(gone)

    def pending(self) -> list[Key]:
        with self._lock:
            return list(self._live) + [(t.job, t.piece) for p in self._peers.values()
                                       for t in p.queue]

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def inflight_to(self, dst: str) -> int:
        with self._lock:
            peer = self._peers.get(dst)
            return peer.inflight if peer else 0

    def grant_of(self, dst: str) -> int:
        """The latest grant of ``dst`` (``initial_grant`` before its first)."""
        with self._lock:
            peer = self._peers.get(dst)
            return peer.grant if peer else self.initial_grant

    def peers(self) -> int:
        with self._lock:
            return len(self._peers)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(2.0)

    # ----------------------------------------------------------------- flow thread
    def _arm(self, tr: Transfer) -> None:
        with self._lock:
            if (tr.job, tr.piece) not in self._live or tr.acked.is_set():
                return
            tr.timer_gen += 1
            tr.sent_at = self._clock()
            due = tr.sent_at + tr.rto_s
            entry = (due, next(self._ids), (tr.job, tr.piece), tr.timer_gen)
            heapq.heappush(self._timers, entry)
            if self._timers[0] is entry:      # the timer thread sleeps until the earliest
                self._lock.notify_all()

    def _release(self) -> list[Transfer]:
        """Queued transfers the credit now allows, admitted (lock held)."""
        self._pump = False
        out, self._resend = [t for t in self._resend if (t.job, t.piece) in self._live], []
        for peer in self._peers.values():
            while peer.queue and self._fits(peer, peer.queue[0].nbytes):
                tr = peer.queue.popleft()
                self._queued -= tr.nbytes
                self._admit(peer, tr)
                out.append(tr)
        return out

    def _run(self) -> None:
        while True:
            fire: list[Transfer] = []
            late: list[Transfer] = []
            with self._lock:
                if self._stopped:
                    return
                go = self._release() if self._pump else []
                now = self._clock()
                while self._timers and self._timers[0][0] <= now:
                    _, _, key, gen = heapq.heappop(self._timers)
                    if gen < 0:                   # a queued transfer's credit deadline
                        late += self._overdue(key)
                        continue
                    tr = self._live.get(key)
                    if tr is not None and tr.timer_gen == gen:
                        fire.append(tr)
                if not fire and not go and not late:
                    wait = 0.5 if not self._timers else max(0.0, self._timers[0][0] - now)
                    if not self._pump:
                        self._lock.wait(min(wait, 0.5))
                    continue
            for tr in go:
                self._send_round(tr)
            for tr in late:
                tr.on_fail(tr.why_late)
            for tr in fire:
                self._expired(tr)

    def _overdue(self, key: Key) -> list[Transfer]:
        for peer_name, peer in self._peers.items():
            for tr in peer.queue:
                if (tr.job, tr.piece) == key and tr.wait_until <= self._clock():
                    self._forget(key)
                    tr.why_late = (
                        f"piece {tr.piece} of job {tr.job} ({tr.nbytes} bytes) from "
                        f"{self.node_id} to device {peer_name} via route {'>'.join(tr.path)} "
                        f"waited {tr.wait_until - tr.first_queued:.0f} s for credit: "
                        f"{peer_name} granted {peer.grant} bytes and {peer.inflight} are "
                        "unacknowledged; it is not consuming (overloaded or stalled)")
                    return [tr]
        return []

    def _basis(self, tr: Transfer, fresh: bool) -> float | None:
        """``tr.ahead`` bytes along ``tr``'s path on the links' figures (``fresh``: of
        now), or None when unknown."""
        if self._expect is None:
            return None
        try:
            return self._expect(tr, tr.ahead, fresh)
        except Exception as exc:              # figures unavailable: the timer stands
            log.debug("expected time of %s/%s unknown: %s", tr.job, tr.piece, exc)
            return None

    def _still_in_flight(self, tr: Transfer) -> bool:
        """Re-arm ``tr``'s timer when its path slowed since it left: the same bytes
        (it and those queued ahead of it) take longer on the figures of now than on
        those it was sent with, so its last round may still be crossing. True if
        re-armed."""
        now_s = self._basis(tr, True) if tr.basis is not None else None
        if now_s is None or not now_s > tr.basis:
            return False
        backoff = tr.rto_s / (self.rto_min_s + 2.0 * tr.expected_s)
        need = tr.rto_s + backoff * 2.0 * (now_s - tr.basis)
        with self._lock:
            if (tr.job, tr.piece) not in self._live or tr.acked.is_set():
                return True
            left = tr.sent_at + need - self._clock()
            if left <= 0:
                return False
            tr.expected_s += now_s - tr.basis
            tr.basis, tr.rto_s = now_s, need
            tr.timer_gen += 1
            heapq.heappush(self._timers, (tr.sent_at + need, next(self._ids),
                                          (tr.job, tr.piece), tr.timer_gen))
            self._lock.notify_all()
        log.info("%s/%s to %s: its path slowed (%.2f s expected now); waiting %.2f s "
                 "more before a retransmission", tr.job, tr.piece, tr.dst, now_s, left)
        return True

    def _expired(self, tr: Transfer) -> None:
        if self._still_in_flight(tr):
            return
        with self._lock:
            if (tr.job, tr.piece) not in self._live:
                return
            if tr.attempts > self.max_retries:
                self._forget((tr.job, tr.piece))
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


# the receiver's duplicate log (split by concern; re-exported here)
from meshdl.node.receivelog import ReceiveLog  # noqa: E402,F401
# the receiver's side of flow control lives in meshdl.node.credit
from meshdl.node.credit import Acker, CreditLedger  # noqa: E402,F401
