"""How much a flood of refused messages may write to the log.

Every refused message is counted (``Refusals``, a bounded tally by reason), but only
``burst`` lines per ``window`` seconds are logged (``LogGate``, pure given the clock).
The first line after a window in which some were held back says how many and their
most common reasons, so a flood shows in the log as a few lines per window, whatever
its rate, and is still told. ``FloodFilter`` applies the same gate to every warning
line of a command's log (installed by the CLI), per line of the code.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

OTHER = "(other reasons)"


@dataclass
class Refusals:
    """Refused messages by reason, at most ``keys`` distinct reasons (then ``OTHER``):
    reasons may carry ids a sender chose, so the tally must not grow with them."""

    keys: int = 64
    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> str:
        key = reason if reason in self.counts or len(self.counts) < self.keys else OTHER
        self.counts[key] += 1
        return key


@dataclass
class LogGate:
    """``admit(kind, now)``: the text to add to a refusal's log line, or None when the
    line is held back: at most ``burst`` lines of one kind and ``total`` of all kinds
    per ``window`` s (so each kind of attack is told, and no flood of any mix of kinds
    writes more), then a summary of what was held."""

    burst: int = 5
    total: int = 40
    window: float = 10.0
    by_reason: bool = True            # the summary names the commonest kinds held
    _start: float = float("-inf")
    _logged: int = 0
    _per: Counter = field(default_factory=Counter)
    _held: Counter = field(default_factory=Counter)

    def admit(self, kind: str, now: float) -> str | None:
        if now - self._start >= self.window:
            self._start, self._logged = now, 0
            self._per.clear()
        if self._logged >= self.total or self._per[kind] >= self.burst:
            if kind in self._held or len(self._held) < 64:
                self._held[kind] += 1
            else:
                self._held[OTHER] += 1
            return None
        self._logged += 1
        self._per[kind] += 1               # at most ``total`` kinds in one window
        if not self._held:
            return ""
        n = sum(self._held.values())
        top = ", ".join(f"{k} x{c}" for k, c in self._held.most_common(3))
        self._held.clear()
        if not self.by_reason:
            return f" ({n} more like it were not logged)"
        return f" ({n} more refusals were not logged: {top})"


_ID = re.compile(r"[^\s:,()]*[\d~'\"/\\][^\s:,()]*")


def kind_of(reason: str) -> str:
    """The kind of a refusal: its text with every token that may carry a sender's ids
    or numbers (job, plan and piece ids, terms) as ``#``, so a flood of refusals
    naming made-up jobs is one kind."""
    return _ID.sub("#", reason.split(":")[0])[:80]


class FloodFilter(logging.Filter):
    """A handler filter: each warning or error line of the code (by logger and message
    template) passes at most ``burst`` times per ``window`` s, and the next one that
    passes says how many were held back. So a flood of malformed or forged messages,
    each refused with a line, cannot grow a node's log faster than that, whatever its
    rate. Info and debug lines pass (shown only when asked for with -v)."""

    def __init__(self, burst: int = 20, window: float = 10.0, keys: int = 512,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window, self.keys, self.clock = burst, window, keys, clock
        self._gates: OrderedDict[tuple, LogGate] = OrderedDict()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.levelno >= logging.CRITICAL or \
                getattr(record, "gated", False):     # gated where it was logged already
            return True
        key = (record.name, str(record.msg)[:200])
        with self._lock:
            gate = self._gates.get(key)
            if gate is None:
                gate = self._gates[key] = LogGate(self.burst, self.burst, self.window,
                                                  False)
                while len(self._gates) > self.keys:
                    self._gates.popitem(last=False)
            self._gates.move_to_end(key)
            more = gate.admit("", self.clock())
        if more is None:
            return False
        if more:
            record.msg, record.args = record.getMessage() + more, None
        return True
