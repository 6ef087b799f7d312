"""The data plane of a node: routed tensor pieces, acks, task execution, emulation.

The agent builds ``DataPlane(ctx)`` and calls ``start/stop/on_plan/on_members``
(``meshdl/node/context.py``). Per job, a node plays any of these roles of the job's
plan (``ctx.plan(plan_id)``, the plan id is the first part of every piece id, see
``meshdl.node.jobs``):

- source: takes the client's input piece and sends every stage-0 task its input region;
- worker: gathers a task's input from its producers' pieces (halo exchange directly
  between devices), computes it on the compute worker, sends each consumer exactly
  the overlap it needs (``plan.producers``), or its tile to the sink;
- sink: stitches the last stage's tiles and publishes ``JobResult`` on job/{job}/result;
- relay: forwards pieces and acks addressed past it (``meshdl.node.relay``).

Every node reports each task's start/end on job/{job}/status (state ``task``) and a
failure (a piece that cannot be delivered, a device gone) as state ``failed``.
Frames whose term is older than ``ctx.term()`` are dropped (fencing). Nothing here
runs on paho's network thread; bus handlers only decode, ack and enqueue.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from meshdl.security.bounds import sanitise
from meshdl.security.limits import MAX_WAITING_BYTES, relay_refusal
from meshdl.errors import MeshdlError, PlanError, WireError
from meshdl.graph.plan import Plan, Task
from meshdl.node import jobs as J
from meshdl.node.emulation import Links
from meshdl.node.graphs import GraphCache
from meshdl.node.executor import Worker, tensor_to_wire, warm, wire_to_tensor
from meshdl.node.credit import Acker, CreditLedger
from meshdl.node.flow import ReceiveLog, ReliableSender, Transfer
from meshdl.node.pathtime import path_time
from meshdl.node.relay import Relay
from meshdl.node.phases import PhaseRunner, parse_partial
from meshdl.wire import topics
from meshdl.wire.codec import AckFrame, PieceFrame, decode_frame, encode_ack, encode_frames
from meshdl.wire.compress import CodecPolicy
from meshdl.wire.control import JobStatus, encode_control
from meshdl.wire.reassembly import Reassembler
# split by concern: the source, worker and sink roles live in dataplane_roles
from meshdl.node.dataplane_roles import _DataPlaneRoles

log = logging.getLogger(__name__)

PIECE_QOS = 1
INLINE_RESULT = 1 << 20     # larger answers go to the client as a piece, not inline
LOOPBACK_BPS = 2e9          # what a hop costs when not emulated (rto estimate only)
HELD_BYTES = 256 << 20      # acked pieces a node holds before they are used (its credit)
INITIAL_GRANT = 16 << 20    # what a sender may have in flight before a receiver's first grant


class DataPlane(_DataPlaneRoles):
    def __init__(self, ctx: Any, *, graphs: GraphCache | None = None,
                 rto_min_s: float = 1.0, max_retries: int = 6, job_ttl_s: float = 120.0,
                 chunk_bytes: int = 1 << 20, set_threads: bool = True,
                 held_bytes: int = HELD_BYTES, initial_grant: int = INITIAL_GRANT) -> None:
        self.ctx = ctx
        # tensor pieces, acks and results travel on the data connection (when the agent
        # has one), so their bytes never delay control traffic; statuses stay on control
        self.data_bus = getattr(ctx, "data_bus", None) or ctx.bus
        self.node_id: str = ctx.node_id
        self.mesh_name: str = ctx.mesh_name
        self.emulate = bool(ctx.emulate)
        self.graphs = graphs if graphs is not None else GraphCache()
        self.chunk_bytes = chunk_bytes
        self.codecs = CodecPolicy(getattr(getattr(ctx, "config", None), "compression", "auto"))
        self._set_threads = set_threads
        cfg = getattr(ctx, "config", None)
        self._shaped = bool(getattr(cfg, "shaped_links", False))   # the kernel shapes links
        self.links = Links(self.node_id, self._publish,
                           self._link_figures if self.emulate else None,
                           access=self._access_figures,
                           shaped=self._shaped)
        self.sender = ReliableSender(self.node_id, self._transmit, rto_min_s=rto_min_s,
                                     max_retries=max_retries, initial_grant=initial_grant,
                                     expect=self._expected_now)
        self.rlog = ReceiveLog()
        # receive side of the credit window: held bytes, grants on every ack
        self.credit = CreditLedger(int(getattr(cfg, "held_bytes", 0) or held_bytes),
                                   min_grant=chunk_bytes)
        self.acker = Acker(self.node_id, self.links.send_small, credit=self.credit.grant)
        self.reasm = Reassembler()
        self.relay = Relay(self.node_id, self.links, store_and_forward=self.emulate)
        self.jobs = J.JobTable(ttl_s=job_ttl_s)
        self.compute = Worker(f"compute-{self.node_id}")
        self.io = Worker(f"io-{self.node_id}")
        self.phased = PhaseRunner(      # tasks of stages with reduce points (issue 9)
            self.node_id, lambda job, plan, piece, dev, t, src, dst: self.send_piece(
                job, plan, piece, dev, tensor_to_wire(t), src, dst),
            self.compute.submit, self._finish_task, self._fail)
        self._nacked: dict[tuple[str, str], float] = {}
        self._waiting: dict[str, list[tuple[float, tuple, np.ndarray]]] = {}
        self._warmed: set[str] = set()
        self._mesh = None
        self._mesh_at = 0.0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._house = threading.Thread(target=self._housekeeping, daemon=True,
                                       name=f"dataplane-{self.node_id}")
        self.stats = {"pieces_in": 0, "dropped": 0, "fenced": 0, "tasks": 0, "result_pieces": 0}
        self.slow_handler_s = 0.0      # tests: make this node a slow consumer
        self.inline_result_max = INLINE_RESULT

    def _client_of(self, job: str) -> str | None:
        """The client that asked for ``job`` (the agent notes every request it sees)."""
        f = getattr(self.ctx, "job_client", None)
        return f(job) if callable(f) else None

    def _bump(self, counter: str) -> None:
        """Counters are bumped from the dispatcher and the worker threads: locked."""
        with self._lock:
            self.stats[counter] += 1

    # ================================================================ hooks
    def start(self) -> None:
        if self.emulate and self._set_threads:
            torch.set_num_threads(1)      # emulated nodes share a few real cores
        self.data_bus.subscribe(topics.route_inbox(self.mesh_name, self.node_id),
                               self._on_message, qos=PIECE_QOS)
        self._house.start()
        known = getattr(self.ctx, "plans", None)      # plans adopted before we started
        for plan in (known() if callable(known) else {}).values():
            self.on_plan(plan)
        log.info("data plane of %s started (emulate=%s)", self.node_id, self.emulate)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.data_bus.unsubscribe(topics.route_inbox(self.mesh_name, self.node_id))
        except MeshdlError as exc:
            log.debug("unsubscribe at stop: %s", exc)
        self.sender.stop()
        self.acker.stop()
        self.links.stop()
        self.compute.stop()
        self.io.stop()

    def on_plan(self, plan: Plan) -> None:
        with self._lock:
            waiting = self._waiting.pop(plan.plan_id, [])
            fresh = plan.plan_id not in self._warmed     # re-adopted plans (the leader
            self._warmed.add(plan.plan_id)                # re-sends per job) warm once:
            if len(self._warmed) > 1024:                  # bounded: plans still in the store
                self._warmed = {p for p in self._warmed if self.ctx.plan(p) is not None}
        if fresh and self.node_id in plan.devices():      # warm-up work delays the job
            mine = [t for t in plan.tasks() if t.device == self.node_id]
            self.compute.submit(lambda: self._warm(plan, mine))
        for _, meta, arr in waiting:
            self._consume(plan, *meta, arr)

    def on_members(self, online: set[str], why: dict[str, str] | None = None) -> None:
        """The live members changed: fail every job whose plan uses one that left,
        naming it and why (``why[device]``, default: went offline)."""
        self._mesh = None
        why = why or {}
        for d in {d for st in self.jobs.active() for d in st.plan.devices()} - set(online):
            # pieces to it, sent or waiting for its credit, fail by name (never dropped)
            self.sender.fail_peer(d, f"device {d} {why.get(d, 'went offline')}; retry on a "
                                     "new plan")
        for st in self.jobs.active():
            gone = [d for d in st.plan.devices() if d not in online]
            if gone and not st.finished:
                d = gone[0]
                self._fail(st.job, st.plan, f"device {d} {why.get(d, 'went offline')} during "
                                            f"job {st.job} (plan {st.plan.plan_id}); retry on "
                                            "a new plan")

    # ================================================================ sending
    def _publish(self, topic: str, payload: bytes) -> None:
        self.data_bus.publish(topic, payload, qos=PIECE_QOS)

    def _transmit(self, tr: Transfer, frames: list, on_sent) -> None:
        if not frames:
            on_sent()
            return
        self.links.send(tr.path[1], frames, on_sent)

    def _link_figures(self, a: str, b: str) -> tuple[float, float] | None:
        link = self._live_mesh().find_link(a, b)
        return None if link is None else (link.bandwidth_bps, link.latency_s)

    def _access_figures(self, dev: str):
        """(up_bps, down_bps, latency_s) of ``dev``'s access link on a star mesh (None:
        the broker's own device); False when the mesh is no star."""
        star = self._live_mesh().star
        if star is None:
            return False
        acc = star.link_of(dev)
        return None if acc is None else (acc.up_bps, acc.down_bps, acc.latency_s)

    def _live_mesh(self):
        now = time.monotonic()
        if self._mesh is None or now - self._mesh_at > 5.0:
            self._mesh, self._mesh_at = self.ctx.live_mesh(), now
        return self._mesh

    def _expected_s(self, path: list[str], nbytes: int) -> float:
        """Time the route should take after the retransmission timer starts: the hops
        after the first (an emulated first hop is paced before it); on a star also the
        receiver's downlink, and the sender's uplink when the kernel shapes it."""
        if self._live_mesh().star is not None:
            return path_time(self._live_mesh(), path, nbytes, first_up=self._shaped)
        total = 0.0
        for a, b in zip(path[1:], path[2:]):
            bps, lat = self._hop(a, b)
            total += lat + nbytes * 8.0 / bps
        return total + nbytes * 8.0 / LOOPBACK_BPS

    def _expected_now(self, tr: Transfer, nbytes: int, fresh: bool) -> float:
        """``nbytes`` along a piece's path on the live mesh (``fresh``: of now)."""
        if fresh:
            self._mesh, self._mesh_at = self.ctx.live_mesh(), time.monotonic()
        return path_time(self._live_mesh(), tr.path, nbytes)

    def _hop(self, a: str, b: str) -> tuple[float, float]:
        fig = self._link_figures(a, b) if self.emulate else None
        return fig if fig is not None else (LOOPBACK_BPS, 0.0)

    def send_piece(self, job: str, plan: Plan, piece: str, dst_dev: str, arr: np.ndarray,
                   src: str, dst: str) -> None:
        """Deliver ``arr`` as piece ``piece`` to ``dst_dev`` along the plan's route."""
        if dst_dev == self.node_id:
            self._consume(plan, job, piece, src, dst, plan.term, arr)
            return
        path = plan.route(self.node_id, dst_dev)
        if len(path) < 2 or path[0] != self.node_id or path[-1] != dst_dev:
            self._fail(job, plan, f"plan {plan.plan_id} routes {self.node_id}>{dst_dev} as "
                                  f"{path}, which does not join them")
            return
        topic = topics.route_topic(self.mesh_name, path[1:], job, piece)
        # compressed end to end when the path's slowest hop is slower than the codec
        codec = self.codecs.choose(src, arr.nbytes, min(self._hop(a, b)[0]
                                                        for a, b in zip(path, path[1:])))
        out = encode_frames(job, piece, arr, src_task=src, dst_task=dst, term=plan.term,
                            chunk_bytes=self.chunk_bytes, codec=codec)
        self.codecs.record(src, codec, out)
        frames = [(topic, f) for f in out]
        nbytes = arr.nbytes
        self.sender.send(job, piece, dst_dev, path, frames, self._expected_s(path, nbytes),
                         lambda msg: self._fail(job, plan, msg))

    # ================================================================ receiving
    def _on_message(self, topic: str, payload: Any, retained: bool) -> None:
        """Bus dispatcher thread: relay, or decode + ack + enqueue. Never computes."""
        if retained:
            return
        if self.slow_handler_s:
            time.sleep(self.slow_handler_s)
        try:
            step = topics.next_hop(topic, self.node_id)
        except WireError as exc:
            self._bump("dropped")
            log.warning("%s dropped a message on %r: %s", self.node_id, topic[:120], exc)
            return
        if not step.consume:
            why = relay_refusal(topics.parse_route(topic)[1], set(self._live_mesh().devices),
                                {s.job for s in self.jobs.active()}, step.job)
            if why is not None:                  # bounded relaying (meshdl.security)
                self._bump("dropped")
                log.warning("%s refused to relay %s/%s: %s", self.node_id,
                            sanitise(step.job), sanitise(step.piece), why)
                return
            self.relay.forward(step, payload)
            return
        try:
            frame = decode_frame(payload)
            if frame.job != step.job or frame.piece != step.piece:
                raise WireError(f"frame names {frame.job}/{frame.piece} but came on the topic "
                                f"of {step.job}/{step.piece}")
        except WireError as exc:
            self._bump("dropped")
            log.warning("%s dropped a frame on %s: %s", self.node_id, topic[:120], exc)
            return
        if frame.term < self.ctx.term():
            self._fenced(frame)
            return
        if isinstance(frame, AckFrame):
            self.sender.on_ack_frame(frame)      # its credit, then its pieces
        elif isinstance(frame, PieceFrame):      # a star mesh: through this node's downlink
            self.links.downlink(len(payload), frame.chunk == 0, lambda: self._on_piece(frame))

    def _fenced(self, frame) -> None:
        self._bump("fenced")
        log.info("%s dropped %s/%s of term %d (current term %d)", self.node_id, frame.job,
                 frame.piece, frame.term, self.ctx.term())
        st = self.jobs.peek(frame.job)
        if st is not None and not st.reported_stale:
            st.reported_stale = True
            self._fail(frame.job, st.plan, f"job {frame.job} runs plan {st.plan.plan_id} of "
                                           f"term {frame.term}, superseded by term "
                                           f"{self.ctx.term()}; retry on the new plan")

    def _on_piece(self, frame: PieceFrame) -> None:
        key = (frame.job, frame.piece)
        if self.rlog.seen(key):
            if self.rlog.should_reack(key):
                self.acker.reack(*key)
            return
        if frame.nchunks > 1:
            self._maybe_nack(frame)
        try:
            arr = self.reasm.add(frame)
        except WireError as exc:
            self._bump("dropped")
            log.warning("%s dropped a chunk of %s/%s: %s", self.node_id, *key, exc)
            return
        if arr is None:
            return
        self._bump("pieces_in")
        meta = (frame.job, frame.piece, frame.src_task, frame.dst_task, frame.term)
        plan = self._plan(J.plan_of_piece(frame.piece))
        if plan is None:
            with self._lock:        # bounded: pieces for plans not (yet) adopted
                held = sum(a.nbytes for w in self._waiting.values() for _, _, a in w)
                if held + arr.nbytes > MAX_WAITING_BYTES:
                    self._bump("dropped")
                    log.warning("%s dropped %s/%s for unknown plan %s: already holding %d "
                                "bytes for plans not adopted", self.node_id,
                                sanitise(frame.job), sanitise(frame.piece),
                                sanitise(J.plan_of_piece(frame.piece)), held)
                    return
                self._waiting.setdefault(J.plan_of_piece(frame.piece), []).append(
                    (time.monotonic(), meta, np.array(arr)))
            log.info("%s holds %s/%s until plan %s is adopted", self.node_id, *key,
                     J.plan_of_piece(frame.piece))
            return
        self._consume(plan, *meta, arr)

    def _maybe_nack(self, frame: PieceFrame) -> None:
        """A chunk we already hold of a piece still missing others: the sender is
        resending blindly; tell it which chunks we have (a selective ack)."""
        key = (frame.job, frame.piece)
        missing = self.reasm.missing(*key)
        if not missing or frame.chunk in missing:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._nacked.get(key, 0.0) < 0.05:
                return
            self._nacked[key] = now
            if len(self._nacked) > 4096:
                self._nacked.pop(next(iter(self._nacked)))
        plan = self._plan(J.plan_of_piece(frame.piece))
        if plan is None:
            return
        try:
            hop, topic = self._ack_route(plan, frame.job, frame.piece, frame.src_task)
        except MeshdlError:
            return
        have = sorted(set(range(frame.nchunks)) - set(missing))[:1000]
        self.links.send_small(hop, topic, encode_ack(AckFrame(
            frame.job, frame.piece, self.node_id, frame.term, frame.seq, False, tuple(have))))

    def _ack_route(self, plan: Plan, job: str, piece: str, src: str) -> tuple[str, str]:
        sender = J.sender_device(plan, src)
        if sender == self.node_id:
            raise PlanError("local piece")
        path = [sender, self.node_id] if src.startswith(J.CLIENT_PREFIX) else \
            plan.route(sender, self.node_id)
        back = topics.return_route(path)
        return back[0], topics.route_topic(self.mesh_name, back, job, piece)

    def _plan(self, plan_id: str) -> Plan | None:
        """An adopted plan, read from the node's one plan store (``ctx.plan``)."""
        return self.ctx.plan(plan_id)

    def _ack(self, plan: Plan, job: str, piece: str, src: str, term: int) -> None:
        if J.sender_device(plan, src) == self.node_id:
            return
        hop, topic = self._ack_route(plan, job, piece, src)
        self.rlog.mark((job, piece))
        self.acker.ack(hop, topic, job, piece, term, peer=J.sender_device(plan, src))

    def _hold(self, job: str, what: str, arr: np.ndarray) -> None:
        """An acked piece stays until it is used: it counts against our credit."""
        self.credit.hold(job, what, arr.nbytes)

    def _released(self, job: str, *what: str) -> None:
        """Pieces were used (``what``; none: every piece of ``job``): senders we
        granted little hear of the room (``meshdl.node.credit``)."""
        if what:
            for w in what:
                self.credit.release(job, w)
        else:
            self.credit.release_job(job)
        self._refresh_credit()

    def _refresh_credit(self) -> None:
        for peer in self.credit.stale():
            self.acker.refresh(peer)

    def _consume(self, plan: Plan, job: str, piece: str, src: str, dst: str, term: int,
                 arr: np.ndarray) -> None:
        """A whole piece for this node: ack it, then act on it by role."""
        try:
            if term != plan.term:
                # plan ids are content hashes: a later term may re-issue the same id
                fresh = self.ctx.plan(plan.plan_id)
                if fresh is not None and fresh.term == term:
                    plan = fresh
                else:
                    raise PlanError(f"piece term {term} differs from plan term {plan.term}")
            self._ack(plan, job, piece, src, term)
            st = self.jobs.get(job, plan)
            if st is None:
                log.debug("%s: late piece %s/%s for an ended job", self.node_id, job, piece)
                return
            if dst == "" and src.startswith(J.CLIENT_PREFIX):
                if plan.source != self.node_id:
                    raise PlanError(f"input of job {job} sent to {self.node_id}, but the plan's "
                                    f"source is {plan.source}")
                held = time.time()           # the source holds the input: t = 0 of the model
                self._hold(job, "@input", arr)
                self.io.submit(lambda: self._dispatch_input(st, arr, held))
            elif dst == "":
                if plan.sink != self.node_id:
                    raise PlanError(f"output {piece} sent to {self.node_id}, not the sink")
                self._hold(job, "@out<" + src, arr)
                self._on_output(st, src, arr)
            elif parse_partial(piece) is not None:      # a reduce point's partials
                self.phased.on_partial(st, src, dst, parse_partial(piece), wire_to_tensor(arr))
            else:
                task = plan.task(dst)
                self._hold(job, f"{dst}<{src}", arr)
                self._on_task_input(st, task, src, arr)
        except (MeshdlError, KeyError, ValueError) as exc:
            self._bump("dropped")
            # the job cannot finish without this piece: say so now (the client retries
            # on a fresh plan) rather than let it wait out its deadline
            self._fail(job, plan, f"{self.node_id} could not use piece {piece} of job {job}: "
                                  f"{exc}")

    # ================================================================ failures, upkeep
    def _status(self, job: str, state: str, detail: str, term: int,
                ts: float | None = None) -> None:
        msg = JobStatus(job, state, detail=detail[:4000], term=term,
                        ts=time.time() if ts is None else ts)
        try:
            self.ctx.bus.publish(topics.job(self.mesh_name, job, "status"),
                                 encode_control(msg), qos=1)
        except MeshdlError as exc:
            log.warning("could not publish the %s status of %s: %s", state, job, exc)

    def _fail(self, job: str, plan: Plan, msg: str) -> None:
        st = self.jobs.peek(job)
        if st is not None:
            if st.failed:
                return
            st.failed = msg
        elif self.jobs.ended(job):
            return
        log.warning("job %s failed on %s: %s", job, self.node_id, msg)
        self.phased.forget(job)
        self.jobs.end(job)
        self.sender.cancel_job(job)
        self._released(job)
        self._status(job, "failed", msg, plan.term)

    def _warm(self, plan: Plan, mine: list[Task]) -> None:
        try:
            g = self.graphs.for_plan(plan)
            warm(g, plan, mine)
        except MeshdlError as exc:
            log.warning("%s cannot run plan %s: %s", self.node_id, plan.plan_id, exc)

    def _housekeeping(self) -> None:
        while not self._stop.wait(1.0):
            for st in self.jobs.expire():
                if not st.finished and not st.failed:
                    log.warning("job %s expired on %s after %.0f s without progress", st.job,
                                self.node_id, self.jobs.ttl_s)
                self.sender.cancel_job(st.job)
                self.credit.release_job(st.job)
                self.phased.forget(st.job)      # partials of an expired job go too
            self.reasm.expire()
            self._refresh_credit()      # a lost credit update costs a second at most
            now = time.monotonic()
            with self._lock:
                pids = list(self._waiting)
            for pid in pids:
                plan = self._plan(pid)
                with self._lock:      # adopted: consume; else keep pieces up to 30 s
                    items = self._waiting.pop(pid, [])
                    keep = [w for w in items if now - w[0] < 30.0] if plan is None else []
                    if keep:
                        self._waiting[pid] = keep
                for _, meta, arr in items if plan is not None else []:
                    self._consume(plan, *meta, arr)
