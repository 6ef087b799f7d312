"""An in-process mesh for tests and development: several DataPlanes, one broker, a
minimal leader.

``InProcessMesh(broker_url | MemoryBroker, mesh, ...)`` gives each device of
``mesh`` a ``NodeContext`` (its own bus) and a ``DataPlane``, all sharing one plan
store; ``MiniLeader`` runs the real leader's duties and job protocol machine
(``node.leader``, ``node.leaderproto``) on that mesh, planning with the leader's
``make_plan`` or handing out a fixed (hand-made) plan. It is the node agent reduced to
what the data plane needs: no election, no telemetry.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from meshdl.errors import MeshdlError
from meshdl.graph.plan import Plan
from meshdl.node.dataplane import DataPlane
from meshdl.node.graphs import GraphCache
from meshdl.node.planstore import IssuedPlan, PlanStore
from meshdl.planner.base import fill_routes, plan_id as make_plan_id
from meshdl.wire import topics
from meshdl.wire.control import JobRequest, NodeState, decode_control, encode_control

log = logging.getLogger(__name__)


@dataclass
class PlanBook:
    """Plans adopted by the in-process mesh (shared by every context)."""

    store: PlanStore = field(default_factory=PlanStore)
    clients: dict[str, str] = field(default_factory=dict)     # job -> client
    term: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)


class HarnessContext:
    """A ``NodeContext`` for one in-process device."""

    def __init__(self, node_id: str, mesh_name: str, bus: Any, mesh: Any, book: PlanBook,
                 emulate: bool) -> None:
        self.node_id, self.mesh_name, self.bus = node_id, mesh_name, bus
        self.emulate = emulate
        self._mesh, self._book = mesh, book

    def device(self):
        return self._mesh.device(self.node_id)

    def live_mesh(self):
        return self._mesh

    def plan(self, plan_id: str) -> Plan | None:
        return self._book.store.get(plan_id)

    def term(self) -> int:
        return self._book.term

    def job_client(self, job: str) -> str | None:
        with self._book.lock:
            client = self._book.clients.get(job)
        if client is None:
            try:
                client = topics.job_owner(job)
            except MeshdlError:
                return None
        return client


def finish_plan(plan: Plan, g: Any, mesh: Any, term: int | None = None) -> Plan:
    """Complete a hand-made plan as ``meshdl.plan`` completes its own: routes, the
    predicted cost and the content-hash id. No term: that is the issued plan's
    envelope's (``IssuedPlan``), set when the harness's leader issues it; ``term`` is
    accepted for older callers and ignored."""
    from meshdl.planner import simulate
    fill_routes(plan, g, mesh)
    score = simulate(plan, g, mesh)
    plan.latency_s, plan.energy_j = score.latency_s, score.energy_j
    plan.meta.setdefault("score", score.to_dict())
    plan.plan_id = make_plan_id(plan)
    return plan


class FixedPlans(dict):
    """model -> hand-made Plan; adding or withdrawing one makes the leader plan that
    model's requests again on their next job."""

    def __init__(self, plans: dict[str, Plan], changed: Callable[[str | None], None]) -> None:
        super().__init__(plans)
        self._changed = changed

    def __setitem__(self, model: str, plan: Plan) -> None:
        super().__setitem__(model, plan)
        self._changed(model)

    def __delitem__(self, model: str) -> None:
        super().__delitem__(model)
        self._changed(model)

    def pop(self, model: str, *default: Any) -> Any:
        out = super().pop(model, *default)
        self._changed(model)
        return out


