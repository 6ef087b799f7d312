"""The receiver's log of completed pieces (split from ``meshdl.node.flow``): a
duplicate is re-acked, never delivered twice."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

Key = tuple[str, str]       # (job, piece)


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
