"""The baselines the seeds compare against: MoDNN, DeepSlicing (as DISNET's seed code
implements them) and DeepThings (fused tile partitioning).

MoDNN: the source plus its first <= 6 neighbours (natural id order; option
``max_neighbours``), equal row split, scatter and gather around EVERY layer: one stage
per layer (a conv with its batchnorm/activation ops, or a pool; for graphs without that
structure, every cut point of the tileable part), equal row tiles on those devices.
DeepSlicing: the same devices and equal split, communication only at stage boundaries
(VGG16: after feature layers 4, 9, 12 and 18; other graphs: 4 ranges of roughly equal
FLOPs). In both, the gather to the input node and the scatter from it are expressed in
the plan itself: tile ownership rotates by one device from stage to stage (so every tile
crosses the mesh between stages, not only the halos), and every transfer between
workers is routed through the source (``plan.routes[a>b] = [a, ..., source, ..., b]``),
so the shared simulator charges the gather and the scatter hops. The classifier head
runs whole on the source.

DeepThings: an N x M grid (option ``grid``, default by device count: 2x2 up to 5
devices, 3x2 up to 8, 3x3 beyond) over the fused early layers (option ``fused_layers``:
the number of cut points of the first spatial run to fuse; default: up to roughly half
the model's FLOPs), each tile computed end to end with its halo (fused tile
partitioning); tiles go to the source's nearest devices, fastest first (fewer devices
than tiles: round robin); the rest of the model runs whole on the fastest device within
one hop of the sink.
"""
from __future__ import annotations

import math

from meshdl.errors import PlanError
from meshdl.graph import ModelGraph
from meshdl.graph.plan import Plan, Stage
from meshdl.planner.base import PlanRequest, register
from meshdl.planner.data.seeds import DEEPSLICING_VGG_BOUNDARIES, MODNN_MAX_NEIGHBOURS
from meshdl.planner.disnet_common import (add_range, equal_flop_bounds, grid_tiles,
                                          natural_key, row_tiles, vgg_feature_bounds)

# ops that belong to the layer of the op before them (a conv's BN and activation)
_ATTACHED = {"batchnorm", "relu", "relu6", "hardtanh", "sigmoid", "tanh", "silu",
             "hardswish", "gelu", "dropout", "clamp"}


def seed_devices(mesh, source: str, max_neighbours: int = MODNN_MAX_NEIGHBOURS) -> list[str]:
    """The source plus its first ``max_neighbours`` neighbours (natural id order)."""
    nbrs = sorted(mesh.neighbours(source), key=natural_key)[:max(0, int(max_neighbours))]
    return [source, *nbrs]


def layer_bounds(g: ModelGraph) -> list[int]:
    """[0, ..., end of the tileable part]: one range per layer (a conv with the
    batchnorm/activation ops after it, or any other op that ends at a cut point)."""
    if not g.spatial_runs:
        raise PlanError(f"{g.name} has no tileable layers; MoDNN/DeepSlicing split rows of "
                        "feature maps. Use 'dsl' or 'distcnn' for this model")
    end = g.spatial_runs[-1][1]
    out = [0]
    for p in g.positions:
        if 0 < p < end and g.ops[p].kind not in _ATTACHED:
            out.append(p)
    out.append(end)
    return out


def _rotating_plan(g: ModelGraph, mesh, req: PlanRequest, bounds: list[int],
                   strategy: str) -> Plan:
    devices = seed_devices(mesh, req.source,
                           req.options.get("max_neighbours", MODNN_MAX_NEIGHBOURS))
    n = len(devices)
    stages: list[Stage] = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        order = devices[k % n:] + devices[:k % n]
        add_range(g, stages, a, b, lambda q, o=order: row_tiles(g, q, o, [1.0] * n),
                  req.source)
    if bounds[-1] < len(g.ops):
        add_range(g, stages, bounds[-1], len(g.ops), lambda q: [(None, req.source)],
                  req.source)
    plan = Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops), stages=stages,
                source=req.source, sink=req.sink, strategy=strategy,
                meta={strategy: {"devices": devices, "stage_bounds": bounds}})
    _route_via(plan, mesh, req.source)
    return plan


