"""Tile grids, tile validation, stage construction and hand-built plans."""
from __future__ import annotations

import logging
from typing import Sequence

from meshdl.errors import PlanError
from meshdl.graph.model_graph import ModelGraph
from meshdl.graph.plan import Plan, ReducePoint, Region, Stage, Task

log = logging.getLogger(__name__)


def split_even(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes differing by at most one, larger first."""
    if parts < 1 or parts > total:
        raise PlanError(f"cannot split {total} rows/columns into {parts} non-empty parts; "
                        f"use between 1 and {total} parts")
    q, r = divmod(total, parts)
    return [q + 1 if i < r else q for i in range(parts)]


def split_ratio(total: int, ratios: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``total`` in proportion to ``ratios``, each part >= 1
    (zero ratios get zero). Sums exactly to ``total``."""
    if not ratios or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise PlanError(f"row ratios must be non-negative with a positive sum, got {ratios}")
    active = [i for i, r in enumerate(ratios) if r > 0]
    if len(active) > total:
        raise PlanError(f"{len(active)} parts cannot each get a row of {total}; "
                        "use fewer parts")
    s = float(sum(ratios))
    exact = [total * r / s for r in ratios]
    sizes = [int(e) for e in exact]
    for i in active:            # every active part gets at least one row
        if sizes[i] == 0:
            sizes[i] = 1
    while sum(sizes) > total:   # take back from the parts furthest above their share
        i = max((i for i in active if sizes[i] > 1), key=lambda i: sizes[i] - exact[i])
        sizes[i] -= 1
    order = sorted(active, key=lambda i: exact[i] - sizes[i], reverse=True)
    k = 0
    while sum(sizes) < total:
        sizes[order[k % len(order)]] += 1
        k += 1
    return sizes


def _spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, at = [], 0
    for n in sizes:
        out.append((at, at + n))
        at += n
    return out


def grid_regions(shape: Sequence[int], rows: int, cols: int) -> list[Region]:
    """An even rows x cols grid over an (N, C, H, W) map, row-major."""
    h, w = int(shape[-2]), int(shape[-1])
    if rows > h or cols > w:
        raise PlanError(f"a {rows}x{cols} tile grid does not fit a {h}x{w} feature map; "
                        f"use at most {h} rows and {w} columns")
    return [Region(h0, h1, w0, w1) for h0, h1 in _spans(split_even(h, rows))
            for w0, w1 in _spans(split_even(w, cols))]


def row_regions(shape: Sequence[int], ratios: Sequence[float]) -> list[Region]:
    """Full-width row bands in proportion to ``ratios`` (zero-ratio parts are dropped)."""
    h, w = int(shape[-2]), int(shape[-1])
    return [Region(h0, h1, 0, w) for h0, h1 in _spans(split_ratio(h, ratios)) if h1 > h0]


def validate_tiles(shape: Sequence[int], tiles: Sequence[Region]) -> None:
    """Tiles must be non-empty, inside the map, pairwise disjoint, and cover it."""
    full = Region.full(shape)
    for t in tiles:
        if t.is_empty():
            raise PlanError(f"tile {t.to_list()} is empty; every tile needs at least one "
                            "row and one column")
        if not full.contains(t):
            raise PlanError(f"tile {t.to_list()} lies outside the {full.rows}x{full.cols} "
                            "feature map; keep rows in [0, H) and columns in [0, W)")
    for i, t in enumerate(tiles):
        for u in tiles[i + 1:]:
            if t.intersect(u) is not None:
                raise PlanError(f"tiles {t.to_list()} and {u.to_list()} overlap; each output "
                                "element must belong to exactly one tile")
    covered = sum(t.area for t in tiles)
    if covered != full.area:
        raise PlanError(f"tiles cover {covered} of the {full.area} output positions of the "
                        f"{full.rows}x{full.cols} map: some are missing")


def make_stage(g: ModelGraph, index: int, a: int, b: int,
               tiles: Sequence[tuple[Region | None, str]]) -> Stage:
    """A stage of ops [a, b) with one task per (tile, device); input regions and FLOPs
    come from the region algebra. A single ``None`` tile runs the range whole."""
    if len(tiles) == 1 and tiles[0][0] is None:
        return Stage(index, a, b, g.is_spatial(a, b),
                     [Task(f"s{index}t0", index, tiles[0][1], None, None,
                           g.flops_between(a, b))])
    if not g.is_spatial(a, b):
        raise PlanError(f"stage {index} (ops [{a}, {b})) cannot be tiled: {g.why_not_spatial(a, b)}. "
                        "Give it one whole tile")
    regions = [t for t, _ in tiles]
    if any(r is None for r in regions):
        raise PlanError(f"stage {index}: a whole (None) tile cannot be mixed with others")
    validate_tiles(g.tensor_shape(b), regions)
    tasks = []
    for n, (r, device) in enumerate(tiles):
        rp = g.region_plan(a, b, r)
        tasks.append(Task(f"s{index}t{n}", index, str(device), r, rp.input_region, rp.flops))
    reduces = [ReducePoint(p, tuple(ops), nb) for p, ops, nb in g.reduce_points(a, b)]
    return Stage(index, a, b, True, tasks, reduces)


def _fit_grid(grid, shape, p, q, notes) -> tuple[int, int]:
    """A grid no larger than the map (a 4x3 grid on a 2x2 map becomes 2x2)."""
    rows, cols = int(grid[0]), int(grid[1])
    if rows < 1 or cols < 1:
        raise PlanError(f"grid {tuple(grid)} must have at least one row and one column")
    h, w = int(shape[-2]), int(shape[-1])
    if rows > h or cols > w:
        notes.append(f"ops [{p}, {q}): a {rows}x{cols} grid does not fit the {h}x{w} map; "
                     f"using {min(rows, h)}x{min(cols, w)}")
    return min(rows, h), min(cols, w)


def _fit_ratios(ratios, shape, p, q, notes) -> list[float]:
    """Row ratios with at most H non-zero parts: the smallest parts are dropped."""
    h = int(shape[-2])
    active = sorted((i for i, r in enumerate(ratios) if r > 0), key=lambda i: -ratios[i])
    if len(active) <= h:
        return list(ratios)
    keep = set(active[:h])
    notes.append(f"ops [{p}, {q}): {len(active)} row parts do not fit {h} rows; "
                 f"the {len(active) - h} smallest are dropped")
    return [r if i in keep else 0.0 for i, r in enumerate(ratios)]


def manual_plan(g: ModelGraph, cuts: Sequence[int] = (),
                grids: Sequence[tuple[int, int] | None] | None = None,
                row_ratios: Sequence[Sequence[float] | None] | None = None,
                source: str = "d0", sink: str = "d0") -> Plan:
    """A plan by hand. Stage k ends at ``g.cut_points[cuts[k]]`` (the last at the model
    end); its output is split into ``grids[k] = (rows, cols)`` tiles, or into row bands
    by ``row_ratios[k]``; tile n runs on device ``"d{n}"`` (row band n on the device of
    ratio n). A grid larger than the map shrinks to fit, with a note.

    Parts of a stage that cannot be tiled (a classifier head, an op meshdl does not
    understand spatially) run whole on ``d0``, with a note in ``plan.notes``.
    """
    cuts = list(cuts)
    if any(not isinstance(c, int) or c < 0 or c >= len(g.cut_points) for c in cuts):
        raise PlanError(f"cuts {cuts} must index g.cut_points (0..{len(g.cut_points) - 1})")
    if any(c2 <= c1 for c1, c2 in zip(cuts, cuts[1:])):
        raise PlanError(f"cuts {cuts} must be strictly increasing")
    bounds = [0, *(g.cut_points[c] for c in cuts), len(g.ops)]
    n_stages = len(bounds) - 1
    for name, spec in (("grids", grids), ("row_ratios", row_ratios)):
        if spec is not None and len(spec) != n_stages:
            raise PlanError(f"{name} has {len(spec)} entries for {n_stages} stages "
                            f"(cuts={cuts}); give one per stage")
    stages: list[Stage] = []
    notes: list[str] = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        ratios = row_ratios[k] if row_ratios is not None else None
        grid = grids[k] if grids is not None else None
        for p, q, spatial in g.split_ranges(a, b):
            shape = g.tensor_shape(q)
            regions: list[Region | None] = [None]
            devices = ["d0"]
            if spatial and ratios is not None:
                fitted = _fit_ratios(ratios, shape, p, q, notes)
                regions = row_regions(shape, fitted)
                devices = [f"d{i}" for i, r in enumerate(fitted) if r > 0]
            elif spatial and grid is not None:
                regions = grid_regions(shape, *_fit_grid(grid, shape, p, q, notes))
                devices = [f"d{n}" for n in range(len(regions))]
            if not spatial and (ratios is not None or (grid and tuple(grid) != (1, 1))):
                notes.append(f"ops [{p}, {q}) run whole on d0: {g.why_not_spatial(p, q)}")
            tiles = list(zip(regions, devices))
            stages.append(make_stage(g, len(stages), p, q, tiles))
    for n in notes:
        log.info("%s: %s", g.name, n)
    return Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops), stages=stages,
                source=source, sink=sink, strategy="manual", notes=notes)


