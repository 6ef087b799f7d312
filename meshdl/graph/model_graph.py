"""ModelGraph: a traced model's ops, cut points, spatial runs, region planning and the
task kernel (``run_range``) that every device runs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from meshdl.errors import PlanError
from meshdl.graph.plan import Region
from meshdl.graph.compiled import compile_range
from meshdl.graph.fxtrace import INPUT, Op, build_ops


@dataclass(frozen=True)
class RegionPlan:
    """For one output tile of ops [a, b): the region each op must produce and the region
    of the input tensor (at position a) the tile needs."""

    need: dict[int, Region]     # op index -> output region to compute
    input_region: Region
    flops: float


class ModelGraph:
    """A traced model. Positions index the spaces between ops: position p is the state
    after ``ops[p-1]``; position 0 is the model input, ``len(ops)`` its output."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], name: str | None = None):
        self.module = model
        self.name = name or type(model).__name__.lower()
        self.input_shape = tuple(int(v) for v in input_shape)
        traced = build_ops(model, self.input_shape)
        self.ops, self.output_shape = traced.ops, traced.output_shape
        self._traced = traced
        self._compiled: dict[tuple[int, int], Callable | None] = {}
        self.flops = float(sum(op.flops for op in self.ops))
        self.weight_bytes = int(sum(op.weight_bytes for op in self.ops))
        self._last_use = self._compute_last_use()
        self.cut_points = self._compute_cut_points()
        self.positions = [0, *self.cut_points, len(self.ops)]
        self._pos_set = set(self.positions)
        self._flops_prefix = [0.0]
        self._wbytes_prefix = [0]
        for op in self.ops:
            self._flops_prefix.append(self._flops_prefix[-1] + op.flops)
            self._wbytes_prefix.append(self._wbytes_prefix[-1] + op.weight_bytes)
        self._plans: dict[tuple[int, int, Region], RegionPlan] = {}
        self.spatial_runs = self._compute_spatial_runs()

    def __repr__(self) -> str:
        return (f"ModelGraph({self.name!r}, input={self.input_shape}, ops={len(self.ops)}, "
                f"GFLOPs={self.flops / 1e9:.2f}, cut_points={len(self.cut_points)})")

    # ----- structure --------------------------------------------------------
    def _compute_last_use(self) -> dict[int, int]:
        last = {INPUT: -1}
        for op in self.ops:
            last.setdefault(op.index, op.index)
            for src in op.inputs:
                last[src] = max(last.get(src, -1), op.index)
        last[len(self.ops) - 1] = len(self.ops)  # the output is used by the caller
        return last

    def _compute_cut_points(self) -> list[int]:
        """Positions 0 < p < len(ops) where exactly one tensor is live."""
        cuts = []
        live = {INPUT}
        for p in range(1, len(self.ops)):
            op = self.ops[p - 1]
            live.add(op.index)
            live = {t for t in live if self._last_use.get(t, -1) >= p}
            if len(live) == 1 and op.index in live:
                cuts.append(p)
        return cuts

    def producer(self, position: int) -> int:
        """Index of the op whose output is the live tensor at ``position`` (INPUT at 0)."""
        self._check_position(position)
        return INPUT if position == 0 else position - 1

    def tensor_shape(self, position: int) -> tuple[int, ...]:
        p = self.producer(position)
        return self.input_shape if p == INPUT else self.ops[p].out_shape

    def _shape(self, producer: int) -> tuple[int, ...]:
        return self.input_shape if producer == INPUT else self.ops[producer].out_shape

    def tensor_bytes(self, position: int, region: Region | None = None) -> int:
        shape = self.tensor_shape(position)
        n = math.prod(shape) * 4
        if region is not None and len(shape) == 4:
            n = n // (shape[-2] * shape[-1]) * region.area
        return int(n)

    def flops_between(self, a: int, b: int) -> float:
        return self._flops_prefix[b] - self._flops_prefix[a]

    def weight_bytes_between(self, a: int, b: int) -> int:
        return self._wbytes_prefix[b] - self._wbytes_prefix[a]

    def is_spatial(self, a: int, b: int) -> bool:
        """True when ops [a, b) can be tiled: every op has a region rule and both end
        tensors are feature maps."""
        return (len(self.tensor_shape(a)) == 4 and len(self.tensor_shape(b)) == 4
                and all(op.spatial for op in self.ops[a:b]))

    def _compute_spatial_runs(self) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for a, b in zip(self.positions, self.positions[1:]):
            if not self.is_spatial(a, b):
                continue
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        return runs

    @property
    def global_ops(self) -> list[Op]:
        """Ops that end a spatial run (global reach or not understood spatially)."""
        return [op for op in self.ops if not op.spatial]

    def _check_position(self, p: int) -> None:
        if p not in self._pos_set:
            raise PlanError(f"position {p} is not a cut point of {self.name}; valid positions "
                            f"are 0, the model end ({len(self.ops)}) and g.cut_points")

    # ----- region algebra ----------------------------------------------------
    def region_plan(self, a: int, b: int, out_region: Region) -> RegionPlan:
        """Back-propagate an output tile of ops [a, b) to every op and to the input."""
        key = (a, b, out_region)
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        self._check_position(a)
        self._check_position(b)
        if not self.is_spatial(a, b):
            raise PlanError(f"ops [{a}, {b}) of {self.name} cannot be tiled: "
                            f"{self.why_not_spatial(a, b)}; run this range whole")
        full = Region.full(self.tensor_shape(b))
        if out_region.is_empty() or not full.contains(out_region):
            raise PlanError(f"tile {out_region.to_list()} is empty or outside the "
                            f"{full.rows}x{full.cols} feature map at position {b}")
        src = self.producer(a)
        need: dict[int, Region] = {b - 1: out_region}
        input_region: Region | None = None
        flops = 0.0
        for i in range(b - 1, a - 1, -1):
            r = need.get(i)
            if r is None:
                continue
            op = self.ops[i]
            full_i = Region.full(op.out_shape)
            flops += op.flops * r.area / max(1, full_i.area)
            if r.is_empty():        # a tile that lies wholly in a padding border
                continue
            for s, rr in zip(op.inputs, op.rule.in_regions(r)):
                if s == src:
                    input_region = _merge(input_region, rr)
                elif s >= a:
                    need[s] = _merge(need.get(s), rr)
                else:
                    raise PlanError(f"op {op.name} reads a tensor from before position {a}: "
                                    f"{a} is not a valid cut")
        if input_region is None:
            input_region = Region(0, 0, 0, 0)   # the tile is all padding
        plan = RegionPlan(need, input_region, flops)
        self._plans[key] = plan
        return plan

    def input_region(self, a: int, b: int, out_region: Region) -> Region:
        return self.region_plan(a, b, out_region).input_region

    def tile_flops(self, a: int, b: int, out_region: Region | None) -> float:
        if out_region is None or out_region == Region.full(self.tensor_shape(b)):
            return self.flops_between(a, b)
        return self.region_plan(a, b, out_region).flops

    def split_ranges(self, a: int, b: int) -> list[tuple[int, int, bool]]:
        """[a, b) as maximal (start, end, tileable) ranges between positions."""
        out: list[tuple[int, int, bool]] = []
        pos = [p for p in self.positions if a <= p <= b]
        for p, q in zip(pos, pos[1:]):
            sp = self.is_spatial(p, q)
            if out and out[-1][2] == sp:
                out[-1] = (out[-1][0], q, sp)
            else:
                out.append((p, q, sp))
        return out

    def why_not_spatial(self, a: int, b: int) -> str:
        """The reason ops [a, b) cannot be tiled, for error messages and notes."""
        for op in self.ops[a:b]:
            if not op.spatial:
                return f"op {op.name} ({op.kind}) is {op.reason}"
        return "its input or output is not a 4-D feature map"

    # ----- execution ---------------------------------------------------------
    @torch.no_grad()
    def run_range(self, a: int, b: int, x: torch.Tensor, in_region: Region | None = None,
                  out_region: Region | None = None) -> torch.Tensor:
        """The task kernel: ``x`` holds ``in_region`` of the tensor at position ``a``
        (None = all of it); returns exactly ``out_region`` of the tensor at ``b``."""
        full_out = (Region.full(self.tensor_shape(b)) if len(self.tensor_shape(b)) == 4
                    else None)
        full_in = Region.full(self.tensor_shape(a)) if len(self.tensor_shape(a)) == 4 else None
        if in_region == full_in:
            in_region = None
        if out_region is not None and out_region == full_out and in_region is None:
            out_region = None
        if out_region is None:
            if in_region is not None and in_region != Region.full(self.tensor_shape(a)):
                raise PlanError(f"computing all of position {b} needs all of position {a}, "
                                f"got region {in_region.to_list()}")
            return self._run_whole(a, b, x)
        plan = self.region_plan(a, b, out_region)
        held_in = in_region or Region.full(self.tensor_shape(a))
        if not held_in.contains(plan.input_region):
            raise PlanError(f"tile {out_region.to_list()} needs input region "
                            f"{plan.input_region.to_list()}, the task holds {held_in.to_list()}")
        src = self.producer(a)
        env: dict[int, tuple[torch.Tensor, Region]] = {src: (x, held_in)}
        for i in range(a, b):
            r = plan.need.get(i)
            if r is None:
                continue
            op = self.ops[i]
            if r.is_empty():
                env[i] = (x.new_empty((*op.out_shape[:-2], max(0, r.rows), max(0, r.cols))), r)
                continue
            inputs = [env[s] for s in op.inputs]
            full_i = Region.full(op.out_shape)
            if r == full_i and all(h == Region.full(self._shape(s))
                                   for s, (_, h) in zip(op.inputs, inputs)):
                y = op.call(*(t for t, _ in inputs))      # whole map: the native op
            else:
                y = op.rule.compute(inputs, r)
            env[i] = (y, r)
            self._release(env, op, i, b)
        return env[b - 1][0]

    def _release(self, env: dict, op: Op, i: int, b: int) -> None:
        for s in op.inputs:
            if self._last_use.get(s, b) <= i and s in env:
                del env[s]

    def _run_whole(self, a: int, b: int, x: torch.Tensor) -> torch.Tensor:
        key = (a, b)
        if key not in self._compiled:
            self._compiled[key] = compile_range(self._traced, a, b)
        fn = self._compiled[key]
        if fn is not None:
            return fn(x)
        src = self.producer(a)
        env: dict[int, torch.Tensor] = {src: x}
        for i in range(a, b):
            op = self.ops[i]
            env[i] = op.call(*(env[s] for s in op.inputs))
            for s in op.inputs:
                if self._last_use.get(s, b) <= i:
                    env.pop(s, None)
        return env[b - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole model through the same kernel (equals ``module(x)``)."""
        return self.run_range(0, len(self.ops), x)


def _merge(have: Region | None, add: Region) -> Region:
    """Bounding box of two needs; an empty need adds nothing."""
    if have is None or have.is_empty():
        return add
    return have if add.is_empty() else have.union(add)


def trace(model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224),
          name: str | None = None) -> ModelGraph:
    """Trace ``model`` (torch.fx + shape propagation) into a ModelGraph."""
    return ModelGraph(model, input_shape, name=name)
