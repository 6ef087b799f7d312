"""ModelGraph: a traced model's ops, cut points, spatial runs, region planning and the
task kernel (``run_range``) that every device runs."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from meshdl.errors import PlanError, SplitWarning
from meshdl.graph.plan import Region
from meshdl.graph.compiled import compile_range
from meshdl.graph.fxtrace import INPUT, Op, build_ops
from meshdl.graph.layout import empty_tile, full_region, is_standard


@dataclass(frozen=True)
class RegionPlan:
    """For one output tile of ops [a, b): the region each op must produce and the region
    of the input tensor (at position a) the tile needs."""

    need: dict[int, Region]     # op index -> output region to compute
    input_region: Region
    flops: float
    # ranges with reduce points (global reductions split into per-tile partials):
    whole: frozenset = frozenset()          # vector ops and reduce results, held whole
    owned: dict = field(default_factory=dict)   # reduce op -> region of its input it owns
    level: dict = field(default_factory=dict)   # op -> phase its value is available in
    phase_flops: tuple = ()                 # FLOPs of each phase

    @property
    def n_phases(self) -> int:
        return len(self.phase_flops) if self.phase_flops else 1


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
        self.roles = _roles(self.ops)
        self.spatial_runs = self._compute_spatial_runs()
        self._warn_run_enders()

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

    def _hw(self, producer: int) -> tuple[int, int] | None:
        return self._traced.in_hw if producer == INPUT else self.ops[producer].hw

    def _full(self, producer: int) -> Region:
        return full_region(self._shape(producer), self._hw(producer))

    def is_map(self, position: int) -> bool:
        """Is the tensor at ``position`` a 4-D map laid out (N, C, H, W)? Only such
        tensors are tiled across a stage boundary (a channels-last map inside a block
        is tiled along its tracked axes, never handed between stages)."""
        p = self.producer(position)
        shape = self._shape(p)
        return len(shape) == 4 and is_standard(shape, self._hw(p))

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
        """True when ops [a, b) can be tiled: both end tensors are feature maps, the last
        op is a map op, and every op is a map op, a global reduction of a map (a reduce
        point) or a small op on reduced values (computed whole by every tile)."""
        return (b > a and self.is_map(a) and self.is_map(b)
                and self.roles[b - 1] == MAP
                and all(self.roles[i] != GLOBAL for i in range(a, b)))

    def reduce_ops(self, a: int, b: int) -> list[int]:
        """The reduce points of ops [a, b) (global reductions split across tiles)."""
        return [i for i in range(a, b) if self.roles[i] == REDUCE]

    def reduce_points(self, a: int, b: int) -> list[tuple[int, list[int], int]]:
        """(phase, reduce ops, bytes of one tile's partials) of each exchange between the
        phases of a tiled stage [a, b), in phase order. Empty for plain stages."""
        ops = self.reduce_ops(a, b)
        if not ops or not self.is_spatial(a, b):
            return []
        levels = self._levels(a, b)
        out: dict[int, tuple[list[int], int]] = {}
        for i in ops:
            p = levels[i] - 1
            got = out.setdefault(p, ([], 0))
            out[p] = (got[0] + [i], got[1] + self._partial_bytes(i))
        return [(p, out[p][0], out[p][1]) for p in sorted(out)]

    def phase_fractions(self, a: int, b: int) -> list[float]:
        """Share of the FLOPs of ops [a, b) in each phase (one phase for plain ranges)."""
        if not self.reduce_ops(a, b) or not self.is_spatial(a, b):
            return [1.0]
        levels = self._levels(a, b)
        n = max(levels[i] for i in range(a, b)) + 1
        f = [0.0] * n
        for i in range(a, b):
            p = levels[i] - 1 if self.roles[i] == REDUCE else levels[i]
            f[p] += self.ops[i].flops
        total = sum(f) or 1.0
        return [v / total for v in f]

    def _partial_bytes(self, i: int) -> int:
        op = self.ops[i]
        spec = op.rule.reduce
        shape = self._shape(op.inputs[0])
        n = math.prod(shape) // max(1, math.prod(shape[d] for d in spec.dims))
        return int(n * (op.out_bytes // max(1, math.prod(op.out_shape))))

    def _levels(self, a: int, b: int) -> dict[int, int]:
        """Phase of each op of [a, b): the number of reduce points it depends on."""
        level = {self.producer(a): 0}
        for i in range(a, b):
            op = self.ops[i]
            lv = max((level.get(s, 0) for s in op.inputs), default=0)
            level[i] = lv + 1 if self.roles[i] == REDUCE else lv
        return level

    def _warn_run_enders(self) -> None:
        """One SplitWarning per op that ends a spatial run on a feature map and is not a
        known global op (classifier heads, global pooling)."""
        for op in self.ops:
            if self.roles[op.index] != GLOBAL or op.reason == "global":
                continue
            if not any(self.roles.get(s, MAP) == MAP for s in op.inputs) and op.inputs:
                continue
            warnings.warn(f"op {op.name} ({op.reason}) cannot be split spatially: the part "
                          "of the model around it runs whole on one device", SplitWarning,
                          stacklevel=4)

    def run_enders(self) -> list[Op]:
        """Ops that end a spatial run (global ops and ops meshdl cannot tile)."""
        return [op for op in self.ops if self.roles[op.index] == GLOBAL
                and (not op.inputs or any(self.roles.get(s, MAP) == MAP for s in op.inputs))]

    def tiled_flops(self) -> float:
        """FLOPs inside the spatial runs (what tiles can share)."""
        return float(sum(self.flops_between(a, b) for a, b in self.spatial_runs))

    def _compute_spatial_runs(self) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        pos = self._map_positions(0, len(self.ops))
        for a, b in zip(pos, pos[1:]):
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
        return [op for op in self.ops if self.roles[op.index] == GLOBAL]

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
        plan = self._back_propagate(a, b, out_region)
        self._plans[key] = plan
        return plan

    def _back_propagate(self, a: int, b: int, out_region: Region) -> RegionPlan:
        src = self.producer(a)
        roles = self.roles
        reduces = self.reduce_ops(a, b)
        levels = self._levels(a, b) if reduces else {}
        n_phases = (max(levels.values()) + 1) if reduces else 1
        pf = [0.0] * n_phases
        out_shape = self.tensor_shape(b)
        need: dict[int, Region] = {b - 1: out_region}
        whole: set[int] = set()
        owned: dict[int, Region] = {}
        input_region: Region | None = None
        flops = 0.0

        def want(s: int, rr: Region, op) -> None:
            nonlocal input_region
            if s == src:
                input_region = _merge(input_region, rr)
            elif s >= a:
                need[s] = _merge(need.get(s), rr)
            else:
                raise PlanError(f"op {op.name} reads a tensor from before position {a}: "
                                f"{a} is not a valid cut")

        for i in range(b - 1, a - 1, -1):
            op = self.ops[i]
            role = roles[i]
            if role == REDUCE:                  # every tile reduces the part it owns
                s = op.inputs[0]
                shape = self._shape(s)
                own = _owned(out_region, out_shape, shape)
                owned[i] = own
                f = op.flops * own.area / max(1, shape[-2] * shape[-1])
                flops += f
                pf[levels[i] - 1] += f
                whole.add(i)
                if not own.is_empty():
                    want(s, own, op)
                continue
            if role == VECTOR:
                if i not in whole:
                    continue
                flops += op.flops
                pf[levels[i]] += op.flops
                whole.update(op.inputs)
                continue
            r = need.get(i)
            if r is None:
                continue
            full_i = self._full(i)
            f = op.flops * r.area / max(1, full_i.area)
            flops += f
            if reduces:
                pf[levels[i]] += f
            if r.is_empty():        # a tile that lies wholly in a padding border
                continue
            for s, rr in zip(op.inputs, op.rule.in_regions(r)):
                if s != src and s >= 0 and roles[s] in (VECTOR, REDUCE):
                    whole.add(s)
                else:
                    want(s, rr, op)
        if input_region is None:
            input_region = Region(0, 0, 0, 0)   # the tile is all padding
        if not reduces:
            return RegionPlan(need, input_region, flops)
        return RegionPlan(need, input_region, flops, frozenset(whole), owned, levels,
                          tuple(pf))

    def input_region(self, a: int, b: int, out_region: Region) -> Region:
        return self.region_plan(a, b, out_region).input_region

    def tile_flops(self, a: int, b: int, out_region: Region | None) -> float:
        if out_region is None or out_region == Region.full(self.tensor_shape(b)):
            return self.flops_between(a, b)
        return self.region_plan(a, b, out_region).flops

    def split_ranges(self, a: int, b: int) -> list[tuple[int, int, bool]]:
        """[a, b) as maximal (start, end, tileable) ranges between positions."""
        out: list[tuple[int, int, bool]] = []
        pos = self._map_positions(a, b)
        for p, q in zip(pos, pos[1:]):
            sp = self.is_spatial(p, q)
            if out and out[-1][2] == sp:
                out[-1] = (out[-1][0], q, sp)
            else:
                out.append((p, q, sp))
        return out

    def _map_positions(self, a: int, b: int) -> list[int]:
        """Positions in [a, b) usable as tile boundaries (a 4-D map is live there; a
        5-D channel-shuffle view is not), plus both ends."""
        inner = [p for p in self.positions if a < p < b and self.is_map(p)]
        return [a, *inner, b]

    def why_not_spatial(self, a: int, b: int) -> str:
        """The reason ops [a, b) cannot be tiled, for error messages and notes."""
        for op in self.ops[a:b]:
            if not op.spatial:
                return f"op {op.name} ({op.kind}) is {op.reason}"
        return "its input or output is not a 4-D (N, C, H, W) feature map"

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
        if plan.n_phases > 1:
            raise PlanError(f"ops [{a}, {b}) of {self.name} hold reduce points: a tile runs "
                            "in phases with the other tiles' partials (graph.phased.TileRun)")
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
                env[i] = (empty_tile(x, op.out_shape, op.hw, r), r)
                continue
            inputs = [env[s] for s in op.inputs]
            full_i = self._full(i)
            if r == full_i and all(h == self._full(s) for s, (_, h) in zip(op.inputs, inputs)):
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


MAP, REDUCE, VECTOR, GLOBAL = "map", "reduce", "vector", "global"


def _roles(ops: list[Op]) -> dict[int, str]:
    """Each op's role: MAP (tileable op on feature maps), REDUCE (a global reduction of
    a map), VECTOR (an op on reduced values only, e.g. an SE block's MLP) or GLOBAL
    (ends a spatial run)."""
    roles: dict[int, str] = {INPUT: MAP}
    for op in ops:
        srcs = op.inputs
        if srcs and all(roles[s] in (REDUCE, VECTOR) for s in srcs):
            roles[op.index] = VECTOR
        elif op.rule.reduce is not None and len(srcs) == 1:
            roles[op.index] = REDUCE
        elif op.spatial and len(op.out_shape) >= 3:
            roles[op.index] = MAP
        else:
            roles[op.index] = GLOBAL
    return roles


def _owned(out_region: Region, out_shape, in_shape) -> Region:
    """The part of a reduced map (``in_shape``) a tile owns: its output tile scaled to
    that map. The tiles of a stage partition its output, so their owned parts
    partition the reduced map (monotone floor scaling keeps disjointness and cover)."""
    H, W = int(out_shape[-2]), int(out_shape[-1])
    h, w = int(in_shape[-2]), int(in_shape[-1])
    return Region(out_region.h0 * h // H, out_region.h1 * h // H,
                  out_region.w0 * w // W, out_region.w1 * w // W)


def _merge(have: Region | None, add: Region) -> Region:
    """Bounding box of two needs; an empty need adds nothing."""
    if have is None or have.is_empty():
        return add
    return have if add.is_empty() else have.union(add)


def trace(model: nn.Module, input_shape: Sequence[int] | None = None,
          name: str | None = None) -> ModelGraph:
    """Trace ``model`` (torch.fx + shape propagation) into a ModelGraph. ``model`` may
    also be a ``meshdl.models.LoadedModel`` (a model file): its own input shape is the
    default; otherwise the default is (1, 3, 224, 224)."""
    if not isinstance(model, nn.Module) and hasattr(model, "input_shape"):   # LoadedModel
        model, input_shape, name = (model.module, input_shape or model.input_shape,
                                    name or model.name)
    return ModelGraph(model, input_shape or (1, 3, 224, 224), name=name)