class MiniLeader:
    """The real leader's duties (``node.leader.LeaderDuties`` around the job protocol
    machine ``node.leaderproto``) on the harness's fixed mesh: no election, no
    telemetry, no standing default requests. ``fixed``: model name -> hand-made Plan
    (served instead of ``meshdl.plan``)."""

    ME = "mini-leader"

    def __init__(self, bus: Any, mesh_name: str, mesh: Any, book: PlanBook,
                 adopt: Callable[[IssuedPlan], None], graphs: GraphCache,
                 fixed: dict[str, Plan] | None = None) -> None:
        from meshdl.node.leader import LeaderDuties
        self.bus, self.mesh_name, self.mesh, self.book = bus, mesh_name, mesh, book
        self.fixed = FixedPlans(dict(fixed or {}), lambda model: self.duties.invalidate(model))
        self.duties = LeaderDuties(
            me=self.ME, mesh_name=mesh_name, term=book.term, bus=bus, live_mesh=lambda: mesh,
            graphs=graphs, defaults=[], store=book.store, adopt=adopt,
            client_of=lambda job: book.clients.get(job), fixed=self.fixed)
        self.duties.start()
        bus.subscribe(topics.job_all(mesh_name, "request"), self._on_request, qos=1)

    def _on_request(self, topic: str, payload: Any, retained: bool) -> None:
        try:
            req = decode_control(payload, JobRequest)
        except MeshdlError as exc:
            log.warning("mini leader dropped a request on %s: %s", topic, exc)
            return
        with self.book.lock:
            self.book.clients[req.job] = req.client
            while len(self.book.clients) > 4096:
                self.book.clients.pop(next(iter(self.book.clients)))
        self.duties.job_request(req)

    def stop(self) -> None:
        self.duties.stop()

    def publish_plan(self, issued: IssuedPlan) -> None:
        """Issue a plan now (retained, adopted by every node), as the leader does."""
        self.duties._publish(issued)


class InProcessMesh:
    """Every device of ``mesh`` as a DataPlane in this process, plus a MiniLeader.

    ``broker``: a broker URL (each node gets its own PahoBus) or a MemoryBroker.
    """

    def __init__(self, broker: Any, mesh: Any, *, mesh_name: str = "test",
                 emulate: bool = False, fixed: dict[str, Plan] | None = None,
                 bus_options: dict[str, dict] | None = None, **dataplane_options: Any) -> None:
        self.mesh, self.mesh_name = mesh, mesh_name
        self.book = PlanBook()
        self.graphs = GraphCache()
        self.buses: dict[str, Any] = {}
        self.planes: dict[str, DataPlane] = {}
        self._broker = broker
        for dev in sorted(mesh.devices):
            bus = self._bus(f"node-{dev}", (bus_options or {}).get(dev, {}))
            self.buses[dev] = bus
            ctx = HarnessContext(dev, mesh_name, bus, mesh, self.book, emulate)
            self.planes[dev] = DataPlane(ctx, graphs=self.graphs, set_threads=False,
                                         **dataplane_options)
        for dev, bus in self.buses.items():
            bus.publish(topics.node_state(mesh_name, dev),
                        encode_control(NodeState(dev, True, 1, ts=time.time())), qos=1,
                        retain=True)
        self._leader_bus = self._bus("mini-leader", {})
        self.leader = MiniLeader(self._leader_bus, mesh_name, mesh, self.book, self._adopt,
                                 self.graphs, fixed)

    @property
    def url(self) -> str | None:
        return self._broker if isinstance(self._broker, str) else None

    def _bus(self, client_id: str, options: dict) -> Any:
        if isinstance(self._broker, str):
            from meshdl.transport.paho_bus import PahoBus
            bus = PahoBus(self._broker, client_id=f"{client_id}-{id(self):x}", **options)
            return bus
        return self._broker.bus(client_id)

    def _adopt(self, issued: IssuedPlan) -> None:
        if self.book.store.adopt(issued):
            for dp in self.planes.values():
                dp.on_plan(issued.plan)

    def add_plan(self, plan: Plan, model: str | None = None) -> Plan:
        """Serve ``plan`` for job requests of ``model`` (default: plan.model)."""
        self.leader.fixed[model or plan.model] = plan
        self.leader.publish_plan(IssuedPlan.issue(plan, self.book.term, MiniLeader.ME))
        return plan

    def start(self) -> "InProcessMesh":
        for dp in self.planes.values():
            dp.start()
        return self

    def kill(self, device: str) -> None:
        """The device vanishes: its data plane stops and peers hear it is offline."""
        dp = self.planes.pop(device)
        dp.stop()
        bus = self.buses.pop(device)
        bus.publish(topics.node_state(self.mesh_name, device),
                    encode_control(NodeState(device, False, 1, ts=time.time())), qos=1,
                    retain=True)
        bus.close()
        for other in self.planes.values():
            other.on_members(set(self.planes))

    def stop(self) -> None:
        self.leader.stop()
        for dp in self.planes.values():
            dp.stop()
        for bus in [*self.buses.values(), self._leader_bus]:
            try:
                bus.close(timeout=1.0)
            except MeshdlError:
                pass

    def __enter__(self) -> "InProcessMesh":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
