"""MeshClient: run one inference on a meshdl mesh over MQTT.

    from meshdl.client import MeshClient
    with MeshClient("mqtt://127.0.0.1:1883", "default") as c:
        r = c.infer("dog.jpg", model="efficientnet_lite0", strategy="meshdl", timeout=60)
        r.output, r.top5, r.latency_s, r.plan, r.stages, r.attempts

A job: publish ``job/{job}/request``; the leader answers ``job/{job}/status``
(``planned`` + plan id, or ``failed``); read the retained plan; send the input as
one piece to the plan's source over ``route/{source}/{job}/{plan_id}.in`` (acked end
to end, retransmitted); collect the nodes' task timings (status ``task``) and the
sink's ``job/{job}/result``. A device going offline, a node's ``failed`` status or a
superseded plan fail the attempt; the job is retried on a fresh plan until the
deadline. Every call returns or raises JobError by its deadline.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meshdl.security.bounds import sanitise
from meshdl.errors import JobError, MeshdlError, TransportError, WireError
from meshdl.graph.plan import Plan
from meshdl.node import jobproto as jp
from meshdl.node import jobs as J
from meshdl.node.emulation import Links
from meshdl.node.flow import ReliableSender
from meshdl.wire import topics
from meshdl.wire.codec import AckFrame, PieceFrame, decode_frame, encode_ack, encode_chunks
from meshdl.wire.reassembly import Reassembler
from meshdl.wire.control import (Campaign, JobRequest, JobResult, JobStatus, LeaderInfo,
                                 NodeState, PlanMessage, decode_control, encode_control)

log = logging.getLogger(__name__)

RESEND_S = 1.0          # re-send a request not answered "planned" within this
STALL_S = 3.0           # a plan device unheard (no heartbeat) this long fails the attempt
NO_MESH_S = 2.0         # with no live member and no leader, give up after this


@dataclass
class StageTiming:
    index: int
    devices: list[str]
    ops: tuple[int, int]
    predicted_s: float | None      # cost model: stage finish after the input reached the source
    measured_s: float | None       # measured: last task end after the source held the input
                                   # (after the input was sent, if the source did not say)


@dataclass
class InferResult:
    output: Any                    # torch.Tensor
    top5: list[tuple[int, str, float]]
    latency_s: float               # input sent -> answer received
    total_s: float                 # request sent -> answer received (planning included)
    plan: Plan
    stages: list[StageTiming]
    attempts: int
    job: str
    tasks: list[dict] = field(default_factory=list)
    # source held the input -> sink held the answer (what the cost model predicts), from
    # the nodes' wall clocks (comparable on one machine or with synced clocks); None if
    # a node did not report. ``latency_s`` also counts client -> source and sink -> client.
    mesh_latency_s: float | None = None
    index: int | None = None       # MeshClient.stream: the frame's position in the input
    error: str | None = None       # MeshClient.stream: why this frame failed (output None)

    @property
    def predicted_s(self) -> float | None:
        return self.plan.latency_s


class _Attempt:
    def __init__(self, job: str) -> None:
        self.job = job
        self.events: queue.Queue = queue.Queue()
        self.tasks: dict[str, dict] = {}
        self.input_at: float | None = None      # source's report: when it held the input
        self.result: Any = None                  # the sink's JobResult
        self.sink: str | None = None             # the plan's sink, once the input is sent
        self.answer: Any = None                  # a big answer, reassembled from pieces
        self.answer_piece = ""


class MeshClient:
    def __init__(self, broker_url: str | None = None, mesh: str = "default", *,
                 bus: Any = None, client_id: str | None = None,
                 connect_timeout: float = 5.0, bundle: str | None = None,
                 **bus_options: Any) -> None:
        self.mesh = topics.validate_id(mesh, "mesh name")
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:10]}"
        self._job_prefix = ""
        if bus is None and bundle is not None:      # secure mesh (meshdl.security)
            from meshdl.security.securebus import secure_paho
            bus = secure_paho(broker_url or "mqtts://127.0.0.1:8883", bundle, mesh=self.mesh,
                              connect_timeout=connect_timeout, **bus_options)
            try:      # the data connection shares the control one's verified knowledge
                data_bus = secure_paho(broker_url or "mqtts://127.0.0.1:8883", bundle,
                                       mesh=self.mesh, connect_timeout=connect_timeout,
                                       share=bus, **bus_options)
            except BaseException:
                bus.close(timeout=0.5)
                raise
            self.client_id, self._job_prefix = bus.me, bus.me + "~"
            self._own_bus = True
        elif bus is None:
            from meshdl.security.securebus import warn_if_exposed
            from meshdl.transport.paho_bus import PahoBus
            url = broker_url or "mqtt://127.0.0.1:1883"
            warn_if_exposed(url, "client")
            bus = PahoBus(url, client_id=self.client_id, connect_timeout=connect_timeout,
                          **bus_options)
            try:      # a second connection for the tensor pieces, acks and results
                data_bus = PahoBus(url, client_id=f"{self.client_id}-d",
                                   connect_timeout=connect_timeout, **bus_options)
            except BaseException:
                bus.close(timeout=0.5)
                raise
            self._own_bus = True
        else:
            data_bus = bus
            self._own_bus = False
        self.bus = bus                  # control: states, leader, plans, requests, statuses
        self.data_bus = data_bus        # data: route inbox (acks), results, input pieces
        self._lock = threading.Lock()
        self._plans: dict[str, Plan] = {}
        self._online: dict[str, bool] = {}
        self._leader: tuple[str, int] | None = None
        self._meshes: set[str] = set()          # meshes with a leader record on this broker
        self._heard: dict[str, float] = {}      # node -> when its last heartbeat arrived
        self._attempts: dict[str, _Attempt] = {}
        self._plan_cv = threading.Condition(self._lock)
        self._links = Links(self.client_id, lambda t, p: self.data_bus.publish(t, p, qos=1))
        self._sender = ReliableSender(self.client_id,
                                      lambda tr, frames, done: self._links.send(tr.path[1],
                                                                                frames, done),
                                      rto_min_s=0.5, max_retries=8)
        self._reasm = Reassembler()
        self._probe = threading.Event()
        self._probe_ctl = threading.Event()
        try:
            self._subscribe()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ wiring
    def _subscribe(self) -> None:
        m = self.mesh
        self.bus.subscribe(topics.plan_all(m), self._on_plan, qos=1)
        self.bus.subscribe(topics.node_state_all(m), self._on_state, qos=1)
        self.bus.subscribe(topics.leader(m), self._on_leader, qos=1)
        self.bus.subscribe(topics.election(m), self._on_election, qos=0)
        self.bus.subscribe(f"{topics.PREFIX}/+/leader", self._on_any_leader, qos=0)
        self.bus.subscribe(topics.job_all(m, "status"), self._on_status, qos=1)
        ctl = f"{self.client_id}-ctl"
        self.bus.subscribe(topics.route_inbox(m, ctl), lambda t, p, r: self._probe_ctl.set(),
                           qos=1)
        self.data_bus.subscribe(topics.job_all(m, "result"), self._on_result, qos=1)
        self.data_bus.subscribe(topics.route_inbox(m, self.client_id), self._on_inbox, qos=1)
        # subscriptions are made in order: once our probes come back, all are active
        probes = [(self.bus, topics.route_topic(m, [ctl], "probe", "probe"), self._probe_ctl),
                  (self.data_bus, topics.route_topic(m, [self.client_id], "probe", "probe"),
                   self._probe)]
        deadline = time.monotonic() + 10.0
        for bus, probe, echoed in probes:
            while not echoed.is_set() and time.monotonic() < deadline:
                bus.publish(probe, b"", qos=1)
                echoed.wait(0.2)
            if not echoed.is_set():
                raise JobError("the broker did not echo the client's probe within 10 s; it "
                               "is overloaded or refuses our subscriptions (check its ACL)")

    def _on_plan(self, topic: str, payload: Any, retained: bool) -> None:
        if not payload:                  # a superseded plan was cleared
            try:
                pid = topics.parse(topic).plan_id
            except WireError:
                return
            with self._lock:
                attempts = list(self._attempts.values())
            for a in attempts:
                a.events.put(("cleared", pid))
            return
        try:
            msg = decode_control(payload, PlanMessage)
            plan = Plan.from_dict(msg.plan)
            plan.term = max(plan.term, msg.term)
            plan.plan_id = msg.plan_id
        except MeshdlError as exc:
            log.warning("client ignored a plan on %s: %s", sanitise(topic, 160), exc)
            return
        with self._plan_cv:
            self._plans[plan.plan_id] = plan
            self._plan_cv.notify_all()

    def _on_state(self, topic: str, payload: Any, retained: bool) -> None:
        if not payload:
            return
        try:
            st = decode_control(payload, NodeState)
        except MeshdlError:
            return
        with self._lock:
            self._online[st.node] = st.online
            attempts = list(self._attempts.values())
        if not st.online:
            for a in attempts:
                a.events.put(("offline", st.node))

    def _on_leader(self, topic: str, payload: Any, retained: bool) -> None:
        try:
            info = decode_control(payload, LeaderInfo) if payload else None
        except MeshdlError:
            return
        with self._lock:
            new = None if info is None else (info.node, info.term)
            changed, self._leader = new != self._leader, new
            attempts = list(self._attempts.values())
        if changed:
            for a in attempts:
                a.events.put(("leader", new))

    def _on_election(self, topic: str, payload: Any, retained: bool) -> None:
        try:
            c = decode_control(payload, Campaign)
        except MeshdlError:
            return
        with self._lock:
            if c.node in self._heard or len(self._heard) < 4096:
                self._heard[c.node] = time.monotonic()

    def _on_any_leader(self, topic: str, payload: Any, retained: bool) -> None:
        try:
            mesh = topics.parse(topic).mesh
        except WireError:
            return
        with self._lock:
            if payload:
                if len(self._meshes) < 64:
                    self._meshes.add(mesh)
            else:
                self._meshes.discard(mesh)

    def _no_mesh(self) -> str | None:
        """Why no job can run here (no member of the mesh online, no leader), or None."""
        with self._lock:
            online = [n for n, on in self._online.items() if on]
            seen = sorted(self._online)
            leader = self._leader
            others = sorted(self._meshes - {self.mesh})
        if online or leader is not None:
            return None
        saw = (f"all {len(seen)} known member(s) are offline ({', '.join(seen[:8])}"
               f"{', ...' if len(seen) > 8 else ''})" if seen else
               "no node has ever announced itself under that mesh name")
        other = (f"; this broker has live mesh(es) {', '.join(others[:8])} (pass --mesh "
                 "with one of them)" if others else "")
        return (f"no live members on mesh {self.mesh!r} at {self._where()}: {saw}{other}. "
                f"Start nodes for it (meshdl mesh up --mesh {self.mesh}, or meshdl node "
                f"start --mesh {self.mesh} --broker URL on each device) or pass the mesh "
                "name and broker the nodes use")

    def _where(self) -> str:
        url = getattr(self.bus, "url", None)
        redacted = getattr(url, "redacted", None)
        return redacted() if callable(redacted) else "the broker"

    def _attempt_for(self, job: str) -> _Attempt | None:
        with self._lock:
            return self._attempts.get(job)

    def _on_status(self, topic: str, payload: Any, retained: bool) -> None:
        job = topics.parse(topic).job
        a = self._attempt_for(job)
        if a is None:
            return
        try:
            st = decode_control(payload, JobStatus)
        except MeshdlError as exc:
            log.warning("client ignored a status of %s: %s", job, exc)
            return
        if st.state == "task":
            try:
                t = json.loads(st.detail)
                a.tasks[str(t["task"])] = t
                a.events.put(("task", str(t["task"])))
            except (ValueError, KeyError, TypeError):
                log.debug("malformed task report for %s", job)
            return
        if st.state == "input":
            a.input_at = st.ts
            return
        a.events.put((st.state, st))

    def _on_result(self, topic: str, payload: Any, retained: bool) -> None:
        job = topics.parse(topic).job
        a = self._attempt_for(job)
        if a is None:
            return
        try:
            res = decode_control(payload, JobResult)
        except MeshdlError as exc:
            a.events.put(("failed", f"undecodable result: {exc}"))
            return
        a.events.put(("result", res))

    def _on_inbox(self, topic: str, payload: Any, retained: bool) -> None:
        try:
            step = topics.next_hop(topic, self.client_id)
        except WireError:
            return
        if step.job == "probe":
            self._probe.set()
            return
        try:
            frame = decode_frame(payload)
        except WireError as exc:
            log.warning("client dropped a frame on %s: %s", sanitise(topic, 160), exc)
            return
        if isinstance(frame, AckFrame):
            for piece in frame.pieces:
                self._sender.on_ack(frame.job, piece, frame.ok, frame.chunks)
        elif isinstance(frame, PieceFrame):
            self._on_result_piece(frame)

    def _on_result_piece(self, frame: PieceFrame) -> None:
        """A chunk of a big answer from the sink: reassemble, ack it end to end."""
        a = self._attempt_for(frame.job)
        if a is None or a.sink is None:
            return                       # not ours any more: the sink gives up in time
        try:
            arr = self._reasm.add(frame)
        except WireError as exc:
            log.warning("client dropped a chunk of %s/%s: %s", frame.job, frame.piece, exc)
            return
        if arr is None and not (a.answer is not None and frame.piece == a.answer_piece):
            return
        if arr is not None:
            a.answer, a.answer_piece = arr, frame.piece
            a.events.put(("answer", frame.piece))
        try:                              # ack (again, for a retransmitted duplicate)
            topic = topics.route_topic(self.mesh, [a.sink], frame.job, frame.piece)
            self._links.send_small(a.sink, topic, encode_ack(AckFrame(
                frame.job, frame.piece, self.client_id, frame.term, frame.seq)))
        except MeshdlError as exc:
            log.debug("ack of %s/%s not sent: %s", frame.job, frame.piece, exc)

    # ------------------------------------------------------------ API
    def online(self) -> set[str]:
        with self._lock:
            return {n for n, on in self._online.items() if on}

    def offline(self) -> set[str]:
        """Members last announced offline (not merely unheard of)."""
        with self._lock:
            return {n for n, on in self._online.items() if not on}

    def infer(self, x: Any, model: str = "efficientnet_lite0", strategy: str = "meshdl",
              alpha: float = 0.5, timeout: float = 60.0, source: str | None = None,
              sink: str | None = None, max_attempts: int = 4,
              objective: str | None = None,
              model_options: dict | None = None) -> InferResult:
        """Classify ``x`` (a (1, 3, H, W) tensor or an image path) on the mesh.

        ``model`` is a zoo name, a model file (.onnx / .pt2) or a ``LoadedModel``; a file
        is offered to the mesh (content-addressed; each node fetches the weights of its
        own stages). ``model_options``: ``meshdl.models.load`` options (input_size,
        labels, mean, std, weights)."""
        import torch
        from meshdl import imaging
        import meshdl
        lm = None
        if not isinstance(model, str) or model_options or (
                model not in meshdl.models.names() and meshdl.models.is_model_file(model)):
            lm, model = self._user_models().offer(model, **(model_options or {}))
        info = meshdl.models.info(model) if lm is None else None
        if isinstance(x, (str, Path)):
            x = lm.image(x) if lm is not None else \
                imaging.load_image(x, preprocessing=imaging.preprocess_for(model))
        x = torch.as_tensor(x, dtype=torch.float32).contiguous()
        deadline = time.monotonic() + timeout
        base = self._job_prefix + uuid.uuid4().hex[:12]
        errors: list[str] = []
        attempt = 0
        while attempt < max_attempts:
            attempt += 1
            job = f"{base}-{attempt}"
            try:
                res = self._run(job, x, model, strategy, alpha, source, sink, deadline,
                                objective=objective)
                res.attempts = attempt
                if lm is not None:
                    res.top5 = lm.topk(res.output, 5)
                    return res
                labels = imaging.imagenet_labels() if info.num_classes == 1000 else None
                res.top5 = imaging.topk(res.output, 5, labels=labels)
                return res
            except (_Retry, TransportError) as exc:
                errors.append(f"attempt {attempt} (job {job}): {exc}")
                log.info("job %s: %s; retrying", job, exc)
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(0.2 * attempt, max(0.0, deadline - time.monotonic())))
        raise JobError(f"inference of {model} on mesh {self.mesh!r} did not complete within "
                       f"{timeout:g} s after {attempt} attempt(s): " + "; ".join(errors[-3:]))

    def _user_models(self):
        """The models this client offers (created on first use; issue 13)."""
        with self._lock:
            if getattr(self, "_models", None) is None:
                from meshdl.node.model_store import ClientModels
                self._models = ClientModels(self.data_bus, self.mesh, self.client_id)
            return self._models

    # ------------------------------------------------------------ one attempt
    def _run(self, job: str, x: Any, model: str, strategy: str, alpha: float,
             source: str | None, sink: str | None, deadline: float,
             objective: str | None = None) -> InferResult:
        a = _Attempt(job)
        with self._lock:
            self._attempts[job] = a
        try:
            return self._run_attempt(a, x, model, strategy, alpha, source, sink, deadline,
                                     objective)
        finally:
            with self._lock:
                self._attempts.pop(job, None)
            self._sender.cancel_job(job)
            self._reasm.expire()

    def _silent(self, plan: Plan, since: float) -> tuple[str, float] | None:
        """A device of ``plan`` unheard for STALL_S (counting from ``since``)."""
        now = time.monotonic()
        with self._lock:
            for d in plan.devices():
                at = max(self._heard.get(d, since), since)
                if now - at > STALL_S:
                    return d, now - at
        return None

    def _run_attempt(self, a: _Attempt, x: Any, model: str, strategy: str, alpha: float,
                     source: str | None, sink: str | None, deadline: float,
                     objective: str | None = None) -> InferResult:
        opts: dict[str, Any] = {"alpha": float(alpha), "input_shape": list(x.shape)}
        if objective:
            opts["objective"] = objective
        if source:
            opts["source"] = source
        if sink:
            opts["sink"] = sink
        t_req = time.time()
        pid = self._request(a, model, strategy, opts, deadline)
        plan = self._get_plan(pid, deadline)
        return self._run_plan(a, x, plan, deadline, t_req)

    def _run_plan(self, a: _Attempt, x: Any, plan: Plan, deadline: float,
                  t_req: float) -> InferResult:
        """Send ``x`` as job ``a.job`` on a known ``plan`` and wait for its answer."""
        pid, model = plan.plan_id, plan.model
        gone = [d for d in plan.devices() if self._online.get(d) is False]
        if gone:
            raise _Retry(f"plan {pid} uses offline device(s) {', '.join(gone)}")
        if tuple(x.shape) != tuple(plan.input_shape):
            raise JobError(f"the input has shape {tuple(x.shape)} but plan {pid} of {model} "
                           f"takes {tuple(plan.input_shape)}; resize the input")
        arr = x.detach().numpy()
        piece = J.input_piece(pid)
        topic = topics.route_topic(self.mesh, [plan.source], a.job, piece)
        frames = [(topic, f) for f in encode_chunks(a.job, piece, arr,
                                                     src_task=J.CLIENT_PREFIX + self.client_id,
                                                     term=plan.term)]
        t_send = time.time()
        self._sender.send(a.job, piece, plan.source, [self.client_id, plan.source], frames,
                          0.05, lambda msg: a.events.put(("failed", msg)))
        st = jp.Attempt(a.job, time.monotonic(), deadline, jp.Params(RESEND_S, NO_MESH_S),
                        phase=jp.PLANNED, plan_id=pid)
        st, effects = jp.step(st, jp.InputSent(tuple(plan.devices()),
                                               sum(len(s.tasks) for s in plan.stages)))
        a.sink = plan.sink
        self._drive(a, st, effects, plan=plan)
        val = a.result
        piece = (val.result or {}).get("piece") if isinstance(val.result, dict) else None
        if piece:
            self._await_answer(a, piece, deadline)
        t_done = time.time()
        output = _tensor(val.result, a.answer)
        want = sum(len(s.tasks) for s in plan.stages)
        grace = time.monotonic() + 0.5          # task reports may trail the answer
        while (len(a.tasks) < want or a.input_at is None) and time.monotonic() < grace:
            time.sleep(0.01)
        held = (val.timings or {}).get("held")
        mesh_s = None
        if a.input_at is not None and isinstance(held, (int, float)) and held >= a.input_at:
            mesh_s = float(held) - a.input_at
        t0 = a.input_at if a.input_at is not None else t_send
        return InferResult(output, [], t_done - t_send, t_done - t_req, plan,
                           _stages(plan, a.tasks, t0), 1, a.job, list(a.tasks.values()),
                           mesh_latency_s=mesh_s)

    def _request(self, a: _Attempt, model: str, strategy: str, opts: dict,
                 deadline: float) -> str:
        """Publish the request until the leader answers (``jobproto``: re-sent every
        RESEND_S without a "planned" and at once when the leader changes). Returns the
        plan id; raises JobError if the job cannot run, _Retry for a fresh attempt."""
        topic = topics.job(self.mesh, a.job, "request")

        def send() -> None:
            req = JobRequest(a.job, self.client_id, model, strategy,
                             deadline_s=max(0.0, deadline - time.monotonic()), options=opts)
            self.bus.publish(topic, encode_control(req), qos=1)
        with self._lock:
            leader = self._leader[0] if self._leader else None
        st, effects = jp.start(a.job, time.monotonic(), deadline, leader,
                               jp.Params(RESEND_S, NO_MESH_S))
        _, pid = self._drive(a, st, effects, send)
        return pid

    def _drive(self, a: _Attempt, st: "jp.Attempt", effects: list, send=None,
               plan: Plan | None = None) -> tuple["jp.Attempt", str]:
        """Run the attempt's state machine on what the client sees until it asks to
        send the input (returns its plan id) or finishes (done: returns "")."""
        t_wait = time.monotonic()
        while True:
            for eff in effects:
                if isinstance(eff, jp.SendRequest) and send is not None:
                    send()
                elif isinstance(eff, jp.StartInput):
                    return st, eff.plan_id
                elif isinstance(eff, jp.Finish):
                    if eff.phase == jp.DONE:
                        return st, ""
                    if eff.phase == jp.FAILED:
                        raise JobError(eff.reason)
                    raise _Retry(eff.reason)
            now = time.monotonic()
            try:
                kind, val = a.events.get(timeout=max(0.0, min(0.25, st.deadline - now)))
                ev = self._event(a, st, kind, val)
            except queue.Empty:
                ev = None
            now = time.monotonic()
            evs = [] if ev is None else [ev]
            if st.phase == jp.REQUESTING and now - st.started >= NO_MESH_S:
                why = self._no_mesh()
                if why is not None:
                    evs.append(jp.NoMesh(why))
            if st.phase == jp.RUNNING and plan is not None:
                silent = self._silent(plan, t_wait)
                if silent is not None:
                    evs.append(jp.Silent(*silent))
            evs.append(jp.Tick(now))
            effects = []
            for ev in evs:
                st, more = jp.step(st, ev)
                effects += more

    def _await_answer(self, a: _Attempt, piece: str, deadline: float) -> None:
        """The result said the answer travels as ``piece``: wait for it."""
        while a.answer is None or a.answer_piece != piece:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Retry(f"job {a.job}: the sink announced its answer as piece {piece} "
                             "but it did not arrive before the deadline")
            try:
                kind, val = a.events.get(timeout=min(left, 0.25))
            except queue.Empty:
                continue
            if kind == "failed":
                raise _Retry(val.detail if isinstance(val, JobStatus) else str(val))

    def _event(self, a: _Attempt, st: "jp.Attempt", kind: str, val: Any):
        """What the client saw, as a job protocol event (None: nothing for it)."""
        if kind == "planned":
            return jp.JobPlanned(val.detail, val.term)
        if kind == "failed":
            if isinstance(val, JobStatus):
                return jp.JobFailed(val.detail, by_leader=st.phase == jp.REQUESTING)
            return jp.JobFailed(str(val))
        if kind == "leader":
            return jp.LeaderSeen(val[0], val[1]) if val else jp.LeaderSeen(None)
        if kind == "offline":
            return jp.Offline(val)
        if kind == "cleared":
            return jp.PlanCleared(val)
        if kind == "task":
            return jp.TaskReport(val)
        if kind == "result":
            a.result = val
            return jp.Result(bool(val.ok), val.error or "")
        return None

    # ------------------------------------------------------------ streams
    def stream(self, frames: Any, model: str = "efficientnet_lite0", *,
               window: int | None = None, **options: Any):
        """Classify a stream of frames (tensors or image paths) with several frames in
        flight: yields one InferResult per frame, in input order, with ``.index``, and
        ``.error`` set (``output`` None) for a frame that failed. The plan is fetched
        once and reused while the mesh is stable. See ``meshdl.streaming.stream``."""
        from meshdl.streaming import stream
        return stream(self, frames, model=model, window=window, **options)

    def request_plan(self, model: str, strategy: str = "meshdl", alpha: float = 1.0,
                     input_shape: tuple[int, ...] | None = None, timeout: float = 30.0,
                     source: str | None = None, sink: str | None = None,
                     objective: str | None = None) -> Plan:
        """Ask the leader for the current plan of a request (no input is sent)."""
        opts: dict[str, Any] = {"alpha": float(alpha)}
        if input_shape is not None:
            opts["input_shape"] = [int(v) for v in input_shape]
        for key, val in (("source", source), ("sink", sink), ("objective", objective)):
            if val:
                opts[key] = val
        deadline = time.monotonic() + timeout
        a = _Attempt(f"plan-{uuid.uuid4().hex[:12]}")
        with self._lock:
            self._attempts[a.job] = a
        try:
            return self._get_plan(self._request(a, model, strategy, opts, deadline), deadline)
        finally:
            with self._lock:
                self._attempts.pop(a.job, None)

    def plans_known(self, plan_ids: list[str], timeout: float) -> list[Plan]:
        """The retained plans of these ids that arrive within ``timeout`` (in order)."""
        end = time.monotonic() + timeout
        with self._plan_cv:
            while not all(p in self._plans for p in plan_ids) and time.monotonic() < end:
                self._plan_cv.wait(max(0.0, min(0.2, end - time.monotonic())))
            return [self._plans[p] for p in plan_ids if p in self._plans]

    def run_on_plan(self, job: str, x: Any, plan: Plan, deadline: float) -> InferResult:
        """One attempt of job ``job`` on a known plan (no request to the leader).
        Raises RetryableJobError when a fresh plan may fix the failure."""
        a = _Attempt(job)
        with self._lock:
            self._attempts[job] = a
        try:
            return self._run_plan(a, x, plan, deadline, time.time())
        finally:
            with self._lock:
                self._attempts.pop(job, None)
            self._sender.cancel_job(job)
            self._reasm.expire()

    def _get_plan(self, pid: str, deadline: float) -> Plan:
        with self._plan_cv:
            while pid not in self._plans:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Retry(f"plan {pid} was announced but never arrived")
                self._plan_cv.wait(min(left, 0.5))
            return self._plans[pid]

    def close(self) -> None:
        """Stop; never raises."""
        own = self._own_bus
        models = getattr(self, "_models", None)
        for stop in (models.stop if models is not None else None,
                     self._sender.stop, self._links.stop,
                     (lambda: self.data_bus.close(timeout=1.0)) if own else None,
                     (lambda: self.bus.close(timeout=1.0)) if own else None):
            if stop is None:
                continue
            try:
                stop()
            except Exception:
                log.exception("error while closing the client (ignored)")

    def __enter__(self) -> "MeshClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Retry(MeshdlError):
    """An attempt failed in a way a fresh plan may fix."""


RetryableJobError = _Retry


def _tensor(result: dict, answer: Any = None) -> Any:
    import torch
    try:
        dtype = np.dtype(str(result["dtype"]))
        shape = tuple(int(v) for v in result["shape"])
        data = (np.asarray(answer).reshape(shape) if result.get("piece") else
                np.frombuffer(result["data"], dtype=dtype.newbyteorder("<")).reshape(shape))
    except (KeyError, TypeError, ValueError) as exc:
        raise JobError(f"the sink sent a malformed answer: {exc}") from exc
    return torch.from_numpy(data.astype(dtype, copy=True))


def _stages(plan: Plan, tasks: dict[str, dict], t0: float) -> list[StageTiming]:
    score = (plan.meta or {}).get("score") or {}
    predicted = list(score.get("stage_finish_s") or [])
    out = []
    for s in plan.stages:
        ends = [tasks[t.id]["end"] for t in s.tasks if t.id in tasks]
        measured = max(ends) - t0 if len(ends) == len(s.tasks) else None
        out.append(StageTiming(s.index, [t.device for t in s.tasks], (s.start, s.end),
                               predicted[s.index] if s.index < len(predicted) else None,
                               measured))
    return out