def _route_via(plan: Plan, mesh, hub: str) -> None:
    """Route every worker-to-worker transfer through ``hub`` (gather, then scatter)."""
    for s in plan.stages[1:]:
        for t in s.tasks:
            for p, _ in plan.producers(t):
                a, b = p.device, t.device
                if a == b or hub in (a, b):
                    continue
                plan.routes[f"{a}>{b}"] = mesh.route(a, hub)[:-1] + mesh.route(hub, b)


@register("modnn", "MoDNN baseline: source + <= 6 neighbours, equal rows, gather/scatter "
          "at the source around every layer")
def plan_modnn(g: ModelGraph, mesh, req: PlanRequest) -> Plan:
    return _rotating_plan(g, mesh, req, layer_bounds(g), "modnn")


def deepslicing_bounds(g: ModelGraph) -> list[int]:
    vgg = vgg_feature_bounds(g, DEEPSLICING_VGG_BOUNDARIES)
    return vgg if vgg is not None else equal_flop_bounds(g, 4)


@register("deepslicing", "DeepSlicing baseline: MoDNN's devices and equal split, "
          "communication only at 4 stage boundaries")
def plan_deepslicing(g: ModelGraph, mesh, req: PlanRequest) -> Plan:
    return _rotating_plan(g, mesh, req, deepslicing_bounds(g), "deepslicing")


def default_grid(n_devices: int) -> tuple[int, int]:
    if n_devices <= 5:
        return (2, 2)
    if n_devices <= 8:
        return (3, 2)
    return (3, 3)


def fused_end(g: ModelGraph, fused_layers: int | None) -> int:
    """End position of DeepThings' fused range inside the first spatial run."""
    if not g.spatial_runs:
        raise PlanError(f"{g.name} has no tileable layers to fuse; DeepThings needs "
                        "convolutional layers at the model input")
    a, b = g.spatial_runs[0]
    inner = [p for p in g.positions if a < p <= b]
    if fused_layers is not None:
        k = int(fused_layers)
        if k < 1:
            raise PlanError(f"fused_layers must be >= 1, got {fused_layers}")
        return inner[min(k, len(inner)) - 1]
    half = g.flops / 2.0
    return min(inner, key=lambda p: (abs(g.flops_between(0, p) - half), p))


@register("deepthings", "DeepThings: fused tile partitioning of the early conv layers "
          "on an N x M grid, the rest on one device")
def plan_deepthings(g: ModelGraph, mesh, req: PlanRequest) -> Plan:
    opts = req.options
    grid = opts.get("grid") or default_grid(len(mesh.devices))
    if isinstance(grid, str):                      # "3x2" from the command line
        grid = grid.lower().split("x")
    try:
        rows, cols = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise PlanError(f"grid must be (rows, cols) or 'RxC', got {grid!r}") from None
    if rows < 1 or cols < 1:
        raise PlanError(f"grid must be (rows, cols) >= 1, got {(rows, cols)}")
    hops = {d: h for d, h in mesh.hop_counts()[req.source].items()}
    near = sorted(hops, key=lambda d: (hops[d], -mesh.devices[d].flops, natural_key(d)))
    workers = near[:rows * cols]
    end = fused_end(g, opts.get("fused_layers"))
    sink_side = [req.sink, *mesh.neighbours(req.sink)]
    tail = min(sink_side, key=lambda d: (-mesh.devices[d].flops, d != req.sink,
                                         natural_key(d)))
    stages: list[Stage] = []
    add_range(g, stages, 0, end, lambda q: grid_tiles(g, q, rows, cols, workers),
              req.source)
    if end < len(g.ops):
        add_range(g, stages, end, len(g.ops), lambda q: [(None, tail)], tail)
    return Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops), stages=stages,
                source=req.source, sink=req.sink, strategy="deepthings",
                meta={"deepthings": {"grid": [rows, cols], "workers": workers,
                                     "fused_end": end, "tail": tail,
                                     "fused_flops_share": g.flops_between(0, end) / g.flops
                                     if g.flops else math.nan}})
