"""Membership: wire messages -> mesh events, the folded MeshState, duplicate-id rules.

Pure helpers turn decoded ``NodeState``/``Telemetry`` messages into
``meshdl.mesh`` events; ``Membership`` holds the folded ``MeshState`` behind a lock
for the agent's threads.

Duplicate node ids (``claim_verdict``): a starting process (session S, random
nonce) publishes a ``claim`` on its node's probe topic and listens for
``dup_window`` seconds before its birth. A live owner of the id answers ``here``
-> the newcomer refuses to start. Two processes starting together see each
other's claims -> the earlier session (then the smaller nonce) keeps the id, the
other refuses. Every process uses a unique MQTT client id, so the broker never
kicks a live node off (mosquitto's client-id takeover would make two processes
with one id flap forever). A process that later sees an online state of its id
with a newer session (it was hung and someone took over) stops without
publishing anything.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

from meshdl.mesh.state import (MeshState, NodeOffline, NodeOnline, Telemetry as TelemetryEvent,
                               apply)
from meshdl.wire.control import NodeState, Telemetry

log = logging.getLogger(__name__)


def caps_of(state: NodeState) -> dict[str, Any]:
    caps = dict(state.caps)
    caps.update({"profile": state.profile or caps.get("profile") or "custom",
                 "flops": state.flops if state.flops > 0 else caps.get("flops"),
                 "memory_bytes": state.memory_bytes if state.memory_bytes > 0
                 else caps.get("memory_bytes"),
                 "power": dict(state.power) if state.power else caps.get("power"),
                 "version": state.version})
    return caps


def state_event(state: NodeState) -> NodeOnline | NodeOffline:
    if state.online:
        return NodeOnline(state.node, caps_of(state), state.session)
    return NodeOffline(state.node, state.session)


def _figure(fig: Any, *keys: str) -> float | None:
    for k in keys:
        v = fig.get(k) if isinstance(fig, Mapping) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    return None


def telemetry_event(msg: Telemetry) -> TelemetryEvent:
    """Links accept ``throughput_bps`` or ``bps``; malformed entries are skipped."""
    links = {}
    for nb, fig in msg.links.items():
        if not isinstance(nb, str) or not isinstance(fig, Mapping):
            continue
        rtt, bps = _figure(fig, "rtt_s"), _figure(fig, "throughput_bps", "bps")
        if rtt is None and bps is None:
            continue
        links[nb] = {k: v for k, v in (("rtt_s", rtt), ("throughput_bps", bps),
                                       # an access link's directions (node/probe_dir.py)
                                       ("up_bps", _figure(fig, "up_bps")),
                                       ("down_bps", _figure(fig, "down_bps"))) if v}
    session = msg.extra.get("session") if isinstance(msg.extra, Mapping) else None
    return TelemetryEvent(msg.node, float(max(0.0, msg.load)), links,
                          session if type(session) is int else None)


def claim_verdict(mine: tuple[int, str], other: tuple[int, str]) -> bool:
    """True when this process keeps the id against a concurrent claim ``other``
    ((session, nonce) pairs): the earlier session wins, then the smaller nonce."""
    return mine < other


class Membership:
    """The folded MeshState, thread-safe. ``apply`` returns True when the set of
    online members changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = MeshState()

    @property
    def state(self) -> MeshState:
        with self._lock:
            return self._state

    def apply(self, event: Any) -> bool:
        with self._lock:
            before = self._state.online
            self._state = apply(self._state, event)
            return self._state.online != before

    def online_flops(self) -> dict[str, float]:
        s = self.state
        out = {}
        for m in s.online:
            f = s.members[m].caps.get("flops")
            out[m] = float(f) if isinstance(f, (int, float)) else 0.0
        return out
