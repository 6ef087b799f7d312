"""Tiles of a stage with reduce points run in phases.

A global reduction inside a tiled stage (the pooling of a squeeze-and-excitation block,
CBAM's channel attention, a global-context gate) needs the whole map. Instead of ending
the spatial run there, every tile reduces the part of the map it *owns* (its output
tile scaled to that map: the owned parts partition it), the partials (a few numbers
per channel) are exchanged among the stage's tiles, and each tile combines all of them
in tile order, so every tile holds the identical, exact reduced value. The small ops on
reduced values (the SE MLP) run whole in every tile; the gate is applied to each tile's
own region.

A task of such a stage is a sequence of phases separated by reduce points. Phase p of a
tile needs its own state from phase p-1 plus the partials of every tile of the stage
from phase p-1. Each phase is a separate unit of work (``TileRun.step``), never a
blocking wait inside a task: a device holding several tiles of one stage runs phase 0
of all of them before any needs the exchange.

``TileRun`` is the task code shared by ``meshdl.execute`` (in-process) and mesh nodes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from meshdl.errors import PlanError
from meshdl.graph.model_graph import MAP, REDUCE, VECTOR, ModelGraph
from meshdl.graph.plan import Region
from meshdl.graph.layout import empty_tile
from meshdl.graph.regions import crop

Partials = dict[int, "torch.Tensor | None"]   # reduce op index -> partial (None: owns none)


def _region_of(t: torch.Tensor) -> Region:
    return Region.full(tuple(t.shape)) if t.dim() >= 2 else Region(0, 1, 0, 1)


class TileRun:
    """One tile of a stage [a, b) with reduce points, advanced phase by phase.

    ``step()`` runs the current phase: it returns this tile's partials (a dict reduce
    op -> tensor or None) when an exchange follows, or the tile's output after the
    last phase. ``give(combined)`` hands in the combined values of the exchange
    (``combine``) and moves to the next phase."""

    def __init__(self, g: ModelGraph, a: int, b: int, x: torch.Tensor,
                 in_region: Region | None, out_region: Region):
        self.g, self.a, self.b = g, a, b
        self.plan = g.region_plan(a, b, out_region)
        self.out_region = out_region
        held = in_region or Region.full(g.tensor_shape(a))
        if not held.contains(self.plan.input_region):
            raise PlanError(f"tile {out_region.to_list()} needs input region "
                            f"{self.plan.input_region.to_list()}, the task holds "
                            f"{held.to_list()}")
        self.env: dict[int, tuple[torch.Tensor, Region]] = {g.producer(a): (x, held)}
        self._proto = x
        self.phase = 0
        self.n_phases = self.plan.n_phases
        plan, level = self.plan, self.plan.level
        todo = [i for i in range(a, b)
                if i in plan.need or i in plan.whole or g.roles[i] == REDUCE]
        self.order: list[list[int]] = [[] for _ in range(self.n_phases)]
        for i in todo:
            p = level[i] - 1 if g.roles[i] == REDUCE else level[i]
            self.order[p].append(i)
        self.uses: dict[int, int] = {}
        for i in todo:
            if g.roles[i] == REDUCE:
                continue
            for s in g.ops[i].inputs:
                self.uses[s] = self.uses.get(s, 0) + 1
        for i in todo:
            if g.roles[i] == REDUCE:
                s = g.ops[i].inputs[0]
                self.uses[s] = self.uses.get(s, 0) + 1

    @property
    def done(self) -> bool:
        return self.phase >= self.n_phases

    def exchange_ops(self) -> list[int]:
        """Reduce ops whose partials the current phase produces."""
        return [i for i in self.order[self.phase] if self.g.roles[i] == REDUCE] \
            if self.phase < self.n_phases else []

    @torch.no_grad()
    def step(self) -> "Partials | torch.Tensor":
        if self.done:
            raise PlanError("this tile has run all its phases")
        g, env, plan = self.g, self.env, self.plan
        partials: Partials = {}
        for i in self.order[self.phase]:
            op = g.ops[i]
            role = g.roles[i]
            if role == REDUCE:
                s = op.inputs[0]
                own = plan.owned[i]
                if own.is_empty():
                    partials[i] = op.rule.reduce.identity(g._shape(s), self._proto)
                else:
                    t, held = env[s]
                    partials[i] = op.rule.reduce.partial(crop(t, held, own))
                self._used(s)
                continue
            if role == VECTOR:
                y = op.call(*(env[s][0] for s in op.inputs))
                env[i] = (y, _region_of(y))
            else:
                r = plan.need[i]
                if r.is_empty():
                    y = empty_tile(self._proto, op.out_shape, op.hw, r)
                else:
                    y = op.rule.compute([env[s] for s in op.inputs], r)
                env[i] = (y, r)
            for s in op.inputs:
                self._used(s)
        if self.phase == self.n_phases - 1:
            self.phase += 1
            return env[self.b - 1][0]
        return partials

    def _used(self, s: int) -> None:
        n = self.uses.get(s, 0) - 1
        self.uses[s] = n
        if n <= 0 and s != self.b - 1:
            self.env.pop(s, None)

    def give(self, combined: dict[int, torch.Tensor]) -> None:
        """The exchange's combined values (reduce op -> the op's exact output)."""
        for i, v in combined.items():
            self.env[i] = (v, _region_of(v))
        self.phase += 1


def combine(g: ModelGraph, tiles_partials: Sequence[Partials]) -> dict[int, torch.Tensor]:
    """Every reduce op's exact value from all tiles' partials, taken in tile order (so
    every tile that combines the same partials gets bit-identical values)."""
    if not tiles_partials:
        raise PlanError("an exchange needs the partials of at least one tile")
    out: dict[int, torch.Tensor] = {}
    for i in tiles_partials[0]:
        parts = [p[i] for p in tiles_partials if p.get(i) is not None]
        if len(parts) == 0:
            raise PlanError(f"no tile owns any part of the map reduced by op "
                            f"{g.ops[i].name}: the stage's tiles do not cover its output")
        out[i] = g.ops[i].rule.reduce.combine(parts)
    return out


def pack(g: ModelGraph, ops: Sequence[int], partials: Partials) -> torch.Tensor:
    """One exchange's partials as one flat tensor (ops in the given order): the piece a
    task sends to each peer."""
    return torch.cat([partials[i].reshape(-1) for i in ops]) if ops else torch.zeros(0)


def unpack(g: ModelGraph, ops: Sequence[int], flat: torch.Tensor) -> Partials:
    """The inverse of ``pack``; the sizes come from the graph, so a malformed piece is
    refused (PlanError) rather than misread."""
    out: Partials = {}
    at = 0
    for i in ops:
        op = g.ops[i]
        shape = [1 if d in op.rule.reduce.dims else int(n)
                 for d, n in enumerate(g._shape(op.inputs[0]))]
        n = 1
        for v in shape:
            n *= v
        if at + n > flat.numel():
            raise PlanError(f"a partials piece of {flat.numel()} values is too short for "
                            f"reduce op {op.name}")
        out[i] = flat.reshape(-1)[at:at + n].reshape(shape)
        at += n
    if at != flat.numel():
        raise PlanError(f"a partials piece holds {flat.numel()} values, expected {at}")
    return out


def run_stage_phased(g: ModelGraph, a: int, b: int,
                     tiles: Sequence[tuple[torch.Tensor, Region | None, Region]]
                     ) -> list[torch.Tensor]:
    """All tiles of one stage in-process: phase by phase, exchanging partials."""
    runs = [TileRun(g, a, b, x, in_r, out_r) for x, in_r, out_r in tiles]
    n = runs[0].n_phases if runs else 1
    for _ in range(n - 1):
        combined = combine(g, [r.step() for r in runs])
        for r in runs:
            r.give(combined)
    return [r.step() for r in runs]


__all__ = ["TileRun", "combine", "pack", "unpack", "run_stage_phased", "MAP", "VECTOR",
           "REDUCE"]
