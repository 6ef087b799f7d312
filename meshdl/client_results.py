"""MeshClient's result types and answer decoding (split from ``meshdl.client``)."""
from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshdl.errors import JobError, MeshdlError
from meshdl.graph.plan import Plan

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
    # wall-clock moments of the attempt that answered (request, planned, plan, send,
    # input_at, held, result, done; those it reached): where a job's time went
    marks: dict[str, float] = field(default_factory=dict)
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
        self.marks: dict[str, float] = {}        # wall-clock moments (InferResult.marks)


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