def check_plan(plan: Plan, g: ModelGraph) -> None:
    """Refuse a plan that does not fit this graph or does not compute the whole model."""
    if plan.num_ops != len(g.ops) or tuple(plan.input_shape) != g.input_shape:
        raise PlanError(f"plan was made for {plan.model} with {plan.num_ops} ops and input "
                        f"{tuple(plan.input_shape)}, not {g.name} with {len(g.ops)} ops and "
                        f"input {g.input_shape}; re-plan for this model")
    if not plan.stages:
        raise PlanError("plan has no stages")
    at = 0
    for k, s in enumerate(plan.stages):
        if s.index != k or s.start != at or s.end <= s.start:
            raise PlanError(f"stage {k} covers [{s.start}, {s.end}) but must start at {at} "
                            "and be non-empty; stages must chain from 0 to the model end")
        g._check_position(s.start)
        g._check_position(s.end)
        if not s.tasks:
            raise PlanError(f"stage {k} has no tasks")
        regions = [t.out_region for t in s.tasks]
        if len(s.tasks) == 1 and regions[0] is None:
            at = s.end
            continue
        if any(r is None for r in regions):
            raise PlanError(f"stage {k} mixes whole and tiled tasks")
        validate_tiles(g.tensor_shape(s.end), regions)
        want = [(p, list(ops)) for p, ops, _ in g.reduce_points(s.start, s.end)]
        if [(r.phase, list(r.ops)) for r in s.reduces] != want:
            raise PlanError(f"stage {k} (ops [{s.start}, {s.end})) must list the reduce "
                            f"points {want} of its range, it lists "
                            f"{[(r.phase, list(r.ops)) for r in s.reduces]}; rebuild it "
                            "with meshdl.graph.make_stage")
        for t in s.tasks:
            need = g.input_region(s.start, s.end, t.out_region)
            if t.in_region is None or not t.in_region.contains(need):
                raise PlanError(f"task {t.id} holds input region "
                                f"{None if t.in_region is None else t.in_region.to_list()} "
                                f"but its tile needs {need.to_list()}")
        at = s.end
    if at != len(g.ops):
        raise PlanError(f"plan stops at position {at}; the model ends at {len(g.ops)}")


__all__ = ["split_even", "split_ratio", "grid_regions", "row_regions", "validate_tiles",
           "make_stage", "manual_plan", "check_plan"]
