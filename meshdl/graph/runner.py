"""Running plans: the task, assembly and stitching code shared by ``meshdl.execute``
and the mesh nodes."""
from __future__ import annotations

from typing import Iterable

import torch

from meshdl.errors import PlanError
from meshdl.graph.model_graph import ModelGraph
from meshdl.graph.plan import Plan, Region, Task
from meshdl.graph.regions import crop
from meshdl.graph.tiling import check_plan


def assemble(shape: tuple[int, ...], want: Region | None,
             pieces: Iterable[tuple[Region | None, torch.Tensor]]) -> torch.Tensor:
    """Build region ``want`` of a tensor of ``shape`` from disjoint pieces.

    Each piece is (its region, its data). A whole (None) want takes the single whole
    piece, or stitches tiles that cover the map. Missing data raises PlanError.
    """
    pieces = list(pieces)
    if len(shape) != 4:
        if len(pieces) != 1 or pieces[0][0] is not None:
            raise PlanError(f"a {len(shape)}-D tensor travels whole; got {len(pieces)} pieces")
        return pieces[0][1]
    want = want or Region.full(shape)
    if want.is_empty():          # a tile that reads only padding needs no data
        return torch.empty((*shape[:-2], max(0, want.rows), max(0, want.cols)))
    if len(pieces) == 1:
        r, data = pieces[0]
        r = r or Region.full(shape)
        if r == want:
            return data
        if r.contains(want):
            return crop(data, r, want)
    out = None
    covered = 0
    for r, data in pieces:
        r = r or Region.full(shape)
        part = r.intersect(want)
        if part is None:
            continue
        if out is None:
            out = data.new_empty((*data.shape[:-2], want.rows, want.cols))
        dst = part.relative_to(want)
        out[..., dst.h0:dst.h1, dst.w0:dst.w1] = crop(data, r, part)
        covered += part.area
    if out is None or covered != want.area:
        raise PlanError(f"pieces cover {covered} of the {want.area} positions of region "
                        f"{want.to_list()}: a producer's piece is missing")
    return out


def run_task(g: ModelGraph, plan: Plan, task: Task, x: torch.Tensor) -> torch.Tensor:
    """Compute ``task`` from ``x``, which holds its stage input's ``task.in_region``."""
    stage = plan.stages[task.stage]
    return g.run_range(stage.start, stage.end, x, task.in_region, task.out_region)


def task_input(g: ModelGraph, plan: Plan, task: Task,
               outputs: dict[str, torch.Tensor], source: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Gather a task's input region from the model input or its producers' outputs."""
    stage = plan.stages[task.stage]
    shape = g.tensor_shape(stage.start)
    if task.stage == 0:
        if source is None:
            raise PlanError("stage 0 needs the model input")
        return assemble(shape, task.in_region, [(None, source)])
    pieces = []
    for p, piece in plan.producers(task):
        if p.id not in outputs:
            raise PlanError(f"task {task.id} needs the output of {p.id}, which is missing")
        data = outputs[p.id]
        if piece is not None and p.out_region is not None:
            data = crop(data, p.out_region, piece)
        pieces.append((piece if p.out_region is not None else None, data))
    return assemble(shape, task.in_region, pieces)


def stitch(g: ModelGraph, plan: Plan, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model output from the last stage's task outputs."""
    last = plan.stages[-1]
    pieces = [(t.out_region, outputs[t.id]) for t in last.tasks]
    return assemble(g.tensor_shape(last.end), None, pieces)


@torch.no_grad()
def execute(plan: Plan, g: ModelGraph, x: torch.Tensor) -> torch.Tensor:
    """Run every task of ``plan`` in-process, in stage order, and stitch the answer."""
    check_plan(plan, g)
    if tuple(x.shape) != g.input_shape:
        raise PlanError(f"input shape {tuple(x.shape)} is not the traced {g.input_shape}")
    outputs: dict[str, torch.Tensor] = {}
    for stage in plan.stages:
        if stage.phases > 1:       # tiles exchange partials of global reductions
            from meshdl.graph.phased import run_stage_phased
            ys = run_stage_phased(g, stage.start, stage.end, [
                (task_input(g, plan, t, outputs, x), t.in_region, t.out_region)
                for t in stage.tasks])
            outputs.update({t.id: y for t, y in zip(stage.tasks, ys)})
        for task in stage.tasks if stage.phases == 1 else ():
            outputs[task.id] = run_task(g, plan, task, task_input(g, plan, task, outputs, x))
        if stage.index > 0:     # the previous stage's outputs are no longer needed
            for t in plan.stages[stage.index - 1].tasks:
                outputs.pop(t.id, None)
    return stitch(g, plan, outputs)
