"""DISNET (Samikwa, Di Maio, Braun; IEEE IoT Journal 2024): micro-splits along a path.

The heuristic, as the seed's code computes it (its bugs left out):

1. Path. Among simple paths source -> sink, score each hop u -> v as
   ``(w_uv / 5) * f(Ptx_u) + comp_u * f(Pcomp_u)``, divide the sum by the number of
   nodes on the path (the seed's "amortised cost", ``total / len(path)``) and keep the
   first path with the strictly highest score. ``comp`` is the device's GFLOP/s (the
   seed's node weight 1..10), ``w`` the link's Mbit/s (its edge weight 10..50).
   The seed enumerates every simple path (exponential); here enumeration is bounded:
   at most ``max_hops`` hops (option; default: unbounded on meshes of <= 12 devices,
   else the BFS distance + 4) and at most ``max_paths`` paths (option, default 100000)
   in a deterministic depth-first order (neighbours in natural id order); when the cap
   is hit the best path seen is kept and ``meta["disnet"]["paths_truncated"]`` is True.
2. Execution points. Stage i may use up to k_i parallel parts. Starting at the source
   (path index 0), each stage scores every path node p from the current execution point
   on: the mean of the top-k_i values of ``comp_n * f(Pcomp_n)`` over p and its
   neighbours (the mean of all of them when there are fewer than k_i). It moves to the
   first best p (strictly better than earlier candidates): moves only go forward along
   the path, staying is allowed. (The seed scores the LAST neighbour's compute weighted
   by p's power instead of p's own value; that bug is not copied.)
3. Devices. p plus its neighbours, the top k_i by compute rate (ties: natural id order).
   Split ratio = their compute rates. Rows of the stage output are divided in that
   ratio by largest remainder, so they sum to the height (the seed loses rows).
4. Energy sensitivity ``es`` in [0, 1]: every score is multiplied by
   ``f(P) = 1 - (1 - es) * P_normalised``; es = 1 ignores energy. ``es`` comes from
   option ``es``; when it is not given, ``alpha`` is used (both mean 1 = latency only,
   0 = energy matters most).

Power. ``P_normalised`` is a device's power divided by the L2 norm of the vector of the
power classes, as the seed does with its 3 groups: compute [3.8, 2.2, 1.2] W, transmit
[1.0, 0.8, 1.1] W. ``power_grouping="intended"`` (default) uses each device's own
figures (the classes are the distinct values in the mesh; on the DISNET meshes this is
the seed's intended grouping, index <= 3, <= 7, <= 10). ``power_grouping="seed"`` uses
the grouping the seed's code actually applies (nodes 0-3 group 0, 4-9 group 1: an
operator-precedence bug), read from each device's ``meta["groups"]["seed"]``; the
golden scenario depends on it.

Parts per stage: option ``parts`` (list), else the seed's table by device count
(2: [2,2,2,2] ... 10: [6,5,4,3], 11: [6,6,4,3], 12: [7,7,4,3]); a mesh with more than 12
devices uses the 12-device row (the seed has no data beyond; more parts give ever
smaller tiles), one device uses [1,1,1,1].

Stages. VGG16(-BN) (detected: 18 feature layers, 13 conv blocks + 5 pools) uses the
seed's feature-layer ranges [0,4) [4,9) [9,14) [14,18); any other graph has its
tileable part (up to the end of its last spatial run) cut at cut points into 4 ranges
of roughly equal FLOPs. Everything after (the classifier head; DISNET appends the FC
layers to the last stage) runs whole on the last stage's execution point, as do parts
of a range that cannot be tiled.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import networkx as nx

from meshdl.errors import PlanError
from meshdl.graph import ModelGraph
from meshdl.graph.plan import Plan, Stage
from meshdl.graph.tiling import split_ratio
from meshdl.planner.base import PlanRequest, register
from meshdl.planner.data.seeds import (DISNET_COMPUTE_W, DISNET_PARTS_BY_DEVICES,
                                       DISNET_TX_W, DISNET_VGG_STAGES)
from meshdl.planner.disnet_common import (add_range, equal_flop_bounds, natural_key,
                                          row_tiles, vgg_feature_bounds)

GROUPINGS = ("intended", "seed")
DEFAULT_MAX_PATHS = 100_000


@dataclass
class DisnetDecisions:
    """What the DISNET heuristic decided; plain data (ids as strings)."""

    path: list[str]
    points: list[str]                  # execution point (device) per stage
    devices: list[list[str]]           # devices per stage, fastest first
    ratios: list[list[float]]          # their compute rates (GFLOP/s)
    path_score: float
    paths_seen: int
    paths_truncated: bool
    parts: list[int]
    es: float
    power_grouping: str
    point_scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parts_for(n_devices: int) -> list[int]:
    """The seed's max parallel parts per stage for a mesh of ``n_devices``."""
    if n_devices <= 1:
        return [1, 1, 1, 1]
    n = min(n_devices, max(DISNET_PARTS_BY_DEVICES))
    return list(DISNET_PARTS_BY_DEVICES[n])


