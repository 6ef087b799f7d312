"""The data plane's job roles (split from ``meshdl.node.dataplane``): source
(split the client's input into stage-0 regions), worker (gather a task's input
pieces, compute it on the compute worker, send each consumer its overlap) and sink
(stitch the last stage's tiles, publish ``JobResult`` inline or as a piece to the
client). ``_DataPlaneRoles`` is a mixin of ``DataPlane``: it uses the data plane's
job table, workers, sender and ``send_piece``/``_status``/``_fail``."""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from meshdl.errors import MeshdlError, PlanError
from meshdl.graph.plan import Plan, Region, Task
from meshdl.graph.regions import crop
from meshdl.graph.runner import assemble, stitch
from meshdl.node import jobs as J
from meshdl.node.emulation import pace
from meshdl.node.executor import compute_task, tensor_to_wire, wire_to_tensor
from meshdl.wire import topics
from meshdl.wire.codec import encode_frames
from meshdl.wire.control import JobResult, encode_control


class _DataPlaneRoles:
    """Source, worker and sink roles of a ``DataPlane`` (mixin)."""

    def _dispatch_input(self, st: J.JobState, x: np.ndarray, held: float) -> None:
        plan = st.plan
        try:
            g = self.graphs.for_plan(plan)
            shape = g.tensor_shape(0)
            if tuple(x.shape) != tuple(shape):
                raise PlanError(f"input of shape {tuple(x.shape)}; plan needs {shape}")
            xt = torch.from_numpy(x) if x.flags.writeable else wire_to_tensor(x)
            for t in plan.stages[0].tasks:
                part = assemble(shape, t.in_region, [(None, xt)])
                self.send_piece(st.job, plan, J.source_piece(plan.plan_id, t.id), t.device,
                                tensor_to_wire(part), "", t.id)
        except MeshdlError as exc:
            self._fail(st.job, plan, f"source {self.node_id} could not split the input: {exc}")
            self._released(st.job, "@input")
        else:       # when the source held the input (wall clock; see MeshClient)
            self._released(st.job, "@input")
            self._status(st.job, "input", "", plan.term, ts=held)
        self._maybe_done(st)

    def _needs(self, plan: Plan, task: Task) -> list[tuple[str, Region | None]]:
        """(src key, region the piece holds) of every piece the task waits for."""
        if task.stage == 0:
            return [("", task.in_region)]
        out = []
        for p, piece in plan.producers(task):
            out.append((p.id, piece))
        return out

    def _on_task_input(self, st: J.JobState, task: Task, src: str, arr: np.ndarray) -> None:
        if task.device != self.node_id:
            raise PlanError(f"task {task.id} runs on {task.device}, not {self.node_id}")
        needs = self._needs(st.plan, task)
        with self.jobs.lock:
            got = st.inputs.setdefault(task.id, {})
            got[src] = arr
            if task.id in st.started or any(k not in got for k, _ in needs):
                return
            st.started.add(task.id)
            pieces = [(region, got.pop(k)) for k, region in needs]
        self.compute.submit(lambda: self._run_task(st, task, pieces))

    def _run_task(self, st: J.JobState, task: Task, pieces: list) -> None:
        try:
            self._run_task_inner(st, task, pieces)
        finally:        # its input pieces are used: their bytes are credit again
            self._released(st.job, *(f"{task.id}<{k}" for k, _ in self._needs(st.plan, task)))

    def _run_task_inner(self, st: J.JobState, task: Task, pieces: list) -> None:
        plan = st.plan
        if st.failed:
            return
        try:
            g = self.graphs.for_plan(plan)
            tensors = [(None if len(a.shape) != 4 else r, wire_to_tensor(a)) for r, a in pieces]
            if plan.stages[task.stage].phases > 1:     # reduce points: phased (issue 9)
                stage = plan.stages[task.stage]
                self.phased.start(st, g, task, assemble(g.tensor_shape(stage.start),
                                                        task.in_region, tensors))
                return
            wall0, t0 = time.time(), time.monotonic()
            y = compute_task(g, plan, task, tensors)
            compute_s = time.monotonic() - t0
            paced = pace(t0, task.flops, self.ctx.device().flops,
                         f"{self.node_id} task {task.id}") if self.emulate else compute_s
            timing = J.TaskTiming(task.id, task.stage, self.node_id, wall0, time.time(),
                                  compute_s, paced)
        except MeshdlError as exc:
            self._fail(st.job, plan, f"task {task.id} failed on {self.node_id}: {exc}")
            return
        self._after_task(st, task, y, timing)

    def _finish_task(self, st: J.JobState, task: Task, y: torch.Tensor, compute_s: float,
                     t0: float) -> None:
        """The last phase of a phased task is done (``meshdl.node.phases``)."""
        wall0 = time.time() - (time.monotonic() - t0)
        paced = pace(t0, task.flops, self.ctx.device().flops,
                     f"{self.node_id} task {task.id}") if self.emulate else compute_s
        self._after_task(st, task, y, J.TaskTiming(task.id, task.stage, self.node_id, wall0,
                                                   time.time(), compute_s, paced))

    def _after_task(self, st: J.JobState, task: Task, y: torch.Tensor,
                    timing: J.TaskTiming) -> None:
        plan = st.plan
        self._bump("tasks")
        self._status(st.job, "task", json.dumps(timing.to_dict()), plan.term)
        held = task.out_region if task.out_region is not None else (
            Region.full(y.shape) if y.dim() == 4 else None)
        for c, piece in plan.consumers(task):
            part = y if piece is None or held is None else crop(y, held, piece)
            self.send_piece(st.job, plan, J.halo_piece(plan.plan_id, task.id, c.id), c.device,
                            tensor_to_wire(part), task.id, c.id)
        if task.stage == len(plan.stages) - 1:
            self.send_piece(st.job, plan, J.output_piece(plan.plan_id, task.id), plan.sink,
                            tensor_to_wire(y), task.id, "")
        self._maybe_done(st, task.id)

    def _on_output(self, st: J.JobState, src: str, arr: np.ndarray) -> None:
        last = st.plan.stages[-1]
        with self.jobs.lock:
            st.outputs[src] = arr
            if len(st.outputs) < len(last.tasks) or st.finished:
                return
            st.finished = True
            st.held_at = time.time()        # the sink holds the answer: the model's latency
        self.io.submit(lambda: self._publish_result(st))

    def _publish_result(self, st: J.JobState) -> None:
        plan = st.plan
        try:
            g = self.graphs.for_plan(plan)
            y = stitch(g, plan, {k: wire_to_tensor(v) for k, v in st.outputs.items()})
            data = tensor_to_wire(y)
            meta = {"dtype": data.dtype.name, "shape": list(data.shape),
                    "plan_id": plan.plan_id, "sink": self.node_id}
            client = self._client_of(st.job)
            if data.nbytes > self.inline_result_max and client:
                # a big answer travels as a piece to the client (chunked, CRC'd, acked,
                # retransmitted); the result message only describes it
                piece = J.result_piece(plan.plan_id)
                topic = topics.route_topic(self.mesh_name, [client], st.job, piece)
                frames = [(topic, f) for f in encode_frames(
                    st.job, piece, data, src_task="", dst_task=J.CLIENT_PREFIX + client,
                    term=plan.term, chunk_bytes=self.chunk_bytes)]
                self.sender.send(st.job, piece, client, [self.node_id, client], frames,
                                 self._expected_s([self.node_id, client], data.nbytes),
                                 lambda msg: self._status(st.job, "failed", msg, plan.term))
                meta.update(piece=piece, bytes=int(data.nbytes))
                self._bump("result_pieces")
            elif data.nbytes > self.inline_result_max * 4:
                raise PlanError(f"the answer has {data.nbytes} bytes and job {st.job}'s "
                                "client is unknown here (its request never reached this "
                                "node), so it cannot be sent as pieces")
            else:
                meta["data"] = data.tobytes()
            res = JobResult(st.job, True, result=meta,
                            timings={"done": time.time(), "held": st.held_at})
        except (MeshdlError, KeyError) as exc:
            res = JobResult(st.job, False, error=f"sink {self.node_id} could not stitch the "
                                                 f"answer: {exc}")
        try:
            self.data_bus.publish(topics.job(self.mesh_name, st.job, "result"),
                                  encode_control(res), qos=1)
        except MeshdlError as exc:
            self._fail(st.job, plan, f"sink {self.node_id} could not publish the answer of "
                                     f"job {st.job}: {exc}")
        used = ["@out<" + k for k in st.outputs]
        st.outputs.clear()
        self._released(st.job, *used)
        self._maybe_done(st)

    def _maybe_done(self, st: J.JobState, task_id: str | None = None) -> None:
        plan = st.plan
        with self.jobs.lock:
            if task_id is not None:
                st.completed.add(task_id)
            mine = [t.id for t in plan.tasks() if t.device == self.node_id]
            if any(t not in st.completed for t in mine):
                return
            if plan.sink == self.node_id and not (st.finished and not st.outputs):
                return
        # the job may still have unacked pieces; the sender keeps them until acked
        self.jobs.end(st.job)
        self.credit.release_job(st.job)
