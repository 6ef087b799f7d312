"""Liveness: heartbeats on the control connection, so a node that stops answering
(frozen, swapping, its Wi-Fi gone) leaves the plans in ~2-3 s instead of after the
broker's 1.5 x keepalive.

Every node publishes a small ``Campaign(kind="heartbeat")`` on the election topic
every ``period`` seconds from its control thread (so a wedged control loop stops
them too). Every node and client notes when it last heard each member (any
message from it counts). A member online but unheard for ``stall_after`` seconds
is *stalled*: it is out of the live mesh (plans, election members) until it is
heard again. A member never heard at all (only its retained birth, which anyone
could have left there) is *unconfirmed* and out of the live mesh the same way, so a
flood of fake retained births neither crowds the election nor keeps a silent mesh
from being judged. Only the election gives an unconfirmed member ``confirm_within``
(two heartbeats) from when this node first saw it: a node joining a running mesh
reads the retained births before their heartbeats, and must not claim ahead of a
better member it has simply not heard yet (a fake birth delays a claim by that much,
once, and never enters a plan). A process that was itself stopped cannot judge others: when its own
clock jumped (a gap of ``stall_after / 2`` between ticks), every member counts as
just heard; and when at least two members and half of the others fall silent at
once, the broker, the network or this host is the likelier culprit: nobody is
judged (their clocks start again).

``Liveness`` is a small state holder with no I/O and an injected clock; the agent
(control thread) and the client (its dispatcher, under its lock) own one each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class LivenessParams:
    period: float = 0.5            # heartbeat interval
    stall_after: float = 2.5       # unheard this long -> stalled
    confirm_within: float | None = None   # election grace for an unheard birth (2 x period)

    @property
    def grace(self) -> float:
        return 2.0 * self.period if self.confirm_within is None else self.confirm_within


class Liveness:
    def __init__(self, params: LivenessParams | None = None) -> None:
        self.params = params or LivenessParams()
        self._heard: dict[str, float] = {}
        self._last_tick: float | None = None
        self._stalled: frozenset[str] = frozenset()
        self._unconfirmed: frozenset[str] = frozenset()
        self._first_seen: dict[str, float] = {}     # unheard members: when first seen
        self._ungraced: frozenset[str] = frozenset()

    def heard(self, node: str, now: float) -> None:
        self._heard[node] = now
        self._first_seen.pop(node, None)

    def last_heard(self, node: str) -> float | None:
        return self._heard.get(node)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop members that left (bounded by the membership)."""
        keep = set(keep)
        for n in [n for n in self._heard if n not in keep]:
            del self._heard[n]
        for n in [n for n in self._first_seen if n not in keep]:
            del self._first_seen[n]

    def tick(self, now: float, online: Iterable[str], me: str | None = None
             ) -> tuple[frozenset[str], bool]:
        """(stalled members, changed since the last tick: stalled or unconfirmed).
        A member never heard (a retained birth, maybe forged, with no heartbeat behind
        it) is *unconfirmed*: out of elections and plans until heard, and it never
        counts towards "most of the mesh is silent"."""
        p = self.params
        if self._last_tick is not None and now - self._last_tick > p.stall_after / 2:
            for n in self._heard:               # we were stopped ourselves
                self._heard[n] = now
        self._last_tick = now
        stalled, unconfirmed, others = set(), set(), 0
        for n in online:
            if n == me:
                continue
            at = self._heard.get(n)
            if at is None:
                unconfirmed.add(n)
                self._first_seen.setdefault(n, now)
                continue
            others += 1
            if now - at > p.stall_after:
                stalled.add(n)
        if len(stalled) >= 2 and 2 * len(stalled) >= others:
            # most of the mesh silent at once: the broker, the network or this host
            # stalled, not each of them; judge nobody and start their clocks again
            for n in stalled:
                self._heard[n] = now
            stalled = set()
        new, unc = frozenset(stalled), frozenset(unconfirmed)
        ungraced = frozenset(n for n in unc if now - self._first_seen[n] > p.grace)
        changed = (new != self._stalled or unc != self._unconfirmed
                   or ungraced != self._ungraced)
        self._stalled, self._unconfirmed, self._ungraced = new, unc, ungraced
        return new, changed

    @property
    def unconfirmed(self) -> frozenset[str]:
        """Online members never heard (no heartbeat, no live birth) yet."""
        return self._unconfirmed

    def excluded(self, online: Iterable[str], me: str | None = None) -> frozenset[str]:
        """Members of ``online`` out of elections and plans now: stalled, or never
        heard (checked now, not at the last tick: a fake birth never counts)."""
        return self._stalled | frozenset(n for n in online
                                         if n != me and n not in self._heard)

    def excluded_from_election(self, online: Iterable[str], me: str | None,
                               now: float) -> frozenset[str]:
        """Members of ``online`` out of the election now: stalled, or never heard
        ``grace`` seconds after this node first saw them (see the module doc)."""
        grace = self.params.grace
        out = set(self._stalled)
        for n in online:
            if n != me and n not in self._heard:
                if now - self._first_seen.setdefault(n, now) > grace:
                    out.add(n)
        return frozenset(out)

    @property
    def stalled(self) -> frozenset[str]:
        return self._stalled

    def silent_for(self, node: str, now: float) -> float:
        at = self._heard.get(node)
        return 0.0 if at is None else now - at