def power_factors(mesh, es: float, power_grouping: str = "intended"
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Per device (f(Pcomp), f(Ptx)) with f(P) = 1 - (1 - es) * P_normalised."""
    if power_grouping not in GROUPINGS:
        raise PlanError(f"power_grouping must be one of {GROUPINGS}, got {power_grouping!r}")
    if not 0.0 <= es <= 1.0:
        raise PlanError(f"energy sensitivity es must be in [0, 1] (1 ignores energy), "
                        f"got {es}")
    if power_grouping == "seed":
        comp_v, tx_v = _unit(DISNET_COMPUTE_W), _unit(DISNET_TX_W)
        pc, pt = {}, {}
        for d in mesh.devices.values():
            grp = (d.meta.get("groups") or {}).get("seed")
            if grp is None:
                raise PlanError(f"power_grouping='seed' needs each device's seed power group "
                                f"in meta['groups']['seed'] (device {d.id!r} has none); the "
                                "disnet-net* topologies carry it. Use power_grouping="
                                "'intended' on other meshes")
            pc[d.id], pt[d.id] = comp_v[int(grp)], tx_v[int(grp)]
    else:
        pc = _class_normalised({d.id: d.power.compute_w for d in mesh.devices.values()})
        pt = _class_normalised({d.id: d.power.tx_w for d in mesh.devices.values()})
    fc = {k: 1.0 - (1.0 - es) * v for k, v in pc.items()}
    ft = {k: 1.0 - (1.0 - es) * v for k, v in pt.items()}
    return fc, ft


def _unit(v: Sequence[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n if n > 0 else 0.0 for x in v]


def _class_normalised(watts: dict[str, float]) -> dict[str, float]:
    classes = sorted(set(watts.values()))
    n = math.sqrt(sum(x * x for x in classes))
    return {k: (w / n if n > 0 else 0.0) for k, w in watts.items()}


def _sorted_graph(mesh) -> nx.Graph:
    """The mesh graph with adjacency in natural id order (deterministic enumeration)."""
    g = nx.Graph()
    g.add_nodes_from(sorted(mesh.devices, key=natural_key))
    for a in sorted(mesh.devices, key=natural_key):
        for b in sorted(mesh.graph.neighbors(a), key=natural_key):
            g.add_edge(a, b)
    return g


def _select_path(mesh, g: nx.Graph, source: str, sink: str, fc, ft,
                 max_hops: int | None, max_paths: int) -> tuple[list[str], float, int, bool]:
    comp = {d: mesh.devices[d].flops / 1e9 for d in mesh.devices}
    best, best_score, seen = None, 0.0, 0
    for path in nx.all_simple_paths(g, source, sink, cutoff=max_hops):
        if seen >= max_paths:
            return best, best_score, seen, True
        seen += 1
        total = sum(mesh.link(u, v).bandwidth_bps / 1e6 / 5.0 * ft[u] + comp[u] * fc[u]
                    for u, v in zip(path, path[1:]))
        score = total / len(path)
        if best is None or score > best_score:
            best, best_score = list(path), score
    if best is None:
        raise PlanError(f"no path from {source!r} to {sink!r} within {max_hops} hops; raise "
                        "option max_hops or connect the devices")
    return best, best_score, seen, False


def _neighbourhood(g: nx.Graph, p: str) -> list[str]:
    return [p, *g.neighbors(p)]


def disnet_decisions(mesh, n_stages_parts: Sequence[int], es: float, source: str, sink: str,
                     power_grouping: str = "intended", max_hops: int | None = None,
                     max_paths: int = DEFAULT_MAX_PATHS,
                     seed_last_neighbour: Mapping[str, str] | None = None
                     ) -> DisnetDecisions:
    """DISNET's path, execution points, devices and split ratios (steps 1-3 of the
    module docstring) for stages with ``n_stages_parts`` max parallel parts each.

    ``seed_last_neighbour`` (reproduction only) re-enacts the seed's scoring bug: in
    p's neighbourhood score, p's own slot holds the compute of p's last neighbour in
    the seed's (lost) adjacency order, weighted by p's power factor. The seed's
    energy-sensitivity sweep depends on it (see ``data.seeds.DISNET_ES_SWEEP``)."""
    for role, dev in (("source", source), ("sink", sink)):
        if dev not in mesh.devices:
            raise PlanError(f"{role} {dev!r} is not a device of mesh {mesh.name!r}")
    if not n_stages_parts or any(int(k) < 1 for k in n_stages_parts):
        raise PlanError(f"parts per stage must be positive integers, got {n_stages_parts}")
    fc, ft = power_factors(mesh, es, power_grouping)
    g = _sorted_graph(mesh)
    if max_hops is None and len(mesh.devices) > 12:
        try:
            max_hops = nx.shortest_path_length(g, source, sink) + 4
        except nx.NetworkXNoPath:
            raise PlanError(f"{source!r} cannot reach {sink!r} in mesh {mesh.name!r}; "
                            "connect them") from None
    path, score, seen, truncated = _select_path(mesh, g, source, sink, fc, ft,
                                                max_hops, max_paths)
    comp = {d: mesh.devices[d].flops / 1e9 for d in mesh.devices}
    value = {d: comp[d] * fc[d] for d in mesh.devices}
    at, points, devices, ratios, pscores = 0, [], [], [], []
    for k in (int(k) for k in n_stages_parts):
        best_i, best_v = at, -math.inf
        for i in range(at, len(path)):
            vals = sorted((_slot_value(n, path[i], value, comp, fc, seed_last_neighbour)
                           for n in _neighbourhood(g, path[i])), reverse=True)[:k]
            v = sum(vals) / len(vals)
            if v > best_v:
                best_i, best_v = i, v
        at = best_i
        p = path[at]
        chosen = sorted(_neighbourhood(g, p), key=lambda n: (-comp[n], natural_key(n)))[:k]
        points.append(p)
        pscores.append(best_v)
        devices.append(chosen)
        ratios.append([comp[n] for n in chosen])
    return DisnetDecisions(path=path, points=points, devices=devices, ratios=ratios,
                           path_score=score, paths_seen=seen, paths_truncated=truncated,
                           parts=[int(k) for k in n_stages_parts], es=float(es),
                           power_grouping=power_grouping, point_scores=pscores)


def _slot_value(n: str, p: str, value, comp, fc, quirk) -> float:
    if quirk is None or n != p:
        return value[n]
    return comp[str(quirk[p])] * fc[p]


def disnet_stage_bounds(g: ModelGraph, n_stages: int = 4) -> list[int]:
    """[0, b1, ..., end of the tileable part]: the seed's VGG16 feature-layer stages, or
    ``n_stages`` ranges of roughly equal FLOPs for any other graph."""
    if n_stages == len(DISNET_VGG_STAGES):
        vgg = vgg_feature_bounds(g, [b for _, b in DISNET_VGG_STAGES])
        if vgg is not None:
            return vgg
    return equal_flop_bounds(g, n_stages)


def _es(req: PlanRequest) -> float:
    es = req.options.get("es")
    return float(req.alpha if es is None else es)


@register("disnet", "DISNET: best path, execution points with the strongest "
          "neighbourhoods, rows split by compute rate (seed heuristic)")
def plan_disnet(g: ModelGraph, mesh, req: PlanRequest) -> Plan:
    opts = req.options
    bounds = disnet_stage_bounds(g)
    n_stages = len(bounds) - 1
    parts = list(opts.get("parts") or parts_for(len(mesh.devices)))
    if len(parts) < n_stages:
        parts = parts + [parts[-1]] * (n_stages - len(parts))
    parts = parts[:n_stages]
    dec = disnet_decisions(mesh, parts, _es(req), req.source, req.sink,
                           power_grouping=opts.get("power_grouping", "intended"),
                           max_hops=opts.get("max_hops"),
                           max_paths=int(opts.get("max_paths", DEFAULT_MAX_PATHS)))
    stages: list[Stage] = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        devs, rat = dec.devices[i], dec.ratios[i]
        add_range(g, stages, a, b, lambda q, d=devs, r=rat: row_tiles(g, q, d, r),
                  dec.points[i])
    if bounds[-1] < len(g.ops):     # the head (FC layers) runs whole on the last point
        last = dec.points[-1]
        add_range(g, stages, bounds[-1], len(g.ops), lambda q: [(None, last)], last)
    meta = dec.to_dict()
    meta["stage_bounds"] = bounds
    meta["first_layer_rows"] = _first_layer_rows(g, dec.ratios[0])
    return Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops), stages=stages,
                source=req.source, sink=req.sink, strategy="disnet", meta={"disnet": meta})


def _first_layer_rows(g: ModelGraph, ratios: Sequence[float]) -> list[int]:
    """How the first op's output rows split in stage 0's ratio (the seed reports this)."""
    shape = g.ops[0].out_shape
    if len(shape) != 4:
        return []
    return split_ratio(int(shape[-2]), list(ratios)[: int(shape[-2])])
