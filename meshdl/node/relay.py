"""Relaying: pieces that are not for this node go on to the next hop of their route.

A relay reads only the frame header (no CRC, no copy of the data) to tell acks
from pieces and to drop malformed frames early. Acks go on at once (over an
emulated hop: after the hop latency). Pieces go on unchanged; on an emulated mesh
a relay stores a piece until all its chunks arrived and then forwards the whole
piece over the next link (store-and-forward, as the cost model assumes). Partly
received pieces are bounded in bytes and expire.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from meshdl.security.frames import relay_frame
from meshdl.errors import WireError
from meshdl.node.emulation import Links
from meshdl.wire.codec import AckFrame, PieceFrame, decode_frame
from meshdl.wire.topics import RouteStep

log = logging.getLogger(__name__)


@dataclass
class _Held:
    topic: str
    hop: str
    nchunks: int
    chunks: dict[int, bytes] = field(default_factory=dict)
    nbytes: int = 0
    touched: float = 0.0


class Relay:
    def __init__(self, node_id: str, links: Links, store_and_forward: bool,
                 max_held_bytes: int = 512 << 20, ttl_s: float = 60.0) -> None:
        self.node_id = node_id
        self._links = links
        self._saf = store_and_forward
        self._max_held = max_held_bytes
        self._ttl = ttl_s
        self._held: dict[tuple, _Held] = {}
        self._held_bytes = 0
        self._lock = threading.Lock()
        self.forwarded = 0
        self.dropped = 0

    def forward(self, step: RouteStep, payload: bytes) -> None:
        """Called on the bus dispatcher thread for a frame addressed past this node."""
        try:                  # a sealed frame (meshdl.security): relay it unread
            frame = relay_frame(payload, step.job, step.piece) \
                or decode_frame(payload, verify_crc=False)
        except WireError as exc:
            self.dropped += 1
            log.warning("relay %s dropped a frame for %s (%s/%s): %s", self.node_id,
                        step.next_hop, step.job, step.piece, exc)
            return
        payload = payload if isinstance(payload, bytes) else bytes(payload)
        if isinstance(frame, AckFrame):
            self._links.send_small(step.next_hop, step.topic, payload)
            self.forwarded += 1
            return
        if not isinstance(frame, PieceFrame) or not self._saf or frame.nchunks == 1:
            self._links.send(step.next_hop, [(step.topic, payload)])
            self.forwarded += 1
            return
        self._store(step, frame, payload)

    def _store(self, step: RouteStep, frame: PieceFrame, payload: bytes) -> None:
        key = (step.topic, frame.term, frame.seq)
        now = time.monotonic()
        out = None
        with self._lock:
            self._expire(now)
            h = self._held.get(key)
            if h is None:
                if self._held_bytes + frame.nbytes > self._max_held:
                    self.dropped += 1
                    log.warning("relay %s is holding %d bytes; dropped a chunk of %s/%s "
                                "(the sender will retransmit)", self.node_id, self._held_bytes,
                                step.job, step.piece)
                    return
                h = self._held[key] = _Held(step.topic, step.next_hop, frame.nchunks)
            h.touched = now
            if frame.chunk not in h.chunks:
                h.chunks[frame.chunk] = payload
                h.nbytes += len(payload)
                self._held_bytes += len(payload)
            if len(h.chunks) == h.nchunks:
                del self._held[key]
                self._held_bytes -= h.nbytes
                out = h
        if out is not None:
            self._links.send(out.hop, [(out.topic, out.chunks[i]) for i in range(out.nchunks)])
            self.forwarded += 1

    def _expire(self, now: float) -> None:
        for key in [k for k, h in self._held.items() if now - h.touched > self._ttl]:
            h = self._held.pop(key)
            self._held_bytes -= h.nbytes
            log.info("relay %s gave up on a partial piece for %s", self.node_id, h.topic)
