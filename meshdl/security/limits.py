"""Admission limits: a per-key token bucket with a bounded number of keys.

Pure apart from the clock, which is passed in: ``RateLimiter.allow(key, now)``.
Used by the leader to cap job requests per client, so one client flooding
requests cannot make everybody else's jobs time out.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


MAX_WAITING_BYTES = 64 << 20     # pieces a node holds for plans it has not adopted yet


@dataclass(frozen=True)
class Bucket:
    tokens: float
    at: float


def refill(b: Bucket, now: float, rate: float, burst: float) -> Bucket:
    """The bucket at ``now`` (tokens grow at ``rate``/s up to ``burst``)."""
    return Bucket(min(burst, b.tokens + max(0.0, now - b.at) * rate), max(now, b.at))


class RateLimiter:
    """``allow(key, now)`` takes one token from ``key``'s bucket. At most ``max_keys``
    buckets are kept (least recently used dropped), and ``allow_total`` caps all
    keys together, so neither one key nor many keys can flood."""

    def __init__(self, rate: float = 5.0, burst: float = 20.0, max_keys: int = 1024,
                 total_rate: float = 50.0, total_burst: float = 100.0) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.total_rate, self.total_burst = total_rate, total_burst
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()
        self._total = Bucket(total_burst, 0.0)
        self._lock = threading.Lock()
        self.refused = 0

    def allow(self, key: str, now: float) -> bool:
        with self._lock:
            total = refill(self._total, now, self.total_rate, self.total_burst)
            b = refill(self._buckets.pop(key, Bucket(self.burst, now)), now, self.rate,
                       self.burst)
            ok = b.tokens >= 1.0 and total.tokens >= 1.0
            if ok:
                b, total = Bucket(b.tokens - 1.0, b.at), Bucket(total.tokens - 1.0, total.at)
            else:
                self.refused += 1
            self._buckets[key] = b
            self._total = total
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)


def relay_refusal(hops: tuple[str, ...], members: "set[str] | frozenset[str]",
                  active_jobs: "set[str] | frozenset[str]", job: str) -> str | None:
    """Why a relay must not forward a piece along ``hops`` (None: it may).

    A route never revisits a node (no loops: one publish stays one publish per hop);
    the next hop is a live mesh member, or the route's final destination (a client)
    for a job this node takes part in. So relayed frames to made-up names reach no
    new link, queue or thread."""
    if len(set(hops)) != len(hops):
        return "the route revisits a node (a loop)"
    nxt = hops[1] if len(hops) > 1 else None
    if nxt is None or nxt in members:
        return None
    if len(hops) == 2 and job in active_jobs:
        return None
    return f"next hop {nxt[:64]!r} is not a live member of the mesh"
