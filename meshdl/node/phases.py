"""Tasks of stages with reduce points on a node: phases and the partials exchange.

A tiled stage holding global reductions (squeeze-and-excitation pools; see
``meshdl.graph.phased``) runs each task as phases. The data plane hands a task here
once its input pieces are in (``start``). Phase 0 runs on the compute worker; its
partials (a few numbers per channel) go to every task of the stage, this one
included, as pieces ``{plan}.{src task}.{dst task}.r{phase}`` over the ordinary
reliable piece path. When a task holds its own phase done and the partials of every
task of the stage, its next phase is *submitted* to the compute worker as a new unit
of work: no task ever blocks waiting, so a device holding several tiles of the stage
runs all their phase 0s first. After the last phase the data plane sends the tile on
as for any task (``finish``).

Combining happens in every task from the same partials in task order, so all tiles
hold bit-identical reduced values, equal to what ``meshdl.execute`` computes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import torch

from meshdl.errors import MeshdlError, PlanError
from meshdl.graph.phased import TileRun, combine, pack, unpack
from meshdl.graph.plan import Plan, Task

log = logging.getLogger(__name__)

MAX_RUNS = 256          # tile states held at once (jobs x tiles); oldest dropped first
_SUFFIX = ".r"


def partial_piece(plan_id: str, src: str, dst: str, phase: int) -> str:
    return f"{plan_id}.{src}.{dst}{_SUFFIX}{phase}"


def parse_partial(piece: str) -> int | None:
    """The exchange phase of a partials piece id, None for any other piece."""
    head, sep, tail = piece.rpartition(_SUFFIX)
    if not sep or not tail.isdigit() or head.count(".") != 2:
        return None
    return int(tail)


class PhaseRunner:
    """Phased tasks of one node. ``send(job, plan, piece, device, tensor, src, dst)``
    sends a piece; ``submit(fn)`` queues work on the compute worker;
    ``finish(st, task, y, compute_s, t0)`` continues as after any task;
    ``fail(job, plan, msg)`` reports a failure."""

    def __init__(self, node_id: str, send: Callable[..., None],
                 submit: Callable[[Callable[[], None]], None],
                 finish: Callable[..., None], fail: Callable[[str, Plan, str], None]):
        self.node_id = node_id
        self._send, self._submit, self._finish, self._fail = send, submit, finish, fail
        self._lock = threading.Lock()
        self._runs: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._parts: dict[tuple[str, str, int], dict[str, torch.Tensor]] = {}

    # ----- the data plane's calls ------------------------------------------------
    def start(self, st: Any, g: Any, task: Task, x: torch.Tensor) -> None:
        """All input pieces of ``task`` are in (runs on the compute worker)."""
        plan = st.plan
        stage = plan.stages[task.stage]
        t0 = time.monotonic()
        run = TileRun(g, stage.start, stage.end, x, task.in_region, task.out_region)
        state = {"run": run, "st": st, "g": g, "task": task, "compute_s": 0.0, "t0": t0,
                 "advanced": set()}
        with self._lock:
            self._runs[(st.job, task.id)] = state
            while len(self._runs) > MAX_RUNS:
                (job, tid), _ = self._runs.popitem(last=False)
                log.warning("%s dropped the phase state of %s/%s: too many held",
                            self.node_id, job, tid)
        self._step(state)

    def on_partial(self, st: Any, src: str, dst: str, phase: int, arr: torch.Tensor) -> None:
        """A partials piece for local task ``dst`` arrived (any thread; never computes)."""
        plan = st.plan
        task = plan.task(dst)
        if task.device != self.node_id:
            raise PlanError(f"partials for {dst}, which runs on {task.device}")
        peers = {t.id for t in plan.peers(task)}
        if src not in peers:
            raise PlanError(f"partials from {src}, not a task of {dst}'s stage")
        with self._lock:
            self._parts.setdefault((st.job, dst, phase), {})[src] = arr
            state = self._runs.get((st.job, dst))
        if state is not None:
            self._maybe_advance(state, phase)

    def forget(self, job: str) -> None:
        with self._lock:
            for key in [k for k in self._runs if k[0] == job]:
                del self._runs[key]
            for key in [k for k in self._parts if k[0] == job]:
                del self._parts[key]

    # ----- phases ----------------------------------------------------------------
    def _step(self, state: dict) -> None:
        """Run the tile's current phase (on the compute worker)."""
        run, st, task, g = state["run"], state["st"], state["task"], state["g"]
        plan = st.plan
        if st.failed:
            return
        try:
            phase = run.phase
            t = time.monotonic()
            ops = run.exchange_ops()
            out = run.step()
            state["compute_s"] += time.monotonic() - t
            if run.done:
                with self._lock:
                    self._runs.pop((st.job, task.id), None)
                self._finish(st, task, out, state["compute_s"], state["t0"])
                return
            flat = pack(g, ops, out)
            for peer in plan.peers(task):
                self._send(st.job, plan, partial_piece(plan.plan_id, task.id, peer.id, phase),
                           peer.device, flat, task.id, peer.id)
        except MeshdlError as exc:
            self._fail(st.job, plan, f"task {task.id} failed on {self.node_id}: {exc}")
            return
        with self._lock:
            state["stepped"] = phase
        self._maybe_advance(state, phase)

    def _maybe_advance(self, state: dict, phase: int) -> None:
        """Once this tile finished ``phase`` and every peer's partials of it are in,
        queue the next phase (exactly once)."""
        st, task = state["st"], state["task"]
        peers = [t.id for t in st.plan.peers(task)]
        with self._lock:
            got = self._parts.get((st.job, task.id, phase), {})
            if state.get("stepped") != phase or phase in state["advanced"] or \
                    any(p not in got for p in peers):
                return
            state["advanced"].add(phase)
            parts = [got[p] for p in peers]            # task order: identical everywhere
            del self._parts[(st.job, task.id, phase)]
        self._submit(lambda: self._next(state, parts))

    def _next(self, state: dict, parts: list[torch.Tensor]) -> None:
        run, st, task, g = state["run"], state["st"], state["task"], state["g"]
        try:
            ops = run.exchange_ops()
            combined = combine(g, [unpack(g, ops, p) for p in parts])
            run.give(combined)
        except MeshdlError as exc:
            self._fail(st.job, st.plan, f"task {task.id} failed on {self.node_id}: {exc}")
            return
        self._step(state)
