"""Collect the chunks of a tensor piece into one array, in any order, duplicates welcome."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from meshdl.errors import WireError
from meshdl.wire.codec import PieceFrame

log = logging.getLogger(__name__)

Key = tuple[str, str]


@dataclass
class _Partial:
    frame0: PieceFrame
    buf: np.ndarray
    seen: set[int] = field(default_factory=set)
    touched: float = 0.0


class Reassembler:
    """Reassemble chunked pieces keyed by (job, piece).

    ``add(frame)`` returns the finished array (C-contiguous, owned) when the
    last missing chunk arrives, else None. A chunk whose (term, seq) is newer
    than the partial's replaces it (a retransmission from a new attempt); older
    ones are dropped. Pending bytes are bounded (``max_pending_bytes``), and
    partials untouched for ``ttl_s`` expire. Completed keys are remembered (up
    to ``remember``) so late duplicates are ignored. Thread-safe.
    """

    def __init__(self, max_pending_bytes: int = 512 << 20, ttl_s: float = 30.0,
                 remember: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.ttl_s = ttl_s
        self._remember = remember
        self._clock = clock
        self._lock = threading.Lock()
        self._partials: dict[Key, _Partial] = {}
        self._done: OrderedDict[tuple, None] = OrderedDict()
        self._pending = 0

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def pending(self) -> list[Key]:
        with self._lock:
            return list(self._partials)

    def missing(self, job: str, piece: str) -> list[int]:
        """Chunk indices still missing for a partial (empty if unknown)."""
        with self._lock:
            p = self._partials.get((job, piece))
            return [] if p is None else sorted(set(range(p.frame0.nchunks)) - p.seen)

    def add(self, frame: PieceFrame) -> np.ndarray | None:
        done_key = (frame.job, frame.piece, frame.term, frame.seq)
        if frame.complete:
            with self._lock:
                if done_key in self._done:
                    return None
                self._mark_done(done_key)
            return frame.tensor()
        key = (frame.job, frame.piece)
        now = self._clock()
        with self._lock:
            if done_key in self._done:
                return None
            self._expire(now)
            p = self._partials.get(key)
            if p is not None and not _same_tensor(p.frame0, frame):
                if (frame.term, frame.seq) > (p.frame0.term, p.frame0.seq):
                    log.debug("newer attempt of %s/%s replaces a partial", *key)
                    self._drop(key)
                    p = None
                else:
                    raise WireError(f"chunk of {key[0]}/{key[1]} disagrees with the "
                                    "chunks already received (stale or corrupt); dropped")
            if p is None:
                nbytes = frame.nbytes
                if self._pending + nbytes > self.max_pending_bytes:
                    raise WireError(f"reassembly buffer full ({self._pending} bytes pending, "
                                    f"{nbytes} more needed); piece {key[0]}/{key[1]} "
                                    "dropped: raise max_pending_bytes or send less at once")
                p = _Partial(frame, np.empty(nbytes, dtype=np.uint8))
                self._partials[key] = p
                self._pending += nbytes
            p.touched = now
            if frame.chunk in p.seen:
                return None
            p.buf[frame.offset:frame.offset + len(frame.data)] = np.frombuffer(
                frame.data, dtype=np.uint8)
            p.seen.add(frame.chunk)
            if len(p.seen) < frame.nchunks:
                return None
            self._drop(key)
            self._mark_done(done_key)
        f0 = p.frame0
        return p.buf.view(np.dtype(f0.dtype).newbyteorder("<")).reshape(f0.shape)

    def expire(self) -> list[Key]:
        """Drop partials older than ttl_s; return their keys."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> list[Key]:
        stale = [k for k, p in self._partials.items() if now - p.touched > self.ttl_s]
        for k in stale:
            log.warning("dropping incomplete piece %s/%s: no chunk for %.1f s", k[0], k[1],
                        self.ttl_s)
            self._drop(k)
        return stale

    def _drop(self, key: Key) -> None:
        p = self._partials.pop(key)
        self._pending -= p.buf.nbytes

    def _mark_done(self, done_key: tuple) -> None:
        self._done[done_key] = None
        while len(self._done) > self._remember:
            self._done.popitem(last=False)


def _same_tensor(a: PieceFrame, b: PieceFrame) -> bool:
    return (a.dtype, a.shape, a.nchunks, a.chunk_size, a.term, a.seq, a.region) == \
           (b.dtype, b.shape, b.nchunks, b.chunk_size, b.term, b.seq, b.region)
