"""Leader duties: the edge around the leader's job protocol machine
(``node.leaderproto``): keep plans current for the live mesh and answer job requests.

Runs only on the node that won the election, for one term, and as the test harness's
leader (``node.harness``): one implementation. Job requests are stepped through the
machine at once (on the caller's thread, under this class's lock); its answers are
published as job statuses; its ``MakePlan`` effects are carried out on this class's
worker thread (planning and the one-off model tracing never run on a bus dispatcher).
The worker also re-plans every standing request when the membership changes or a
link moves beyond the threshold for long enough (``ReplanGate``), publishes each plan
retained at ``plan/{plan_id}`` (an ``IssuedPlan``: plan, id, term, leader), adopts it
into the node's one plan store, and clears superseded plans.

``make_plan`` is the plan-issuing path shared with ``meshdl plan show``.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Mapping

from meshdl.errors import MeshdlError, PlanError
from meshdl.graph.plan import Plan
from meshdl.mesh import Mesh, ReplanGate, mesh_changed
from meshdl.node import jobproto as jp
from meshdl.node import leaderproto as lp
from meshdl.node.graphs import GraphCache
from meshdl.node.leaderproto import StandingRequest
from meshdl.node.planstore import IssuedPlan, PlanStore
from meshdl.wire import topics
from meshdl.wire.control import JobRequest, encode_control

__all__ = ["LeaderDuties", "StandingRequest", "needs_replan", "make_plan", "duties_for",
           "default_models"]

log = logging.getLogger(__name__)

RETIRE_S = 5.0      # a superseded plan stays retained this long (x K): jobs on it finish

# the leader's name for the pure re-plan predicate (ReplanGate adds persistence)
needs_replan = mesh_changed


def make_plan(req: StandingRequest, mesh: Mesh, g: Any, leader: str = "",
              **options: Any) -> Plan:
    """The plan for ``req`` on ``mesh`` (``g`` traced for it), as a leader makes it:
    the topology's default source/sink, else the leader (with a note), only the part
    of the mesh connected to the source, and ``meta`` naming the request and the
    members. Not yet issued (no term): ``IssuedPlan.issue`` does that."""
    import dataclasses
    import meshdl
    fallback = leader if leader in mesh.devices else sorted(mesh.devices)[0]
    source = req.source or mesh.defaults.get("source") or fallback
    sink = req.sink or mesh.defaults.get("sink") or source
    notes = []
    if req.source is None and source not in mesh.devices:
        notes.append(f"default source {source} is offline; using {fallback}")
        source = fallback
    if req.sink is None and sink not in mesh.devices:
        notes.append(f"default sink {sink} is offline; using {source}")
        sink = source
    for role, dev in (("source", source), ("sink", sink)):
        if dev not in mesh.devices:
            raise PlanError(f"{role} {dev} is not online in mesh {mesh.name}; online: "
                            f"{', '.join(sorted(mesh.devices))}")
    if not mesh.is_connected():
        import networkx as nx
        comp = next(set(c) for c in nx.connected_components(mesh.graph) if source in c)
        mesh = mesh.subgraph(comp)
    plan = meshdl.plan(g, mesh, strategy=req.strategy, source=source, sink=sink,
                       alpha=req.alpha, objective=req.objective, **options)
    meta: dict[str, Any] = {**plan.meta, "request": asdict(req),
                            "members": sorted(mesh.devices)}
    if mesh.time_scale != 1.0:      # emulated K times slower: times / K are the real ones
        meta["time_scale"] = mesh.time_scale
    if mesh.star is not None:
        # the input's time to the source (its downlink): the client's resend timer
        # (a fixed 50 ms resent a slow link's input several times, ahead of the answer)
        meta["input_s"] = mesh.star.inbound_time(source, 4 * math.prod(g.input_shape))
    return dataclasses.replace(plan, meta=meta, notes=[*plan.notes, *notes])


class LeaderDuties:
    def __init__(self, *, me: str, mesh_name: str, term: int, bus,
                 live_mesh: Callable[[], Mesh], graphs: GraphCache,
                 defaults: list[StandingRequest], store: PlanStore,
                 adopt: Callable[[IssuedPlan], None],
                 client_of: Callable[[str], str | None] = lambda job: None,
                 why: Callable[[], Mapping[str, str]] = dict,
                 fixed: Mapping[str, Plan] | None = None,
                 link_threshold: float = 0.3, max_requests: int = 32,
                 debounce: float = 0.15, confirm_s: float = 0.0,
                 compression: str = "off") -> None:
        self.me, self.mesh_name, self.term, self._bus = me, mesh_name, term, bus
        self._compression = compression        # how the nodes send pieces (cost model)
        self._wires: dict[tuple, Any] = {}
        self._live_mesh, self._graphs = live_mesh, graphs
        self._client_of, self._why = client_of, why
        self._fixed = fixed if fixed is not None else {}   # model -> hand-made plan (tests)
        self._defaults = list(dict.fromkeys(defaults))
        self._debounce = debounce
        # plans issued and seen live in the node's one plan store; adopt = the agent's
        self._store, self._adopt = store, adopt
        recovered = tuple(r for r in (StandingRequest.from_plan(ip.plan)
                                      for ip in store.retained().values()) if r is not None)
        self._state = lp.initial(me, term, tuple(self._defaults), recovered,
                                 params=lp.Params(max_requests=max_requests))
        self._todo: collections.deque[StandingRequest] = collections.deque()
        self._republish = False
        self._planned_mesh: Mesh | None = None
        self._retiring: dict[str, float] = {}    # superseded plan id -> since (monotonic)
        # link changes must persist confirm_s before a re-plan (no flapping)
        self._gate = ReplanGate(link_threshold, confirm_s)
        self._cv = threading.Condition()
        self._dirty_at: float | None = time.monotonic()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"leader-{me}-t{term}")
        self.replans = 0           # full re-plans of every standing request
        self.plans_made = 0        # plans made (one request each)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    @property
    def state(self) -> lp.LeaderState:
        return self._state

    # ------------------------------------------------------------ the machine
    def _step(self, *events: Any) -> list:
        """Step the machine (caller holds no lock); queue MakePlan for the worker and
        publish the answers. Returns the answers."""
        answers = []
        with self._cv:
            for ev in events:
                self._state, effects = lp.step(self._state, ev)
                for eff in effects:
                    if isinstance(eff, lp.MakePlan):
                        self._todo.append(eff.request)
                        self._cv.notify_all()
                    else:
                        answers.append(eff)
        for msg in answers:
            self._send_answer(msg)
        return answers

    def _send_answer(self, msg: "jp.JobPlanned | jp.JobFailed") -> None:
        if isinstance(msg, jp.JobFailed):
            log.warning("job %s: %s", msg.job, msg.reason)
        try:
            self._bus.publish(topics.job(self.mesh_name, msg.job, "status"),
                              encode_control(jp.to_status(msg, time.time(), self.term)), qos=1)
        except MeshdlError as exc:
            log.warning("answer to job %s not sent: %s", msg.job, exc)

    def _members_event(self, mesh: Mesh) -> lp.MembersChanged:
        return lp.MembersChanged(frozenset(mesh.devices), time.monotonic(),
                                 tuple(sorted(self._why().items())))

    # ------------------------------------------------------------ agent calls
    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: float = 0.0) -> None:
        """Stop answering; with ``wait``, also wait that long for a plan being made
        (the node is leaving: its process must not exit inside torch)."""
        with self._cv:
            self._stopped = True
            self._state, _ = lp.step(self._state, lp.LeaderChanged(None, self.term + 1))
            self._cv.notify_all()
        t = self._thread
        if wait > 0 and t.is_alive() and t is not threading.current_thread():
            t.join(wait)

    def mesh_changed(self) -> None:
        with self._cv:
            now = time.monotonic()     # sooner than a later look (a plan to retire)
            if self._dirty_at is None or self._dirty_at > now:
                self._dirty_at = now
            self._cv.notify_all()

    def republish(self) -> None:
        """Publish every live plan again (the broker restarted and lost them)."""
        with self._cv:
            self._republish = True
            self._cv.notify_all()

    def job_request(self, job: JobRequest) -> None:
        default = self._defaults[0] if self._defaults else StandingRequest("efficientnet_lite0")
        answers = self._step(self._members_event(self._live_mesh()),
                             lp.JobRequested.from_wire(job, default, time.monotonic()))
        log.debug("leader %s: request of job %s answered %s", self.me, job.job,
                  ", ".join(type(a).__name__ for a in answers) or "later (planning)")

    def invalidate(self, model: str | None = None) -> None:
        """The planner changed (a hand-made plan was added or withdrawn)."""
        self._step(lp.Replan(model))

    def plan_seen(self, plan_id: str, term: int | None) -> None:
        """A retained plan appeared (term) or was cleared (None) on the broker."""
        if term is not None and term < self.term:      # an older leader's: clear it
            with self._cv:
                self._dirty_at = self._dirty_at or time.monotonic()
                self._cv.notify_all()

    # ------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            late: list = []
            with self._cv:
                while not self._stopped and not self._todo and not self._republish and (
                        self._dirty_at is None
                        or time.monotonic() - self._dirty_at < self._debounce) and not late:
                    wait = None if self._dirty_at is None else \
                        self._debounce - (time.monotonic() - self._dirty_at)
                    self._cv.wait(0.5 if wait is None else max(min(wait, 0.5), 0.005))
                    self._state, late = lp.step(self._state, lp.Tick(time.monotonic()))
                if self._stopped:
                    return
                req = self._todo.popleft() if self._todo else None
                dirty = self._dirty_at is not None and \
                    time.monotonic() - self._dirty_at >= self._debounce
                if dirty:
                    self._dirty_at = None
                again, self._republish = self._republish, False
            for msg in late:                 # jobs whose deadline passed while waiting
                self._send_answer(msg)
            try:
                if again:
                    for pid in self._live():
                        issued = self._store.issued(pid)
                        if issued is not None and issued.term == self.term:
                            self._send(issued)
                if req is not None:          # a waiting client first, then the rest
                    self._make(req)
                if dirty:
                    self._refresh()
            except Exception:
                log.exception("leader %s (term %d): planning failed; will retry on the next "
                              "change", self.me, self.term)

    def _make(self, req: StandingRequest) -> None:
        """Plan one request (jobs wait for it) on the live mesh."""
        mesh = self._live_mesh()
        self._step(self._members_event(mesh))
        self._step(self._issue(req, mesh))
        self._clear_superseded(dropped_only=True)   # plans of requests the LRU let go
        if self._planned_mesh is None or set(mesh.devices) != set(self._planned_mesh.devices):
            # members changed (a fail-over, a device gone): the waiting job was answered
            # on the live mesh first; the other standing requests are re-planned next
            with self._cv:
                if self._dirty_at is None:
                    self._dirty_at = time.monotonic() - self._debounce

    def _refresh(self) -> None:
        mesh = self._live_mesh()
        self._step(self._members_event(mesh))
        if self._gate.check(self._planned_mesh, mesh, time.monotonic()):
            requests = self._state.requests
            log.info("leader %s term %d: planning %d request(s) on %d device(s)", self.me,
                     self.term, len(requests), len(mesh.devices))
            self._planned_mesh = mesh
            self.replans += 1
            for req in requests:
                self._step(self._issue(req, mesh))
        elif self._gate.pending_until is not None:     # look again once it could confirm
            with self._cv:
                if self._dirty_at is None:
                    self._dirty_at = self._gate.pending_until - self._debounce + 0.01
        self._clear_superseded()

    def _issue(self, req: StandingRequest, mesh: Mesh) -> "lp.PlanIssued | lp.PlanRefused":
        """Plan ``req`` on ``mesh``, publish and adopt the plan: the machine's event."""
        self.plans_made += 1
        try:
            issued = self._plan(req, mesh)
            self._publish(issued)
            return lp.PlanIssued(req, issued.plan_id, tuple(issued.plan.devices()),
                                 frozenset(mesh.devices))
        except MeshdlError as exc:
            log.warning("cannot plan %s on the live mesh: %s", req, exc)
            return lp.PlanRefused(req, str(exc))
        except Exception as exc:           # a bug or a model that breaks the planner:
            log.exception("planning %s failed", req)     # its jobs hear it, named
            return lp.PlanRefused(req, f"the leader could not plan {req.model}: "
                                       f"{type(exc).__name__}: {exc}")

    def _plan(self, req: StandingRequest, mesh: Mesh) -> IssuedPlan:
        fixed = self._fixed.get(req.model)
        if fixed is not None:                     # a hand-made plan (the test harness)
            return IssuedPlan.issue(fixed, self.term, self.me)
        g = self._graphs.get(req.model, req.input_shape)
        return IssuedPlan.issue(make_plan(req, mesh, g, self.me, **self._wire_option(g)),
                                self.term, self.me)

    def _wire_option(self, g) -> dict:
        """{"wire": WireModel} when the nodes compress pieces (the graph's tensors'
        ratios measured once on a synthetic frame), else {}."""
        if self._compression == "off":
            return {}
        key = (g.name, tuple(g.input_shape))
        wire = self._wires.get(key)
        if wire is None:
            from meshdl.planner.wiremodel import WireModel, measure_ratios, synthetic_input
            try:
                ratios = measure_ratios(g, synthetic_input(tuple(g.input_shape)))
            except Exception as exc:             # a model we cannot run: plan raw
                log.warning("cannot measure compression ratios of %s: %s", g.name, exc)
                ratios = {}
            wire = self._wires[key] = WireModel(self._compression, ratios)
        return {"wire": wire}

    def _publish(self, issued: IssuedPlan) -> str:
        from meshdl.planner.throughput import replicas
        for rep in replicas(issued.plan)[0][1:]:   # a stream's other plans (throughput)
            self._publish(IssuedPlan.issue(rep, self.term, self.me))
        self._adopt(issued)                      # into the node's store (and data plane)
        self._send(issued)
        return issued.plan_id

    def _send(self, issued: IssuedPlan) -> None:
        self._bus.publish(topics.plan(self.mesh_name, issued.plan_id),
                          encode_control(issued.message(time.time())), qos=1, retain=True)

    def _live(self) -> set[str]:
        """The current plans' ids and their replicas' (a stream's plans stay live)."""
        live = {pid for pid, _ in self._state.current.values()}
        live |= {p.plan_id for p in list(self._fixed.values())}   # hand-made plans served
        for pid in list(live):
            issued = self._store.known(pid)
            reps = (issued.plan.meta or {}).get("replicas") if issued is not None else None
            live |= {d.get("plan_id") for d in (reps or []) if isinstance(d, dict)}
        return live

    def _clear_superseded(self, dropped_only: bool = False) -> None:
        """Clear every retained plan of this or an older term that is not live (only
        those of requests no longer standing, with ``dropped_only``). A plan
        this term superseded stays retained RETIRE_S x K first: nodes drop a cleared
        plan, so a piece of a job already running on it (a retransmission on a link
        that just slowed) would wait for it forever."""
        live = self._live()
        now = time.monotonic()
        retained = self._store.retained()
        stale = [p for p, ip in retained.items() if ip.term <= self.term and p not in live]
        k = self._planned_mesh.time_scale if self._planned_mesh is not None else 1.0
        grace = RETIRE_S * max(1.0, k)
        self._retiring = {p: self._retiring.get(p, now) for p in stale
                          if retained[p].term == self.term}
        due = [p for p in stale if now - self._retiring.get(p, now - grace) >= grace]
        if dropped_only:
            standing = set(self._state.requests)
            due = [p for p in due if StandingRequest.from_plan(retained[p].plan) not in standing]
        left = [t for p, t in self._retiring.items() if p not in due]
        if left:                                  # look again when the next one is due
            with self._cv:
                at = min(left) + grace - self._debounce + 0.01
                if self._dirty_at is None or self._dirty_at > at:
                    self._dirty_at = at
                self._cv.notify_all()
        for pid in sorted(due):
            log.info("leader %s: clearing superseded plan %s", self.me, pid)
            self._bus.publish(topics.plan(self.mesh_name, pid), b"", qos=1, retain=True)
            self._store.drop(pid)
            self._retiring.pop(pid, None)


