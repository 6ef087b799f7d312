"""NodeAgent: one node's control plane (membership, telemetry, election, leader duties,
plan adoption with term fencing). It implements ``NodeContext`` for the data plane.

Threads: bus handlers only queue (probes are answered at once); one control thread
folds every message in order and runs the election clock; the leader plans on its
own worker; real nodes probe links on a probe thread. Malformed or foreign frames
are dropped with a log line; no message can stop the node.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable

from meshdl import __version__
from meshdl.security.bounds import sanitise
from meshdl.errors import MeshdlError, WireError
from meshdl.graph.plan import Plan
from meshdl.mesh import Device, Mesh
from meshdl.node import election as el
from meshdl.node.config import DuplicateNodeError, NodeConfig, NodeError  # noqa: F401
from meshdl.node.graphs import GraphCache
from meshdl.node.leader import LeaderDuties
from meshdl.node.liveness import HEARTBEAT, Liveness, LivenessParams
from meshdl.mesh.state import NodeHeard
from meshdl.node.membership import Membership
from meshdl.node.planstore import IssuedPlan, PlanStore
from meshdl.node.probe import Probe
from meshdl.node.telemetry import (Periodic, Prober, access_latency, telemetry_message,
                                   topology_links)
from meshdl.transport.bus import Will, private_client_id
from meshdl.wire import topics
from meshdl.wire.control import (Campaign, JobRequest, NodeState, PlanMessage,
                                 decode_control, encode_control)
# split by concern (re-exported): connection, id claim and probes in agent_join;
# election effects and leader duties in agent_leader
from meshdl.node.agent_join import DEFAULT_KEEPALIVE, _AgentJoin, keepalive_s
from meshdl.node.agent_leader import _AgentLeader

__all__ = ["NodeAgent", "BusFactory", "DEFAULT_KEEPALIVE", "keepalive_s"]

log = logging.getLogger(__name__)
STOP_WAIT_S = 5.0      # stop() waits this long for a plan or trace in flight
RECONCILE_S = 2.0      # after a reconnect, plans not shown again by then were cleared

BusFactory = Callable[[str, "Will | None"], Any]


class NodeAgent(_AgentJoin, _AgentLeader):
    """``start()`` joins the mesh (raises DuplicateNodeError / TransportError);
    ``stop()`` leaves cleanly; ``wait()`` blocks until stopped or superseded."""

    def __init__(self, config: NodeConfig, *, device: Device | None = None,
                 base: Mesh | None = None, bus_factory: BusFactory | None = None,
                 dataplane: bool = True) -> None:
        self.config = cfg = config
        self.node_id, self.mesh_name, self.emulate = cfg.node_id, cfg.mesh, cfg.emulate
        if device is None:
            from meshdl.node.device import resolve
            device, base = resolve(cfg)
        self._device, self.base = device, base
        self._bus_factory = bus_factory or self._paho
        self._want_dataplane = dataplane
        self.bus: Any = None            # control connection: carries the will
        self.data_bus: Any = None       # data connection: tensor pieces, acks, results
        self.session = 0
        self.membership = Membership()
        self.liveness = Liveness(LivenessParams(cfg.timing.heartbeat, cfg.timing.stall_after))
        self._beat_at = 0.0
        self.graphs = GraphCache(max_graphs=cfg.max_graphs)
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.RLock()
        self.plan_store = PlanStore()   # the node's one plan store (issued and received)
        self._overrides: dict[str, dict[str, float]] = {}
        self._elect: el.ElectionState | None = None
        self._duties: LeaderDuties | None = None
        self._leader_bus: Any = None
        self._stopped = threading.Event()
        self._closed = False
        self.exit_reason = ""
        self._owner = False
        self._nonce = uuid.uuid4().hex[:12]
        self._election_seq = itertools.count(1)        # numbers this node's election messages
        self._claims: list[Probe] = []
        self._here: list[Probe] = []
        self._retained_self: NodeState | None = None
        self._thread: threading.Thread | None = None
        self._prober: Prober | None = None
        self._probe_loop: Periodic | None = None
        self._last_view: tuple | None = None
        self._view_at = 0.0
        self._tele_at = 0.0
        self._tele_soon = threading.Event()     # a measured link stepped: publish now
        self._connects = 0             # bus.connects at the last (re-)announcement
        self._reassert_at: float | None = None   # leader: re-publish its record then
        # after a reconnect: plans held here that the broker has not shown again yet
        self._unseen_plans: set[str] = set()
        self._reconcile_at: float | None = None
        self._early_jobs: list[tuple[float, JobRequest]] = []   # asked while leaderless
        self._job_clients: dict[str, str] = {}                  # job -> client (bounded)
        self._warmed = False
        self._helpers: list[threading.Thread] = []
        self.dataplane: Any = None

    # ------------------------------------------------------------ NodeContext
    def device(self) -> Device:
        return self._device

    def live_mesh(self) -> Mesh:
        """The online members that answer (stalled ones are left out) and their links."""
        mesh = self.membership.state.to_mesh(base=self.base, name=self.mesh_name)
        with self._lock:
            stalled = self.liveness.excluded(mesh.devices, self.node_id)
        if stalled and stalled & set(mesh.devices):
            mesh = mesh.subgraph([d for d in mesh.devices if d not in stalled])
        return mesh

    def plan(self, plan_id: str) -> Plan | None:
        return self.plan_store.get(plan_id)

    def plans(self) -> dict[str, Plan]:
        return self.plan_store.plans()

    def term(self) -> int:
        return self.plan_store.term

    @property
    def leader(self) -> str | None:
        s = self._elect
        return s.leader if s is not None else None

    @property
    def is_leader(self) -> bool:
        return self._elect is not None and self._elect.is_leader

    # ------------------------------------------------------------ connect / join
    def _state(self, online: bool) -> NodeState:
        d = self._device
        return NodeState(self.node_id, online, self.session, d.profile, float(d.flops),
                         int(d.memory_bytes), d.power.to_dict(), __version__, time.time(),
                         {"emulate": self.emulate})

    def start(self) -> "NodeAgent":
        from meshdl.node.config import next_session
        cfg = self.config
        seen = 0
        for _ in range(2):
            self.session = next_session(cfg.state_dir, self.node_id, self.mesh_name, seen)
            will = Will(topics.node_state(self.mesh_name, self.node_id),
                        encode_control(self._state(False)), qos=1, retain=True)
            cid = private_client_id(f"meshdl-{self.node_id[:32]}-{self.session % 10**9}")
            self.bus = self._bus_factory(cid, will)
            seen = self._check_duplicate()
            if not seen:
                break
            log.warning("retained session %d of %s is not older than ours (clock skew?); "
                        "reconnecting with a newer one", seen, self.node_id)
            self.bus.close()
        else:
            raise NodeError(f"cannot pick a session counter newer than {seen}")
        self._elect = el.initial(self.node_id, self._device.flops, time.monotonic(),
                                 el.Params(cfg.timing.settle, cfg.timing.claim_window,
                                           cfg.timing.rank_step, cfg.timing.leader_grace,
                                           # a secure mesh: leadership needs signed votes
                                           # from a majority of the live devices
                                           quorum=cfg.bundle is not None,
                                           vote_window=max(1.0, 4 * cfg.timing.claim_window)))
        m = self.mesh_name
        for pattern, tag in ((topics.node_state_all(m), "state"),
                             (topics.node_telemetry_all(m), "telemetry"),
                             (topics.leader(m), "leader"),
                             (topics.plan_all(m), "plan"), (topics.job_all(m, "request"), "job")):
            self.bus.subscribe(pattern, self._enqueue(tag), qos=1)
        self.bus.subscribe(topics.election(m), self._on_election_msg, qos=1)
        self.bus.publish(topics.node_state(m, self.node_id), encode_control(self._state(True)),
                         qos=1, retain=True)
        self._connects = getattr(self.bus, "connects", 0)
        if hasattr(self.bus, "on_reconnect"):
            self.bus.on_reconnect(lambda: self._q.put(("reconnected", "", b"", False)))
        log.info("node %s joined mesh %s (session %d, %.2f GFLOP/s, %s)", self.node_id, m,
                 self.session, self._device.flops / 1e9,
                 "emulated" if self.emulate else "measured")
        shaped = cfg.shaped_links          # mesh up --netns: measure the shaped access link
        if not self.emulate or shaped:
            from meshdl.node.linkestimate import interface_bytes
            self._prober = Prober(self.bus, m, self.node_id, self.session,
                                  access_latency(self.base, self.node_id) if shaped else None,
                                  threshold=cfg.link_threshold,
                                  traffic=interface_bytes if shaped else None,
                                  on_step=self._tele_soon.set)
            # a probe round a period; a sample beyond an estimate is confirmed sooner
            self._probe_loop = Periodic(
                lambda: self._prober.next_wait(cfg.timing.telemetry_period),
                self._probe_round, f"probe-{self.node_id}")
            self._probe_loop.start()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"control-{self.node_id}")
        self._thread.start()
        if self._want_dataplane:
            # a second connection, so a megabyte piece never delays a heartbeat, vote or plan
            self.data_bus = self._bus_factory(f"{cid[:100]}-d", None)
        from meshdl.node.model_store import attach
        attach(self)        # user models: manifests and weights over MQTT (issue 13)
        self._spawn(self._start_dataplane, "dataplane-start")
        return self

    def _spawn(self, target: Any, name: str) -> None:
        """A one-off worker thread (warm-up, start-up) that ``stop`` waits for."""
        t = threading.Thread(target=target, daemon=True, name=name)
        self._helpers = [h for h in self._helpers if h.is_alive()] + [t]
        t.start()

    def _enqueue(self, tag: str):
        def handler(topic: str, payload: Any, retained: bool) -> None:
            self._q.put((tag, topic, payload, retained))
        return handler

    def _on_election_msg(self, topic: str, payload: Any, retained: bool) -> None:
        """Heartbeats are noted on arrival (a busy control queue must not make a
        member look silent); everything else goes to the control thread."""
        try:
            c = decode_control(payload, Campaign)
        except WireError:
            c = None
        if c is not None and c.kind == HEARTBEAT:
            self.heard(c.node)
            return
        self._q.put(("election", topic, payload, retained))

    def _start_dataplane(self) -> None:
        if not self._want_dataplane:
            return
        try:
            from meshdl.node.dataplane import DataPlane
        except ModuleNotFoundError as exc:
            if exc.name != "meshdl.node.dataplane":
                raise
            log.info("no data plane installed (meshdl.node.dataplane); control plane only")
            return
        self.dataplane = DataPlane(self, graphs=self.graphs)
        self.dataplane.start()
        log.info("data plane started")

    # ------------------------------------------------------------ control thread
    def _loop(self) -> None:
        tick = self.config.timing.tick
        while not self._stopped.is_set():
            try:
                item = self._q.get(timeout=tick)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._handle(*item)
                self._check_liveness()
                self._elect_step(el.Tick())
                self._check_connection()
                self._maybe_warm()
                self._maybe_telemetry()
            except Exception:
                log.exception("control loop error (message dropped); node keeps running")

    def _check_liveness(self) -> None:
        """Heartbeat (from this thread: a wedged control loop goes silent too) and
        drop members unheard for ``stall_after`` from plans and elections."""
        now = time.monotonic()
        if now - self._beat_at >= self.liveness.params.period and self.bus.connected:
            self._beat_at = now
            try:
                self.bus.publish(topics.election(self.mesh_name),
                                 self._election(self.plan_store.term, HEARTBEAT), qos=0)
            except MeshdlError as exc:
                log.debug("heartbeat not sent: %s", exc)
        with self._lock:
            stalled, changed = self.liveness.tick(now, self.membership.state.online,
                                                  self.node_id)
        if changed:
            if stalled:
                log.warning("stalled (no heartbeat for %.1f s): %s; out of plans until heard "
                            "again", self.liveness.params.stall_after, ", ".join(sorted(stalled)))
            else:
                log.info("every member answers again")
            self.members_changed()

    def heard(self, node: str) -> None:
        with self._lock:
            self.liveness.heard(node, time.monotonic())
        m = self.membership.state.members.get(node)
        if m is not None and m.online and not m.heard:
            self.membership.apply(NodeHeard(node))      # no longer an eviction candidate

    def _check_connection(self) -> None:
        """After a reconnect (the broker restarted and lost its retained records, or
        dropped us after a stall and fired our will) announce ourselves again: the
        birth, telemetry, and, if we lead, the leader record and our plans."""
        connects = getattr(self.bus, "connects", 0)
        if connects != self._connects and self.bus.connected:
            self._connects = connects
            self._reannounce()
        if self._reassert_at is not None and time.monotonic() >= self._reassert_at:
            self._reassert_at = None
            if self.is_leader:
                # no newer leader showed up in the retained records: we still lead
                self._publish_leader(self._elect.leader_term)
                if self._duties is not None:
                    self._duties.republish()
        if self._reconcile_at is not None and time.monotonic() >= self._reconcile_at:
            self._reconcile_at = None
            with self._lock:
                gone, self._unseen_plans = self._unseen_plans, set()
            for pid in sorted(gone) if not self.is_leader else ():
                # cleared while we were away (an empty retained record is not re-sent)
                log.info("plan %s is no longer on the broker: dropped", pid)
                self.adopt_plan(pid, None)

    def plan_seen(self, plan_id: str) -> None:
        """A plan record arrived (retained or live): it is still current."""
        with self._lock:
            self._unseen_plans.discard(plan_id)

    def _reannounce(self) -> None:
        log.info("%s (re)connected: publishing the birth state again", self.node_id)
        with self._lock:     # the broker shows its retained plans again; the rest are gone
            self._unseen_plans = set(self.plan_store.plans())
        self._reconcile_at = time.monotonic() + RECONCILE_S * max(1.0, self.config.time_scale)
        try:
            self.bus.publish(topics.node_state(self.mesh_name, self.node_id),
                             encode_control(self._state(True)), qos=1, retain=True)
        except MeshdlError as exc:
            log.warning("could not re-announce %s: %s", self.node_id, exc)
        if self.is_leader:
            # wait for the retained records first: a newer leader may have taken over
            # while we were gone, and our record must not overwrite its record
            self._reassert_at = time.monotonic() + 0.5
        self._tele_at = 0.0

    def _handle(self, tag: str, topic: str, payload: Any, retained: bool) -> None:
        from meshdl.node import handlers
        if tag == "reconnected":
            self._reannounce()
            return
        try:
            getattr(handlers, f"on_{tag}")(self, topic, payload, retained)
        except (WireError, MeshdlError) as exc:
            log.warning("dropped a %s message on %s: %s", tag, sanitise(topic, 160), exc)

    # called by handlers ---------------------------------------------------------
    def members_changed(self) -> None:
        online = self.membership.online_flops()
        with self._lock:
            self.liveness.forget(online)
            stalled = self.liveness.stalled
            out = self.liveness.excluded_from_election(online, self.node_id, time.monotonic())
        live = {n: f for n, f in online.items() if n not in out}
        self._elect_step(el.Members(live))
        if self._duties is not None:
            self._duties.mesh_changed()
        if self.dataplane is not None:
            why = {n: (f"stopped responding (no heartbeat for "
                       f"{self.liveness.params.stall_after:g} s)") for n in stalled}
            try:
                self.dataplane.on_members(set(live), why)
            except Exception:
                log.exception("data plane on_members failed")

    def links_changed(self) -> None:
        if self._duties is not None:
            self._duties.mesh_changed()

    def adopt_plan(self, plan_id: str, msg: PlanMessage | None) -> None:
        from meshdl.node.handlers import adopt_plan
        adopt_plan(self, plan_id, msg)

    def adopt_issued(self, issued: IssuedPlan) -> None:
        """Adopt a plan (received, or issued by our own leader duties) and hand it to
        the data plane when it is new here."""
        if self.plan_store.adopt(issued) and self.dataplane is not None:
            try:
                self.dataplane.on_plan(issued.plan)
            except Exception:
                log.exception("data plane on_plan failed for %s", issued.plan_id)

    def note_client(self, job: str, client: str) -> None:
        """Remember who asked for ``job`` (bounded, oldest dropped)."""
        with self._lock:
            self._job_clients[job] = client
            while len(self._job_clients) > 1024:
                self._job_clients.pop(next(iter(self._job_clients)))

    def job_client(self, job: str) -> str | None:
        """The client of ``job``: the one its request named, else the one its id names."""
        with self._lock:
            client = self._job_clients.get(job)
        if client is None:
            try:
                client = topics.job_owner(job)
            except WireError:
                return None
        return client

    # ------------------------------------------------------------ telemetry
    def _probe_round(self) -> None:
        if self._prober is not None:
            self._prober.round(self.membership.state.online, self.config.probe_peers)

    def view(self) -> tuple:
        s = self._elect
        plans = tuple(sorted(self.plan_store.plans()))
        return (s.leader if s else None, s.leader_term if s else 0, plans)

    def _maybe_telemetry(self) -> None:
        now = time.monotonic()
        t = self.config.timing
        view = self.view()
        due = now - self._tele_at >= t.telemetry_period
        if self._tele_soon.is_set():
            self._tele_soon.clear()
            due = True
        if not due and not (view != self._last_view and now - self._view_at >= t.view_min_gap):
            return
        self._last_view, self._view_at, self._tele_at = view, now, now
        links = (topology_links(self.base, self.node_id, self._overrides)
                 if self.emulate and not self.config.shaped_links
                 else (self._prober.results() if self._prober else {}))
        msg = telemetry_message(self.node_id, self.session, links, view, self._elect.role)
        try:
            self.bus.publish(topics.node_telemetry(self.mesh_name, self.node_id),
                             encode_control(msg), qos=0, retain=True)
        except MeshdlError as exc:
            log.debug("telemetry not sent: %s", exc)
        # our own figures count at once (its echo is ignored): a leader on a link that
        # just slowed hears its own telemetry through that link, seconds late
        from meshdl.node.membership import telemetry_event
        before = self.membership.state.links
        self.membership.apply(telemetry_event(msg))
        if self.membership.state.links != before:
            self.links_changed()

    # ------------------------------------------------------------ leave
    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def stop(self) -> None:
        """Leave cleanly: stop the data plane, hand leadership back, publish offline,
        disconnect."""
        if self._closed:
            return
        self._closed = True
        superseded = self.exit_reason == "superseded"
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._probe_loop is not None:
            self._probe_loop.stop()
            self._prober.stop()
        if self.dataplane is not None:
            try:
                self.dataplane.stop()
            except Exception:
                log.exception("data plane stop failed")
        was_leader = self.is_leader
        deadline = time.monotonic() + STOP_WAIT_S
        self._stop_duties(wait=STOP_WAIT_S)
        self._join_helpers(deadline)
        if self.bus is None:
            return
        final = None
        if not superseded:
            try:
                m = self.mesh_name
                self.bus.publish(topics.node_telemetry(m, self.node_id), b"", qos=1,
                                 retain=True)
                if was_leader:
                    self.bus.publish(topics.leader(m), b"", qos=1, retain=True)
            except MeshdlError as exc:
                log.warning("could not clear retained records: %s", exc)
            final = Will(topics.node_state(self.mesh_name, self.node_id),
                         encode_control(self._state(False)), 1, True)
        self.bus.close(final=final)
        if self.data_bus is not None:
            self.data_bus.close(timeout=1.0)
        log.info("node %s left mesh %s", self.node_id, self.mesh_name)

    def _join_helpers(self, deadline: float) -> None:
        """Wait (until ``deadline``) for work in flight in torch (a warm-up trace, a
        plan): a process must not exit inside torch's C++ (it aborts, exit code 134)."""
        models = getattr(self.graphs, "models", None)
        if models is not None and hasattr(models, "stop"):
            models.stop()
        for t in self._helpers:
            if t.is_alive() and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
