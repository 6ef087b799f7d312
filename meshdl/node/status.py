"""The live mesh as seen from outside: retained states, telemetry, leader, plans.

``MeshWatcher(bus, mesh)`` subscribes and keeps a ``Snapshot``; ``wait_for(pred,
timeout)`` blocks until ``pred(snapshot)`` holds (tests, ``meshdl mesh up``,
benchmarks: no sleep-and-hope). ``read_status(url, mesh)`` is the one-shot read
behind ``meshdl mesh status``. Malformed records are skipped with a log line.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from meshdl.security.bounds import sanitise
from meshdl.errors import MeshdlError
from meshdl.wire import topics
from meshdl.wire.control import (LeaderInfo, NodeState, PlanMessage, Telemetry,
                                 decode_control)

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    mesh: str
    states: dict[str, NodeState] = field(default_factory=dict)
    telemetry: dict[str, Telemetry] = field(default_factory=dict)
    leader: LeaderInfo | None = None
    plans: dict[str, PlanMessage] = field(default_factory=dict)
    messages: int = 0

    @property
    def online(self) -> list[str]:
        return sorted(n for n, s in self.states.items() if s.online)

    def view(self, node: str) -> tuple[str, int, tuple[str, ...]] | None:
        """(leader, term, plan ids) a node last reported in its telemetry."""
        t = self.telemetry.get(node)
        if t is None or not isinstance(t.extra, dict):
            return None
        e = t.extra
        return (str(e.get("leader") or ""), int(e.get("term") or 0),
                tuple(sorted(e.get("plans") or ())))

    def agreed(self, nodes: list[str] | None = None, need_plan: bool = True) -> bool:
        """Every (online) node reports the retained leader, its term and the current
        retained plans."""
        nodes = self.online if nodes is None else nodes
        if not nodes or self.leader is None:
            return False
        if any(n not in self.online for n in nodes):
            return False
        plans = tuple(sorted(p for p, m in self.plans.items() if m.term == self.leader.term))
        if need_plan and not plans:
            return False
        want = (self.leader.node, self.leader.term, plans)
        return all(self.view(n) == want for n in nodes)

    def plan_devices(self) -> set[str]:
        out: set[str] = set()
        for m in self.plans.values():
            for st in m.plan.get("stages", []):
                out.update(t.get("device") for t in st.get("tasks", []))
        return out

    def to_dict(self) -> dict[str, Any]:
        members = {}
        for n, s in sorted(self.states.items()):
            t = self.telemetry.get(n)
            members[n] = {"online": s.online, "session": s.session, "profile": s.profile,
                          "flops": s.flops, "memory_bytes": s.memory_bytes,
                          "version": s.version,
                          "load": None if t is None else t.load,
                          "links": {} if t is None or not s.online else t.links,
                          "view": None if t is None else t.extra}
        return {"mesh": self.mesh, "members": members,
                "leader": None if self.leader is None else
                {"node": self.leader.node, "term": self.leader.term},
                "plans": {p: {"term": m.term, "model": m.plan.get("model"),
                              "strategy": m.plan.get("strategy"),
                              "source": m.plan.get("source"), "sink": m.plan.get("sink"),
                              "latency_s": m.plan.get("latency_s"),
                              "energy_j": m.plan.get("energy_j"),
                              "devices": sorted({t["device"] for s in m.plan.get("stages", [])
                                                 for t in s.get("tasks", [])})}
                          for p, m in sorted(self.plans.items())}}


class MeshWatcher:
    """Follows one mesh's retained records on ``bus`` (closes nothing it did not open)."""

    def __init__(self, bus, mesh: str) -> None:
        self.bus, self.mesh = bus, mesh
        self._cv = threading.Condition()
        self._snap = Snapshot(mesh)
        self.last_change = time.monotonic()
        m = mesh
        for pattern, kind in ((topics.node_state_all(m), "state"),
                              (topics.node_telemetry_all(m), "telemetry"),
                              (topics.leader(m), "leader"), (topics.plan_all(m), "plan")):
            bus.subscribe(pattern, self._handler(kind), qos=1)

    def _handler(self, kind: str) -> Callable[[str, Any, bool], None]:
        def handle(topic: str, payload: Any, retained: bool) -> None:
            try:
                self._apply(kind, topic, payload)
            except MeshdlError as exc:
                log.warning("skipped a malformed %s record on %s: %s", kind, sanitise(topic, 160), exc)
        return handle

    def _apply(self, kind: str, topic: str, payload: Any) -> None:
        p = topics.parse(topic)
        empty = not len(payload)
        with self._cv:
            s = self._snap
            s.messages += 1
            if kind == "state":
                if empty:
                    s.states.pop(p.node, None)
                else:
                    st = decode_control(payload, NodeState)
                    old = s.states.get(p.node)
                    if old is None or st.session >= old.session:
                        s.states[p.node] = st
            elif kind == "telemetry":
                if empty:
                    s.telemetry.pop(p.node, None)
                else:
                    s.telemetry[p.node] = decode_control(payload, Telemetry)
            elif kind == "leader":
                s.leader = None if empty else decode_control(payload, LeaderInfo)
            elif kind == "plan":
                if empty:
                    s.plans.pop(p.plan_id, None)
                else:
                    s.plans[p.plan_id] = decode_control(payload, PlanMessage)
            self.last_change = time.monotonic()
            self._cv.notify_all()

    def snapshot(self) -> Snapshot:
        with self._cv:
            s = self._snap
            return Snapshot(s.mesh, dict(s.states), dict(s.telemetry), s.leader,
                            dict(s.plans), s.messages)

    def wait_for(self, pred: Callable[[Snapshot], bool], timeout: float) -> Snapshot | None:
        """The first snapshot satisfying ``pred`` within ``timeout`` s, else None."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                snap = self.snapshot()
                if pred(snap):
                    return snap
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(min(left, 0.1))

    def settle(self, quiet: float = 0.3, timeout: float = 3.0) -> Snapshot:
        """Wait until no record arrived for ``quiet`` s (retained delivery is over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if time.monotonic() - self.last_change >= quiet:
                break
            time.sleep(0.05)
        return self.snapshot()


def read_status(url: str, mesh: str, *, username: str | None = None,
                password: str | None = None, tls_ca: str | None = None,
                protocol: str = "auto", wait: float = 0.0,
                bundle: str | None = None) -> Snapshot:
    """One look at the live mesh from its retained records (``wait``: also collect
    telemetry for that long). With ``bundle``: over a secure mesh, verified records only."""
    from meshdl.transport.paho_bus import PahoBus
    if bundle is not None:
        from meshdl.security.securebus import secure_paho
        bus = secure_paho(url, bundle, mesh=mesh, protocol=protocol)
    else:
        bus = PahoBus(url, username=username, password=password, tls_ca=tls_ca,
                      protocol=protocol)
    with bus:
        w = MeshWatcher(bus, mesh)
        snap = w.settle()
        if wait > 0:
            time.sleep(wait)
            snap = w.snapshot()
        return snap
