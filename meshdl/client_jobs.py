"""MeshClient's job attempts (split from ``meshdl.client``): request a plan from the
leader, send the input to the plan's source, drive the job protocol state machine
(``meshdl.node.jobproto``) on what the client sees, and collect the answer.
``_JobAttempts`` is a mixin of ``MeshClient``; it uses the client's bus, locks, plan
store and attempt table."""
from __future__ import annotations

import queue
import time
import uuid
from typing import Any

from meshdl.errors import JobError
from meshdl.graph.plan import Plan
from meshdl.node import jobproto as jp
from meshdl.node import jobs as J
from meshdl.wire import topics
from meshdl.wire.codec import encode_frames
from meshdl.wire.control import JobRequest, JobStatus, encode_control
from meshdl.client_results import InferResult, _Attempt, _Retry, _stages, _tensor

RESEND_S = 1.0          # re-send a request not answered "planned" within this
STALL_S = 3.0           # a plan device unheard (no heartbeat) this long fails the attempt
NO_MESH_S = 2.0         # with no live member and no leader, give up after this
MAX_TIME_SCALE = 1e4    # NodeConfig's bound on --time-scale


def plan_time_scale(plan: Plan | None) -> float:
    """The time scale K a plan was made for (``meta["time_scale"]``, recorded by the
    leader of a dilated mesh); 1 when absent or unusable."""
    k = (getattr(plan, "meta", None) or {}).get("time_scale") if plan is not None else None
    if type(k) not in (int, float) or not 1.0 <= k <= MAX_TIME_SCALE:
        return 1.0
    return float(k)


def input_s(plan: Plan) -> float:
    """Expected seconds for the input to reach the plan's source (``meta["input_s"]``,
    from the leader's view of its downlink; 50 ms when not given): the resend timer."""
    v = (getattr(plan, "meta", None) or {}).get("input_s")
    return float(v) if type(v) in (int, float) and 0.0 <= v <= 3600.0 else 0.05


def scaled_timeouts(time_scale: float) -> tuple[float, float, float]:
    """(request re-send, device silence, no mesh) in seconds on a mesh dilated K times:
    its heartbeats, answers and statuses cross links K times slower, so each wait is K
    times longer; an undilated mesh (K <= 1) keeps the defaults."""
    k = max(1.0, float(time_scale)) if time_scale == time_scale else 1.0
    return RESEND_S * k, STALL_S * k, NO_MESH_S * k


class _JobAttempts:
    """Job attempts of a ``MeshClient`` (mixin)."""

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
        """A device of ``plan`` unheard for STALL_S x the plan's time scale (counting
        from ``since``)."""
        stall = scaled_timeouts(plan_time_scale(plan))[1]
        now = time.monotonic()
        with self._lock:
            for d in plan.devices():
                at = max(self._heard.get(d, since), since)
                if now - at > stall:
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
        t_req = a.marks["request"] = time.time()
        pid = self._request(a, model, strategy, opts, deadline)
        a.marks["planned"] = time.time()
        plan = self._get_plan(pid, deadline)
        a.marks["plan"] = time.time()
        return self._run_plan(a, x, plan, deadline, t_req)

    def _run_plan(self, a: _Attempt, x: Any, plan: Plan, deadline: float,
                  t_req: float) -> InferResult:
        """Send ``x`` as job ``a.job`` on a known ``plan`` and wait for its answer."""
        pid, model = plan.plan_id, plan.model
        a.marks.setdefault("request", t_req)
        gone = [d for d in plan.devices() if self._online.get(d) is False]
        if gone:
            raise _Retry(f"plan {pid} uses offline device(s) {', '.join(gone)}")
        if tuple(x.shape) != tuple(plan.input_shape):
            raise JobError(f"the input has shape {tuple(x.shape)} but plan {pid} of {model} "
                           f"takes {tuple(plan.input_shape)}; resize the input")
        arr = x.detach().numpy()
        piece = J.input_piece(pid)
        topic = topics.route_topic(self.mesh, [plan.source], a.job, piece)
        # unjoined frames (views of the input): each publish joins one, on a secure
        # mesh straight into its sealed buffer (the input must not change meanwhile)
        frames = [(topic, f) for f in encode_frames(a.job, piece, arr,
                                                     src_task=J.CLIENT_PREFIX + self.client_id,
                                                     term=plan.term)]
        t_send = a.marks["send"] = time.time()
        self._sender.send(a.job, piece, plan.source, [self.client_id, plan.source], frames,
                          input_s(plan), lambda msg: a.events.put(("failed", msg)))
        resend, _, no_mesh = scaled_timeouts(plan_time_scale(plan))
        st = jp.Attempt(a.job, time.monotonic(), deadline, jp.Params(resend, no_mesh),
                        phase=jp.PLANNED, plan_id=pid)
        st, effects = jp.step(st, jp.InputSent(tuple(plan.devices()),
                                               sum(len(s.tasks) for s in plan.stages)))
        a.sink = plan.sink
        self._drive(a, st, effects, plan=plan)
        val = a.result
        a.marks["result"] = time.time()
        piece = (val.result or {}).get("piece") if isinstance(val.result, dict) else None
        if piece:
            self._await_answer(a, piece, deadline)
        t_done = a.marks["done"] = time.time()
        output = _tensor(val.result, a.answer)
        want = sum(len(s.tasks) for s in plan.stages)
        grace = time.monotonic() + 0.5          # task reports may trail the answer
        while (len(a.tasks) < want or a.input_at is None) and time.monotonic() < grace:
            time.sleep(0.01)
        held = (val.timings or {}).get("held")
        mesh_s = None
        if a.input_at is not None and isinstance(held, (int, float)) and held >= a.input_at:
            mesh_s = float(held) - a.input_at
        if a.input_at is not None:
            a.marks["input_at"] = a.input_at
        if isinstance(held, (int, float)):
            a.marks["held"] = float(held)
        t0 = a.input_at if a.input_at is not None else t_send
        return InferResult(output, [], t_done - t_send, t_done - t_req, plan,
                           _stages(plan, a.tasks, t0), 1, a.job, list(a.tasks.values()),
                           mesh_latency_s=mesh_s, marks=dict(a.marks))

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
            a.marks["requests"] = a.marks.get("requests", 0.0) + 1
            a.marks["last_request"] = time.time()
        with self._lock:
            leader = self._leader[0] if self._leader else None
            # before the plan is known: the time scale of the mesh's last plan seen
            resend, _, no_mesh = scaled_timeouts(getattr(self, "_time_scale", 1.0))
        st, effects = jp.start(a.job, time.monotonic(), deadline, leader,
                               jp.Params(resend, no_mesh))
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
            if st.phase == jp.REQUESTING and now - st.started >= st.params.no_mesh_s:
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
        if kind in ("planned", "failed") and isinstance(val, JobStatus):
            if kind == "planned":
                a.marks.setdefault("answered", float(val.ts))    # the leader's clock
            return jp.from_status(val, requesting=st.phase == jp.REQUESTING)
        if kind == "failed":
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
        a = _Attempt(self.job_id(f"plan-{uuid.uuid4().hex[:10]}"))
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
            found = [self._plans.get(p) for p in plan_ids]
            return [p for p in found if p is not None]

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
            while (plan := self._plans.get(pid)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Retry(f"plan {pid} was announced but never arrived")
                self._plan_cv.wait(min(left, 0.5))
            return plan
