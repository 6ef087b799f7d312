"""Per-job state of a node's data plane, and the names of the pieces a job moves.

Piece ids (a topic level) name the plan and the two ends, so a node can act on a
piece with nothing but the plan (``ctx.plan(plan_id)``)::

    {plan_id}.in              client -> plan.source      the whole model input
    {plan_id}.src.{task}      plan.source -> task        the task's input region
    {plan_id}.{ptask}.{ctask} producer -> consumer       the overlap (halo included)
    {plan_id}.{task}.out      last-stage task -> sink    the task's output tile
    {plan_id}.res             plan.sink -> client        the answer (when over INLINE_RESULT)

The frame's ``src``/``dst`` fields carry the task ids (``@{client}`` for the
client, empty for the source or the sink role).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from meshdl.errors import WireError
from meshdl.graph.plan import Plan

INPUT = "in"
SOURCE = "src"
OUTPUT = "out"
RESULT = "res"
CLIENT_PREFIX = "@"


def input_piece(plan_id: str) -> str:
    return f"{plan_id}.{INPUT}"


def source_piece(plan_id: str, task_id: str) -> str:
    return f"{plan_id}.{SOURCE}.{task_id}"


def halo_piece(plan_id: str, producer: str, consumer: str) -> str:
    return f"{plan_id}.{producer}.{consumer}"


def output_piece(plan_id: str, task_id: str) -> str:
    return f"{plan_id}.{task_id}.{OUTPUT}"


def result_piece(plan_id: str) -> str:
    """sink -> client: the whole answer, when it is too big for one control message."""
    return f"{plan_id}.{RESULT}"


def plan_of_piece(piece: str) -> str:
    pid, sep, _ = piece.partition(".")
    if not sep or not pid:
        raise WireError(f"piece id {piece!r} does not start with a plan id")
    return pid


def sender_device(plan: Plan, src_task: str) -> str:
    """The device that sent a piece whose frame says ``src=src_task``."""
    if src_task.startswith(CLIENT_PREFIX):
        return src_task[len(CLIENT_PREFIX):]
    if src_task == "":
        return plan.source
    return plan.task(src_task).device


@dataclass
class TaskTiming:
    task: str
    stage: int
    device: str
    start: float           # wall clock (time.time()), comparable across local processes
    end: float
    compute_s: float       # real compute time on this machine
    paced_s: float         # emulated duration (== compute_s when not emulating)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "stage": self.stage, "device": self.device,
                "start": self.start, "end": self.end, "compute_s": self.compute_s,
                "paced_s": self.paced_s}


@dataclass
class JobState:
    """What one node holds for one job: received inputs per task, sink outputs."""

    job: str
    plan: Plan
    created: float
    touched: float
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)   # task -> src -> array
    started: set[str] = field(default_factory=set)                   # tasks submitted
    completed: set[str] = field(default_factory=set)                 # tasks computed
    outputs: dict[str, Any] = field(default_factory=dict)            # sink: task -> array
    finished: bool = False
    held_at: float = 0.0          # sink: wall time it held every output tile
    failed: str = ""
    reported_stale: bool = False


class JobTable:
    """Jobs in flight on this node: bounded count, idle ones expire after ``ttl_s``."""

    def __init__(self, max_jobs: int = 64, ttl_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self._clock = clock
        self.lock = threading.RLock()
        self._jobs: OrderedDict[str, JobState] = OrderedDict()
        self._ended: OrderedDict[str, None] = OrderedDict()   # finished/failed/expired ids

    def get(self, job: str, plan: Plan) -> JobState | None:
        """The job's state (created on first use); None if the job already ended here
        or belongs to another plan (a stale frame)."""
        with self.lock:
            st = self._jobs.get(job)
            now = self._clock()
            if st is None:
                if job in self._ended:
                    return None
                st = JobState(job, plan, now, now)
                self._jobs[job] = st
                while len(self._jobs) > self.max_jobs:
                    old, _ = self._jobs.popitem(last=False)
                    self._end(old)
            elif st.plan.plan_id != plan.plan_id:
                return None
            st.touched = now
            self._jobs.move_to_end(job)
            return st

    def peek(self, job: str) -> JobState | None:
        with self.lock:
            return self._jobs.get(job)

    def end(self, job: str) -> JobState | None:
        with self.lock:
            st = self._jobs.pop(job, None)
            self._end(job)
            return st

    def ended(self, job: str) -> bool:
        with self.lock:
            return job in self._ended

    def expire(self) -> list[JobState]:
        """Drop jobs idle for more than ttl_s; return them."""
        with self.lock:
            now = self._clock()
            stale = [st for st in self._jobs.values() if now - st.touched > self.ttl_s]
            for st in stale:
                self._jobs.pop(st.job, None)
                self._end(st.job)
            return stale

    def active(self) -> list[JobState]:
        with self.lock:
            return list(self._jobs.values())

    def _end(self, job: str) -> None:
        self._ended[job] = None
        while len(self._ended) > 4 * self.max_jobs:
            self._ended.popitem(last=False)
