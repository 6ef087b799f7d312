"""Leader duties: keep plans current for the live mesh and answer job requests.

Runs only on the node that won the election, for one term. Planning (and the
one-off model tracing) happens on this class's worker thread, never on the bus
dispatcher. Standing requests: the mesh's default request(s) plus every distinct
(model, strategy, alpha, source, sink) a client asked for (bounded, least
recently used dropped). The leader re-plans them all when the membership changes
or a link moves beyond the threshold (``needs_replan``), publishes each plan
retained at ``plan/{plan_id}`` with its term, and clears superseded plans.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from meshdl.errors import MeshdlError, PlanError
from meshdl.mesh import Mesh, ReplanGate, mesh_changed
from meshdl.graph.plan import Plan
from meshdl.node.graphs import GraphCache
from meshdl.node.planstore import IssuedPlan, PlanStore
from meshdl.wire import topics
from meshdl.wire.control import JobRequest, JobStatus, encode_control

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StandingRequest:
    model: str
    strategy: str = "meshdl"
    alpha: float = 0.5
    source: str | None = None      # None: the topology default, else the leader
    sink: str | None = None
    input_shape: tuple[int, ...] | None = None   # None: the model's own
    objective: str | None = None   # None: alpha mix; latency, energy, throughput (streams)

    @classmethod
    def from_plan(cls, plan: "Mapping[str, Any] | Plan") -> "StandingRequest | None":
        if isinstance(plan, Plan):
            plan = {"meta": plan.meta}
        req = (plan.get("meta") or {}).get("request") if isinstance(plan, Mapping) else None
        if not isinstance(req, Mapping):
            return None
        try:
            shape = req.get("input_shape")
            return cls(str(req["model"]), str(req.get("strategy") or "meshdl"),
                       float(req.get("alpha", 0.5)), req.get("source"), req.get("sink"),
                       None if shape is None else tuple(int(v) for v in shape),
                       _objective("plan", req.get("objective")))
        except (KeyError, TypeError, ValueError, PlanError):
            return None

    @classmethod
    def from_job(cls, job: JobRequest, default: "StandingRequest") -> "StandingRequest":
        o = job.options if isinstance(job.options, Mapping) else {}

        def opt_id(key: str) -> str | None:
            v = o.get(key)
            return topics.validate_id(v, key) if v not in (None, "") else None
        alpha = o.get("alpha", default.alpha)
        if type(alpha) not in (int, float) or not 0.0 <= alpha <= 1.0:
            raise PlanError(f"job {job.job}: alpha {alpha!r} must be a number in [0, 1]")
        return cls(job.model or default.model, job.strategy or default.strategy, float(alpha),
                   opt_id("source"), opt_id("sink"), _shape(job.job, o.get("input_shape")),
                   _objective(job.job, o.get("objective")))


def _objective(job: str, v: Any) -> str | None:
    if v in (None, ""):
        return None
    if v not in ("latency", "energy", "throughput"):
        raise PlanError(f"job {job}: objective {v!r} must be latency, energy or throughput")
    return v


def _shape(job: str, v: Any) -> tuple[int, ...] | None:
    """A requested input shape: (N, C, H, W) of positive ints, bounded."""
    if v is None:
        return None
    if (not isinstance(v, (list, tuple)) or len(v) != 4
            or not all(type(d) is int and 0 < d <= 8192 for d in v)):
        raise PlanError(f"job {job}: input_shape {v!r} must be 4 positive ints (N, C, H, W)")
    return tuple(v)


# the leader's name for the pure re-plan predicate (ReplanGate adds persistence)
needs_replan = mesh_changed


class LeaderDuties:
    def __init__(self, *, me: str, mesh_name: str, term: int, bus,
                 live_mesh: Callable[[], Mesh], graphs: GraphCache,
                 defaults: list[StandingRequest], store: PlanStore,
                 adopt: Callable[[IssuedPlan], None],
                 link_threshold: float = 0.3, max_requests: int = 32,
                 debounce: float = 0.15, confirm_s: float = 0.0,
                 compression: str = "off") -> None:
        self.me, self.mesh_name, self.term, self._bus = me, mesh_name, term, bus
        self._compression = compression        # how the nodes send pieces (cost model)
        self._wires: dict[tuple, Any] = {}
        self._live_mesh, self._graphs = live_mesh, graphs
        self._defaults = list(dict.fromkeys(defaults))
        self._threshold, self._max, self._debounce = link_threshold, max_requests, debounce
        self._requests: collections.OrderedDict[StandingRequest, None] = \
            collections.OrderedDict((r, None) for r in self._defaults)
        # plans issued and seen live in the node's one plan store; adopt = the agent's
        self._store, self._adopt = store, adopt
        self._current: dict[StandingRequest, str] = {}
        self._republish = False
        self._planned_mesh: Mesh | None = None
        # link changes must persist confirm_s before a re-plan (no flapping)
        self._gate = ReplanGate(link_threshold, confirm_s)
        self._jobs: collections.deque[JobRequest] = collections.deque()
        self._cv = threading.Condition()
        self._dirty_at: float | None = time.monotonic()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"leader-{me}-t{term}")
        self.replans = 0

    def adopt_requests(self) -> None:
        """Standing requests recovered from retained plans of earlier leaders."""
        for issued in self._store.retained().values():
            req = StandingRequest.from_plan(issued.plan)
            if req is not None:
                self._remember(req)

    def _remember(self, req: StandingRequest) -> None:
        self._requests[req] = None
        self._requests.move_to_end(req)
        while len(self._requests) > self._max:
            for old in self._requests:
                if old not in self._defaults:
                    del self._requests[old]
                    self._current.pop(old, None)
                    break
            else:
                break

    # ------------------------------------------------------------ agent calls
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def mesh_changed(self) -> None:
        with self._cv:
            if self._dirty_at is None:
                self._dirty_at = time.monotonic()
            self._cv.notify_all()

    def republish(self) -> None:
        """Publish every live plan again (the broker restarted and lost them)."""
        with self._cv:
            self._republish = True
            self._cv.notify_all()

    def job_request(self, job: JobRequest) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify_all()

    def plan_seen(self, plan_id: str, term: int | None) -> None:
        """A retained plan appeared (term) or was cleared (None) on the broker."""
        if term is not None and term < self.term:      # an older leader's: clear it
            with self._cv:
                self._dirty_at = self._dirty_at or time.monotonic()
                self._cv.notify_all()

    # ------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._jobs and not self._republish and (
                        self._dirty_at is None
                        or time.monotonic() - self._dirty_at < self._debounce):
                    wait = None if self._dirty_at is None else \
                        self._debounce - (time.monotonic() - self._dirty_at)
                    self._cv.wait(wait if wait is None else max(wait, 0.005))
                if self._stopped:
                    return
                job = self._jobs.popleft() if self._jobs else None
                dirty = self._dirty_at is not None and \
                    time.monotonic() - self._dirty_at >= self._debounce
                if dirty:
                    self._dirty_at = None
                again, self._republish = self._republish, False
            try:
                if again:
                    for pid in self._live():
                        issued = self._store.issued(pid)
                        if issued is not None and issued.term == self.term:
                            self._send(issued)
                if job is not None:          # a waiting client first, then the rest
                    self._answer(job)
                if dirty:
                    self._refresh()
            except Exception:
                log.exception("leader %s (term %d): planning failed; will retry on the next "
                              "change", self.me, self.term)

    def _refresh(self, force: bool = False) -> None:
        mesh = self._live_mesh()
        if force or self._gate.check(self._planned_mesh, mesh, time.monotonic()):
            log.info("leader %s term %d: planning %d request(s) on %d device(s)", self.me,
                     self.term, len(self._requests), len(mesh.devices))
            self._planned_mesh = mesh
            self.replans += 1
            current = {}
            for req in list(self._requests):
                try:
                    current[req] = self._publish(self._plan(req, mesh))
                except MeshdlError as exc:
                    log.warning("cannot plan %s on the live mesh: %s", req, exc)
            self._current = current
        elif self._gate.pending_until is not None:     # look again once it could confirm
            with self._cv:
                if self._dirty_at is None:
                    self._dirty_at = self._gate.pending_until - self._debounce + 0.01
        self._clear_superseded()

    def _plan(self, req: StandingRequest, mesh: Mesh) -> IssuedPlan:
        import meshdl
        source = req.source or mesh.defaults.get("source") or self.me
        sink = req.sink or mesh.defaults.get("sink") or source
        notes = []
        if req.source is None and source not in mesh.devices:
            notes.append(f"default source {source} is offline; using the leader {self.me}")
            source = self.me
        if req.sink is None and sink not in mesh.devices:
            notes.append(f"default sink {sink} is offline; using {source}")
            sink = source
        for role, dev in (("source", source), ("sink", sink)):
            if dev not in mesh.devices:
                raise PlanError(f"{role} {dev} is not online in mesh {self.mesh_name}; online: "
                                f"{', '.join(sorted(mesh.devices))}")
        if not mesh.is_connected():
            comp = [c for c in _components(mesh) if source in c][0]
            mesh = mesh.subgraph(comp)
        g = self._graphs.get(req.model, req.input_shape)
        plan = meshdl.plan(g, mesh, strategy=req.strategy,
                           source=source, sink=sink, alpha=req.alpha,
                           objective=req.objective, **self._wire_option(g))
        meta: dict[str, Any] = {"request": asdict(req), "members": sorted(mesh.devices)}
        if mesh.time_scale != 1.0:      # emulated K times slower: times / K are the real ones
            meta["time_scale"] = mesh.time_scale
        return IssuedPlan.issue(plan, self.term, self.me, meta, notes)

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
        live = set(self._current.values())
        for pid in list(live):
            issued = self._store.known(pid)
            reps = (issued.plan.meta or {}).get("replicas") if issued is not None else None
            live |= {d.get("plan_id") for d in (reps or []) if isinstance(d, dict)}
        return live

    def _clear_superseded(self) -> None:
        """Clear every retained plan of this or an older term that is not live."""
        live = self._live()
        stale = [p for p, ip in self._store.retained().items()
                 if ip.term <= self.term and p not in live]
        for pid in sorted(stale):
            log.info("leader %s: clearing superseded plan %s", self.me, pid)
            self._bus.publish(topics.plan(self.mesh_name, pid), b"", qos=1, retain=True)
            self._store.drop(pid)

    def _answer(self, job: JobRequest) -> None:
        default = self._defaults[0] if self._defaults else StandingRequest("efficientnet_lite0")
        try:
            req = StandingRequest.from_job(job, default)
            self._remember(req)
            mesh = self._live_mesh()
            if self._planned_mesh is None or set(mesh.devices) != set(
                    self._planned_mesh.devices):
                # members changed (a fail-over, a device gone): answer the waiting job on
                # the live mesh first; the other standing requests are re-planned next
                pid = self._publish(self._plan(req, mesh))
                self._current[req] = pid
                with self._cv:
                    if self._dirty_at is None:
                        self._dirty_at = time.monotonic() - self._debounce
            else:
                self._refresh()
            pid = self._current.get(req)
            if pid is None:
                pid = self._publish(self._plan(req, self._planned_mesh or self._live_mesh()))
                self._current[req] = pid
            status = JobStatus(job.job, "planned", pid, self.term, time.time())
        except MeshdlError as exc:
            log.warning("job %s from %s: %s", job.job, job.client, exc)
            status = JobStatus(job.job, "failed", str(exc)[:2000], self.term, time.time())
        self._bus.publish(topics.job(self.mesh_name, job.job, "status"), encode_control(status),
                          qos=1)


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
    duties = LeaderDuties(
        me=agent.node_id, mesh_name=agent.mesh_name, term=term, bus=agent.bus,
        live_mesh=agent.live_mesh, graphs=agent.graphs,
        defaults=[StandingRequest(m, cfg.strategy, cfg.alpha) for m in models],
        store=agent.plan_store, adopt=agent.adopt_issued,
        link_threshold=cfg.link_threshold, max_requests=cfg.max_requests,
        debounce=cfg.timing.replan_debounce,
        confirm_s=0.9 * cfg.timing.telemetry_period * max(0, cfg.link_confirm_periods - 1),
        # emulated nodes compress on slow links ("auto"); real ones only when forced
        compression=cfg.compression if cfg.emulate or cfg.compression not in ("auto",)
        else "off")
    duties.adopt_requests()
    return duties


def _components(mesh: Mesh) -> list[set[str]]:
    import networkx as nx
    return [set(c) for c in nx.connected_components(mesh.graph)]
