"""NodeAgent: one node's control plane (membership, telemetry, election, leader duties,
plan adoption with term fencing). It implements ``NodeContext`` for the data plane.

Threads: bus handlers only queue (probes are answered at once); one control thread
folds every message in order and runs the election clock; the leader plans on its
own worker; real nodes probe links on a probe thread. Malformed or foreign frames
are dropped with a log line; no message can stop the node.
"""
from __future__ import annotations

import logging
import os
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
from meshdl.node.config import DuplicateNodeError, NodeConfig, NodeError
from meshdl.node.graphs import GraphCache
from meshdl.node.leader import LeaderDuties, duties_for
from meshdl.node.liveness import HEARTBEAT, Liveness, LivenessParams
from meshdl.node.membership import Membership, claim_verdict
from meshdl.node.probe import Probe, decode_probe, encode_probe
from meshdl.wire.topics import node_probe as probe_topic
from meshdl.node.telemetry import (Periodic, Prober, access_latency, telemetry_message,
                                   topology_links)
from meshdl.transport.bus import Will
from meshdl.wire import topics
from meshdl.wire.control import (Campaign, JobRequest, LeaderInfo, NodeState, PlanMessage,
                                 decode_control, encode_control)

log = logging.getLogger(__name__)

BusFactory = Callable[[str, "Will | None"], Any]
DEFAULT_KEEPALIVE = 10


def keepalive_s() -> int:
    """MQTT keepalive of node connections: MESHDL_KEEPALIVE (2-600 s), else 10 s. The
    broker fires a silent node's will after 1.5x this."""
    raw = os.environ.get("MESHDL_KEEPALIVE")
    if raw is None:
        return DEFAULT_KEEPALIVE
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if not 2 <= v <= 600:
        raise NodeError(f"MESHDL_KEEPALIVE={raw!r} must be a whole number of seconds in "
                        "[2, 600]; unset it for the default of 10")
    return v


