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
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from meshdl.security.bounds import sanitise
from meshdl.errors import JobError, MeshdlError, TransportError, WireError
from meshdl.node.emulation import Links
from meshdl.node.flow import ReliableSender
from meshdl.node.planstore import IssuedPlan, PlanStore
from meshdl.wire import topics
from meshdl.wire.codec import AckFrame, PieceFrame, decode_frame, encode_ack
from meshdl.wire.reassembly import Reassembler
from meshdl.wire.control import (Campaign, JobResult, JobStatus, LeaderInfo, NodeState,
                                 PlanMessage, decode_control)
# split by concern: result types in client_results, job attempts in client_jobs
# (re-exported here: ``from meshdl.client import InferResult`` etc. keep working)
from meshdl.client_jobs import NO_MESH_S, RESEND_S, STALL_S, _JobAttempts, plan_time_scale
from meshdl.client_results import (InferResult, RetryableJobError, StageTiming, _Attempt,
                                   _Retry, _stages, _tensor)

__all__ = ["MeshClient", "InferResult", "StageTiming", "RetryableJobError", "RESEND_S",
           "STALL_S", "NO_MESH_S"]

log = logging.getLogger(__name__)


class MeshClient(_JobAttempts):
    def __init__(self, broker_url: str | None = None, mesh: str = "default", *,
                 bus: Any = None, client_id: str | None = None,
                 connect_timeout: float = 5.0, bundle: str | None = None,
                 **bus_options: Any) -> None:
        self.mesh = topics.validate_id(mesh, "mesh name")
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:10]}"
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
            self.client_id = bus.me
            self._own_bus = True
        elif bus is None:
            from meshdl.security.securebus import warn_if_exposed
            from meshdl.transport.bus import private_client_id
            from meshdl.transport.paho_bus import PahoBus
            url = broker_url or "mqtt://127.0.0.1:1883"
            warn_if_exposed(url, "client")
            # MQTT client ids others cannot name (the client id is in job topics)
            bus = PahoBus(url, client_id=private_client_id(self.client_id),
                          connect_timeout=connect_timeout, **bus_options)
            try:      # a second connection for the tensor pieces, acks and results
                data_bus = PahoBus(url, client_id=private_client_id(f"{self.client_id}-d"),
                                   connect_timeout=connect_timeout, **bus_options)
            except BaseException:
                bus.close(timeout=0.5)
                raise
            self._own_bus = True
        else:
            data_bus = bus
            self._own_bus = False
        try:    # job ids name their client ({client}~{id}): it must fit a topic level
            topics.job_name(self.client_id, "0" * 20)
        except WireError as exc:
            if self._own_bus:
                for b in {id(bus): bus, id(data_bus): data_bus}.values():
                    b.close(timeout=0.5)
            raise JobError(f"client id {self.client_id!r} cannot name jobs: {exc}; use an "
                           f"id of at most {topics.MAX_ID_LEN - 21} characters without '~'"
                           ) from exc
        self.bus = bus                  # control: states, leader, plans, requests, statuses
        self.data_bus = data_bus        # data: route inbox (acks), results, input pieces
        self._lock = threading.Lock()
        self._plans = PlanStore()       # plans seen (bounded; cleared ones stay until evicted)
        self._online: dict[str, bool] = {}
        self._leader: tuple[str, int] | None = None
        self._meshes: set[str] = set()          # meshes with a leader record on this broker
        self._heard: dict[str, float] = {}      # node -> when its last heartbeat arrived
        self._time_scale = 1.0                  # K of the last plan seen (dilated mesh)
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
        # only our own jobs' statuses and results (the ACL of a secure broker allows no more)
        self.bus.subscribe(topics.job_all(m, "status", self.client_id), self._on_status, qos=1)
        ctl = f"{self.client_id}-ctl"
        self.bus.subscribe(topics.route_inbox(m, ctl), lambda t, p, r: self._probe_ctl.set(),
                           qos=1)
        self.data_bus.subscribe(topics.job_all(m, "result", self.client_id), self._on_result,
                                qos=1)
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
            issued = IssuedPlan.from_message(decode_control(payload, PlanMessage))
        except MeshdlError as exc:
            log.warning("client ignored a plan on %s: %s", sanitise(topic, 160), exc)
            return
        with self._plan_cv:
            self._plans.adopt(issued)
            self._time_scale = plan_time_scale(issued.plan)    # K of the mesh: scales waits
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
        try:
            job = topics.parse(topic).job
        except WireError:
            return
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
        try:
            job = topics.parse(topic).job
        except WireError:
            return
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
            self._sender.on_ack_frame(frame)      # the source's credit, then the pieces
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
    def job_id(self, suffix: str) -> str:
        """A job id of this client: ``{client}~{suffix}`` (job topics sit under the
        client's id, see ``meshdl.wire.topics.job_name``)."""
        return topics.job_name(self.client_id, suffix)

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
        base = self.job_id(uuid.uuid4().hex[:12])
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

    # ------------------------------------------------------------ streams
    def stream(self, frames: Any, model: str = "efficientnet_lite0", *,
               window: int | None = None, **options: Any):
        """Classify a stream of frames (tensors or image paths) with several frames in
        flight: yields one InferResult per frame, in input order, with ``.index``, and
        ``.error`` set (``output`` None) for a frame that failed. The plan is fetched
        once and reused while the mesh is stable. See ``meshdl.streaming.stream``."""
        from meshdl.streaming import stream
        return stream(self, frames, model=model, window=window, **options)

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