def default_models(agent) -> list[str]:
    """--models, else the topology's ``defaults.model``, else the default model."""
    from meshdl.node.config import DEFAULT_MODEL
    base = agent.base
    return list(agent.config.models) or [str((base.defaults.get("model") if base else None)
                                             or DEFAULT_MODEL)]


def duties_for(agent, term: int) -> LeaderDuties:
    """LeaderDuties for ``agent`` (a NodeAgent) in ``term``; standing requests: the
    configured models (else the topology's ``defaults.model``, else the default
    model) plus those recovered from the retained plans in its plan store."""
    cfg = agent.config
    models = default_models(agent)

    def why() -> dict[str, str]:
        stall = agent.liveness.params.stall_after
        return {n: f"stopped responding (no heartbeat for {stall:g} s)"
                for n in agent.liveness.stalled}
    return LeaderDuties(
        me=agent.node_id, mesh_name=agent.mesh_name, term=term, bus=agent.bus,
        live_mesh=agent.live_mesh, graphs=agent.graphs,
        defaults=[StandingRequest(m, cfg.strategy, cfg.alpha) for m in models],
        store=agent.plan_store, adopt=agent.adopt_issued, client_of=agent.job_client,
        why=why, link_threshold=cfg.link_threshold, max_requests=cfg.max_requests,
        debounce=cfg.timing.replan_debounce,
        confirm_s=0.9 * cfg.timing.telemetry_period * max(0, cfg.link_confirm_periods - 1),
        # emulated nodes compress on slow links ("auto"); real ones only when forced
        compression=cfg.compression if cfg.emulate or cfg.compression not in ("auto",)
        else "off")