class NodeAgent:
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
        self.graphs = GraphCache()
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.RLock()
        self._plans: dict[str, Plan] = {}
        self._retained_plans: dict[str, dict] = {}
        self._fence = 0
        self._overrides: dict[str, dict[str, float]] = {}
        self._elect: el.ElectionState | None = None
        self._duties: LeaderDuties | None = None
        self._leader_bus: Any = None
        self._stopped = threading.Event()
        self._closed = False
        self.exit_reason = ""
        self._owner = False
        self._nonce = uuid.uuid4().hex[:12]
        self._claims: list[Probe] = []
        self._here: list[Probe] = []
        self._retained_self: NodeState | None = None
        self._thread: threading.Thread | None = None
        self._prober: Prober | None = None
        self._probe_loop: Periodic | None = None
        self._last_view: tuple | None = None
        self._view_at = 0.0
        self._tele_at = 0.0
        self._connects = 0             # bus.connects at the last (re-)announcement
        self._reassert_at: float | None = None   # leader: re-publish its record then
        self._early_jobs: list[tuple[float, JobRequest]] = []   # asked while leaderless
        self._job_clients: dict[str, str] = {}                  # job -> client (bounded)
        self._warmed = False
        self.dataplane: Any = None

    # ------------------------------------------------------------ NodeContext
    def device(self) -> Device:
        return self._device

    def live_mesh(self) -> Mesh:
        """The online members that answer (stalled ones are left out) and their links."""
        mesh = self.membership.state.to_mesh(base=self.base, name=self.mesh_name)
        stalled = self.liveness.stalled
        if stalled and stalled & set(mesh.devices):
            mesh = mesh.subgraph([d for d in mesh.devices if d not in stalled])
        return mesh

    def plan(self, plan_id: str) -> Plan | None:
        with self._lock:
            return self._plans.get(plan_id)

    def plans(self) -> dict[str, Plan]:
        with self._lock:
            return dict(self._plans)

    def term(self) -> int:
        return self._fence

    @property
    def leader(self) -> str | None:
        s = self._elect
        return s.leader if s is not None else None

    @property
    def is_leader(self) -> bool:
        return self._elect is not None and self._elect.is_leader

    # ------------------------------------------------------------ connect / join
    def _paho(self, client_id: str, will: Will | None):
        from meshdl.transport.paho_bus import PahoBus
        c = self.config
        if c.bundle:                                  # secure mesh: meshdl.security
            from meshdl.security.securebus import SecureBus, secure_paho
            first = getattr(self, "bus", None)
            return secure_paho(c.broker, c.bundle, mesh=self.mesh_name, client_id=client_id,
                               will=will, protocol=c.protocol, keepalive=keepalive_s(),
                               reconnect_delay=(0.1, 1.0),
                               share=first if isinstance(first, SecureBus) else None)
        from meshdl.security.securebus import warn_if_exposed
        warn_if_exposed(c.broker, "node")
        return PahoBus(c.broker, client_id=client_id, username=c.username,
                       password=c.password, tls_ca=c.tls_ca, will=will, protocol=c.protocol,
                       keepalive=keepalive_s(), reconnect_delay=(0.1, 1.0))

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
            cid = f"meshdl-{self.node_id[:32]}-{self.session % 10**9}-{self._nonce[:4]}"
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
                                           cfg.timing.rank_step, cfg.timing.leader_grace))
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
            self._prober = Prober(self.bus, m, self.node_id, self.session,
                                  access_latency(self.base, self.node_id) if shaped else None)
            self._probe_loop = Periodic(cfg.timing.telemetry_period, self._probe_round,
                                        f"probe-{self.node_id}")
            self._probe_loop.start()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"control-{self.node_id}")
        self._thread.start()
        if self._want_dataplane:
            # a second connection, so a megabyte piece never delays a heartbeat, vote or plan
            self.data_bus = self._bus_factory(f"{cid[:100]}-d", None)
        from meshdl.node.model_store import attach
        attach(self)        # user models: manifests and weights over MQTT (issue 13)
        threading.Thread(target=self._start_dataplane, daemon=True, name="dataplane-start").start()
        return self

    def _check_duplicate(self) -> int:
        """Claim the id; raise DuplicateNodeError if a live process holds it.
        Returns a retained session that is not older than ours (0 if none)."""
        me = self.node_id
        self.bus.subscribe(topics.node_state(self.mesh_name, me), self._own_state, qos=1)
        self.bus.subscribe(probe_topic(self.mesh_name, me), self._on_probe, qos=1)
        self.bus.publish(probe_topic(self.mesh_name, me),
                         encode_probe(Probe("claim", me, self.session, self._nonce,
                                            time.time())), qos=1)
        time.sleep(self.config.timing.dup_window)
        with self._lock:
            here = list(self._here)
            rivals = [c for c in self._claims
                      if not claim_verdict((self.session, self._nonce), (c.session, c.nonce))]
            self._owner = not here and not rivals
        if here or rivals:
            other = (here or rivals)[0]
            self.bus.close()
            raise DuplicateNodeError(
                f"node id {me!r} is already {'online' if here else 'starting'} in mesh "
                f"{self.mesh_name!r} (session {other.session}); stop that process or pick "
                "another --id")
        own = self._retained_self
        if own is not None and own.session >= self.session:
            return own.session
        return 0

    def _own_state(self, topic: str, payload: Any, retained: bool) -> None:
        try:
            st = decode_control(payload, NodeState) if len(payload) else None
        except WireError as exc:
            log.warning("dropped a malformed state on %s: %s", sanitise(topic, 160), exc)
            return
        if st is None or st.node != self.node_id:
            return
        if not self._owner:
            self._retained_self = st
        elif not st.online and st.session == self.session and not self._closed:
            # our will fired (the broker lost us: a stall past keepalive, a restart):
            # we are alive, so say so again
            self._q.put(("reconnected", "", b"", False))
        elif st.online and st.session > self.session:
            log.error("node id %s was taken over by a newer process (session %d); leaving "
                      "without publishing", self.node_id, st.session)
            self.exit_reason = "superseded"
            self._stopped.set()

    def _on_probe(self, topic: str, payload: Any, retained: bool) -> None:
        """Runs on the dispatcher: probes are answered at once (RTT accuracy)."""
        try:
            p = decode_probe(payload)
        except WireError as exc:
            log.warning("dropped a malformed probe on %s: %s", sanitise(topic, 160), exc)
            return
        if p.kind == "claim" and not (p.session == self.session and p.nonce == self._nonce):
            with self._lock:
                owner = self._owner
                if not owner:
                    self._claims.append(p)
            if not owner and claim_verdict((self.session, self._nonce), (p.session, p.nonce)):
                # a rival that subscribed after our claim never saw it: claim again
                self._send_probe(self.node_id, Probe("claim", self.node_id, self.session,
                                                     self._nonce, time.time()))
            elif owner and not self._stopped.is_set():
                self._send_probe(self.node_id, Probe("here", self.node_id, self.session,
                                                     p.nonce, time.time()))
        elif p.kind == "here" and p.session != self.session:
            with self._lock:
                self._here.append(p)
        elif p.kind == "ping" and self._owner:
            self._send_probe(p.sender, Probe("pong", self.node_id, self.session, p.nonce,
                                             time.time(), p.pad))
        elif p.kind == "pong" and self._prober is not None:
            self._prober.on_pong(p)
        elif p.kind == "set_link":
            self._q.put(("set_link", topic, p, False))

    def _send_probe(self, node: str, p: Probe) -> None:
        try:
            self.bus.publish(probe_topic(self.mesh_name, node), encode_probe(p))
        except MeshdlError as exc:
            log.debug("probe %s to %s not sent: %s", p.kind, node, exc)

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
                self.bus.publish(topics.election(self.mesh_name), encode_control(
                    Campaign(self.node_id, self._fence, HEARTBEAT, float(self._device.flops),
                             "", time.time())), qos=0)
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

    def _maybe_warm(self) -> None:
        """The deputy (best non-leader) traces the default models ahead of time, so a
        fail-over re-plans in milliseconds instead of paying torch's import."""
        s = self._elect
        if self._warmed or s.leader is None or s.is_leader:
            return
        ranked = [n for n in el.order(s.members) if n != s.leader]
        if not ranked or ranked[0] != self.node_id:
            return
        self._warmed = True
        from meshdl.node.leader import default_models

        def warm() -> None:
            for model in default_models(self):
                try:
                    self.graphs.get(model)
                except Exception as exc:   # a bad model name shows when planning
                    log.debug("warm-up of %s failed: %s", model, exc)
        threading.Thread(target=warm, daemon=True, name="warm-graphs").start()

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

    def _reannounce(self) -> None:
        log.info("%s (re)connected: publishing the birth state again", self.node_id)
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
        live = {n: f for n, f in online.items() if n not in stalled}
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

    def _raise_fence(self, term: int) -> None:
        if term <= self._fence:
            return
        self._fence = term
        with self._lock:
            old = [p for p, plan in self._plans.items() if plan.term < term]
            for p in old:
                del self._plans[p]
        if old:
            log.info("term %d: dropped %d plan(s) of older terms", term, len(old))

    def job_request(self, job: JobRequest) -> None:
        if self._duties is not None:
            self._duties.job_request(job)

    def note_client(self, job: str, client: str) -> None:
        """Remember who asked for ``job`` (bounded, oldest dropped)."""
        with self._lock:
            self._job_clients[job] = client
            while len(self._job_clients) > 1024:
                self._job_clients.pop(next(iter(self._job_clients)))

    def job_client(self, job: str) -> str | None:
        with self._lock:
            return self._job_clients.get(job)

    def early_job(self, job: JobRequest) -> None:
        """A request that reached no leader (fail-over under way): keep it a few
        seconds; whoever of us wins the election answers it."""
        now = time.monotonic()
        self._early_jobs = [(t, j) for t, j in self._early_jobs if now - t < 5.0][-63:]
        self._early_jobs.append((now, job))

    # ------------------------------------------------------------ election effects
    def _elect_step(self, event: Any) -> None:
        s, actions = el.step(self._elect, event, time.monotonic())
        self._elect = s
        for a in actions:
            self._act(a)

    def _act(self, a: Any) -> None:
        m = self.mesh_name
        if isinstance(a, el.Claim):
            log.info("%s claims term %d", self.node_id, a.term)
            self.bus.publish(topics.election(m), encode_control(
                Campaign(self.node_id, a.term, "campaign", float(self._device.flops), "",
                         time.time())), qos=1)
        elif isinstance(a, el.BecomeLeader):
            log.info("%s is the leader of term %d", self.node_id, a.term)
            self._raise_fence(a.term)
            self._publish_leader(a.term)
            self._open_leader_bus()
            self._start_duties(a.term)
            early, self._early_jobs = self._early_jobs, []
            for t, job in early:
                if time.monotonic() - t < 5.0:
                    self._duties.job_request(job)
        elif isinstance(a, el.AssertLeader):
            self._publish_leader(a.term)
        elif isinstance(a, el.StepDown):
            log.info("%s steps down from term %d: %s", self.node_id, a.term, a.reason)
            self._stop_duties()
        elif isinstance(a, el.LeaderChanged):
            log.info("leader is now %s (term %d)", a.node or "(none)", a.term)
            if a.node is not None:
                self._raise_fence(a.term)

    def _publish_leader(self, term: int) -> None:
        self.bus.publish(topics.leader(self.mesh_name),
                         encode_control(LeaderInfo(self.node_id, term, time.time())),
                         qos=1, retain=True)

    def _open_leader_bus(self) -> None:
        """A second connection whose only job is its will: clear the leader record
        if this process dies."""
        def connect() -> None:
            try:
                lb = self._bus_factory(f"meshdl-lead-{self.node_id[:32]}-{uuid.uuid4().hex[:6]}",
                                       Will(topics.leader(self.mesh_name), b"", 1, True))
            except MeshdlError as exc:
                log.warning("leader will connection failed: %s", exc)
                return
            with self._lock:
                if self.is_leader and self._leader_bus is None and not self._closed:
                    self._leader_bus, lb = lb, None
            if lb is not None:
                lb.close()
        threading.Thread(target=connect, daemon=True, name="leader-will").start()

    def _start_duties(self, term: int) -> None:
        self._stop_duties(close_bus=False)
        with self._lock:
            retained = dict(self._retained_plans)
        self._duties = duties_for(self, term, retained)
        self._duties.start()

    def _stop_duties(self, close_bus: bool = True) -> None:
        duties, self._duties = self._duties, None
        if duties is not None:
            duties.stop()
        if close_bus:
            with self._lock:
                lb, self._leader_bus = self._leader_bus, None
            if lb is not None:
                lb.close()

    # ------------------------------------------------------------ telemetry
    def _probe_round(self) -> None:
        if self._prober is not None:
            self._prober.round(self.membership.state.online, self.config.probe_peers)

    def view(self) -> tuple:
        s = self._elect
        with self._lock:
            plans = tuple(sorted(self._plans))
        return (s.leader if s else None, s.leader_term if s else 0, plans)

    def _maybe_telemetry(self) -> None:
        now = time.monotonic()
        t = self.config.timing
        view = self.view()
        due = now - self._tele_at >= t.telemetry_period
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
        if self.dataplane is not None:
            try:
                self.dataplane.stop()
            except Exception:
                log.exception("data plane stop failed")
        was_leader = self.is_leader
        self._stop_duties()
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
