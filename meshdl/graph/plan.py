"""Plan, Stage, Task, Region: the plain data a planner produces and a node executes.

A plan cuts the model's op sequence at cut positions into stages. Stage k covers
ops [start, end) of ``ModelGraph.ops``; its input is the single live tensor at
position ``start`` (position 0 is the model input) and its output the one at
``end``. A spatial stage's output is split into tiles, one task each; a whole
stage has exactly one task with ``out_region=None`` (the whole tensor).

Data flow, derived and never stored twice:
- stage 0 tasks read their ``in_region`` of the model input from ``plan.source``;
- a task of stage k>0 reads from every task of stage k-1 whose ``out_region``
  overlaps its ``in_region`` (the overlap is the piece that crosses the mesh);
- the last stage's tasks send their ``out_region`` to ``plan.sink``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any, Iterator

from meshdl.errors import PlanError

PLAN_VERSION = 1


@dataclass(frozen=True, order=True)
class Region:
    """Rows [h0, h1) and columns [w0, w1) of a feature map (all channels)."""

    h0: int
    h1: int
    w0: int
    w1: int

    @property
    def rows(self) -> int:
        return self.h1 - self.h0

    @property
    def cols(self) -> int:
        return self.w1 - self.w0

    @property
    def area(self) -> int:
        return max(0, self.rows) * max(0, self.cols)

    def is_empty(self) -> bool:
        return self.rows <= 0 or self.cols <= 0

    def intersect(self, other: "Region") -> "Region | None":
        r = Region(max(self.h0, other.h0), min(self.h1, other.h1),
                   max(self.w0, other.w0), min(self.w1, other.w1))
        return None if r.is_empty() else r

    def union(self, other: "Region") -> "Region":
        """Bounding box of both."""
        return Region(min(self.h0, other.h0), max(self.h1, other.h1),
                      min(self.w0, other.w0), max(self.w1, other.w1))

    def contains(self, other: "Region") -> bool:
        return (self.h0 <= other.h0 and other.h1 <= self.h1
                and self.w0 <= other.w0 and other.w1 <= self.w1)

    def shift(self, dh: int, dw: int) -> "Region":
        return Region(self.h0 + dh, self.h1 + dh, self.w0 + dw, self.w1 + dw)

    def relative_to(self, outer: "Region") -> "Region":
        """This region in the coordinates of a tensor that holds ``outer``."""
        return self.shift(-outer.h0, -outer.w0)

    def to_list(self) -> list[int]:
        return [self.h0, self.h1, self.w0, self.w1]

    @classmethod
    def from_list(cls, v: Any) -> "Region | None":
        if v is None:
            return None
        if len(v) != 4:
            raise PlanError(f"region must be [h0, h1, w0, w1], got {v!r}")
        return cls(*(int(x) for x in v))

    @classmethod
    def full(cls, shape: tuple[int, ...]) -> "Region":
        """The whole spatial extent of an (N, C, H, W) tensor."""
        return cls(0, int(shape[-2]), 0, int(shape[-1]))


@dataclass
class Task:
    """One micro-split: compute ``out_region`` of stage ``stage`` on ``device``."""

    id: str
    stage: int
    device: str
    out_region: Region | None = None   # tile of the stage output; None = whole tensor
    in_region: Region | None = None    # region of the stage input it needs; None = whole
    flops: float = 0.0                 # FLOPs of this task, halo recompute included

    def to_dict(self) -> dict:
        return {"id": self.id, "stage": self.stage, "device": self.device,
                "out_region": None if self.out_region is None else self.out_region.to_list(),
                "in_region": None if self.in_region is None else self.in_region.to_list(),
                "flops": float(self.flops)}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        try:
            return cls(id=str(d["id"]), stage=int(d["stage"]), device=str(d["device"]),
                       out_region=Region.from_list(d.get("out_region")),
                       in_region=Region.from_list(d.get("in_region")),
                       flops=float(d.get("flops", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed task {d!r}: {exc}") from exc


@dataclass(frozen=True)
class ReducePoint:
    """A piece kind of tiled stages: after phase ``phase`` every task of the stage sends
    its partials of the global reductions ``ops`` (``nbytes`` in all) to every other
    task of the stage (an all-to-all of tiny vectors); each task combines them in task
    order and goes on with phase ``phase + 1``."""

    phase: int
    ops: tuple[int, ...]
    nbytes: int

    def to_dict(self) -> dict:
        return {"phase": self.phase, "ops": list(self.ops), "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: dict) -> "ReducePoint":
        try:
            return cls(int(d["phase"]), tuple(int(v) for v in d["ops"]), int(d["nbytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed reduce point {d!r}: {exc}") from exc


@dataclass
class Stage:
    """Ops [start, end) of the graph; spatial stages are tiled, whole ones are not.
    A tiled stage with ``reduces`` runs each task in ``len(reduces) + 1`` phases."""

    index: int
    start: int
    end: int
    spatial: bool
    tasks: list[Task] = field(default_factory=list)
    reduces: list[ReducePoint] = field(default_factory=list)

    @property
    def phases(self) -> int:
        """Phases of each task (1 unless the stage is tiled with reduce points)."""
        return len(self.reduces) + 1 if self.tiled else 1

    @property
    def tiled(self) -> bool:
        return not (len(self.tasks) == 1 and self.tasks[0].out_region is None)

    def to_dict(self) -> dict:
        d = {"index": self.index, "start": self.start, "end": self.end,
             "spatial": self.spatial, "tasks": [t.to_dict() for t in self.tasks]}
        if self.reduces:
            d["reduces"] = [r.to_dict() for r in self.reduces]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Stage":
        try:
            return cls(index=int(d["index"]), start=int(d["start"]), end=int(d["end"]),
                       spatial=bool(d["spatial"]),
                       tasks=[Task.from_dict(t) for t in d["tasks"]],
                       reduces=[ReducePoint.from_dict(r) for r in d.get("reduces", [])])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed stage: {exc}") from exc


@dataclass
class Plan:
    """A complete assignment of a model's micro-splits to mesh devices."""

    model: str                       # graph.name (model name) the plan was made for
    input_shape: tuple[int, ...]
    num_ops: int                     # len(graph.ops): guards against a mismatched graph
    stages: list[Stage]
    source: str = "d0"               # device holding the input
    sink: str = "d0"                 # device that receives the answer
    strategy: str = "manual"
    alpha: float | None = None
    latency_s: float | None = None   # predicted by the cost model
    energy_j: float | None = None    # predicted by the cost model
    routes: dict[str, list[str]] = field(default_factory=dict)  # "a>b" -> [a, ..., b]
    plan_id: str = ""
    term: int = 0                    # leader term (epoch) that issued the plan
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # per-stage predictions etc.

    # ----- derived views -------------------------------------------------
    def tasks(self) -> Iterator[Task]:
        for s in self.stages:
            yield from s.tasks

    def task(self, task_id: str) -> Task:
        for t in self.tasks():
            if t.id == task_id:
                return t
        raise PlanError(f"plan has no task {task_id!r}")

    def devices(self) -> list[str]:
        """Every device the plan touches, in first-use order."""
        seen: dict[str, None] = {self.source: None}
        for t in self.tasks():
            seen.setdefault(t.device, None)
        seen.setdefault(self.sink, None)
        return list(seen)

    def route(self, src: str, dst: str) -> list[str]:
        """Mesh path from src to dst (direct hop when the plan names none)."""
        if src == dst:
            return [src]
        return list(self.routes.get(f"{src}>{dst}", [src, dst]))

    def producers(self, task: Task) -> list[tuple[Task, Region | None]]:
        """Tasks of the previous stage that feed ``task``, with the piece each sends.

        The piece is the overlap of the producer's tile with the consumer's input
        region (None = whole tensor). Stage 0 has no producers: it reads the input.
        """
        if task.stage == 0:
            return []
        out = []
        for p in self.stages[task.stage - 1].tasks:
            if p.out_region is None or task.in_region is None:
                out.append((p, p.out_region if task.in_region is None else task.in_region))
                continue
            piece = p.out_region.intersect(task.in_region)
            if piece is not None:
                out.append((p, piece))
        return out

    def peers(self, task: Task) -> list[Task]:
        """The tasks of ``task``'s stage it exchanges partials with (all of them, itself
        included, in task order), or [] when its stage has no reduce points."""
        stage = self.stages[task.stage]
        return list(stage.tasks) if stage.reduces and stage.tiled else []

    def consumers(self, task: Task) -> list[tuple[Task, Region | None]]:
        """Tasks of the next stage fed by ``task``, with the piece each receives."""
        if task.stage + 1 >= len(self.stages):
            return []
        return [(c, piece) for c in self.stages[task.stage + 1].tasks
                for (p, piece) in self.producers(c) if p.id == task.id]

    # ----- plain data ------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "model": self.model,
                "input_shape": list(self.input_shape), "num_ops": self.num_ops,
                "stages": [s.to_dict() for s in self.stages],
                "source": self.source, "sink": self.sink, "strategy": self.strategy,
                "alpha": self.alpha, "latency_s": self.latency_s, "energy_j": self.energy_j,
                "routes": {k: list(v) for k, v in self.routes.items()},
                "plan_id": self.plan_id, "term": self.term,
                "notes": list(self.notes), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError(f"a plan must be a mapping, got {type(d).__name__}")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not {PLAN_VERSION}; "
                            "upgrade the older meshdl so both ends speak the same version")
        try:
            return cls(model=str(d["model"]), input_shape=tuple(int(v) for v in d["input_shape"]),
                       num_ops=int(d["num_ops"]),
                       stages=[Stage.from_dict(s) for s in d["stages"]],
                       source=str(d["source"]), sink=str(d["sink"]),
                       strategy=str(d.get("strategy", "manual")),
                       alpha=None if d.get("alpha") is None else float(d["alpha"]),
                       latency_s=None if d.get("latency_s") is None else float(d["latency_s"]),
                       energy_j=None if d.get("energy_j") is None else float(d["energy_j"]),
                       routes={str(k): [str(x) for x in v] for k, v in d.get("routes", {}).items()},
                       plan_id=str(d.get("plan_id", "")), term=int(d.get("term", 0)),
                       notes=[str(n) for n in d.get("notes", [])], meta=dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed plan: {exc}") from exc

    def summary(self) -> str:
        parts = []
        for s in self.stages:
            devs = ",".join(t.device for t in s.tasks)
            parts.append(f"[{s.start}:{s.end}) x{len(s.tasks)} on {devs}")
        return " | ".join(parts)


def plain(obj: Any) -> Any:
    """asdict-like conversion used by tools that dump dataclasses."""
    return asdict(obj)
