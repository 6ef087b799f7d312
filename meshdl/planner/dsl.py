"""DSL, DNN Surgery Light (after Hu et al., INFOCOM 2019): one vertical split between an
edge device and a cloud device, chosen as a minimum s-t cut.

Graph: source "edge", sink "cloud", one vertex per block of the model's chain (the
ranges between consecutive cut positions; vertex 0 is the input, pinned to the edge).
``edge -> v`` has capacity = v's cloud time (cut when v runs in the cloud),
``v -> cloud`` = v's edge time (cut when v runs on the edge), ``v -> v+1`` = transfer
time of v's output (cut when v is on the edge and v+1 in the cloud). Unlike the seed,
every chain edge has an INFINITE reverse edge ``v+1 -> v``: a cut that puts v in the
cloud and v+1 back on the edge would cross it, so the minimum cut is always one
contiguous edge prefix + cloud suffix (the seed's cut could be non-contiguous: on its
own data it reported a cut after avg_pool predicted at ~0.2 s that really costs 2.585 s).

On the mesh: edge = the request's source; cloud = option ``cloud`` (default: the
fastest device, ties broken towards the sink, then natural id order). Edge/cloud time
of a block = its FLOPs / the device's FLOP/s; transfer = ``mesh.transfer_time(edge,
cloud, bytes)`` along the fastest route; the answer's trip to the sink is added to the
last block's edge time (from the edge) and cloud time (from the cloud).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import networkx as nx

from meshdl.errors import PlanError
from meshdl.graph import ModelGraph
from meshdl.graph.plan import Plan
from meshdl.graph.tiling import make_stage
from meshdl.planner.base import PlanRequest, register
from meshdl.planner.data.seeds import DSL_LAYERS
from meshdl.planner.disnet_common import natural_key


@dataclass
class DslCut:
    """``edge_layers`` vertices (0 = the input only) run on the edge, the rest in the cloud."""

    edge_layers: int
    predicted_s: float           # edge part + transfer of the cut tensor + cloud part
    all_edge_s: float            # no offload
    full_offload_s: float        # input transfer + every layer in the cloud
    cut_value: float             # the min-cut capacity (equals predicted_s)

    def to_dict(self) -> dict:
        return asdict(self)


def min_cut_chain(edge_times: Sequence[float], cloud_times: Sequence[float],
                  transfer_times: Sequence[float]) -> DslCut:
    """Minimum s-t cut over a chain of vertices 0..n-1 (vertex 0 = input, pinned to the
    edge); ``transfer_times[i]`` is the time to ship vertex i's output to the cloud."""
    n = len(edge_times)
    if n < 1 or len(cloud_times) != n or len(transfer_times) != n:
        raise PlanError(f"edge, cloud and transfer times need one entry per layer "
                        f"(got {len(edge_times)}, {len(cloud_times)}, {len(transfer_times)})")
    if any(not math.isfinite(v) or v < 0 for v in (*edge_times, *cloud_times,
                                                  *transfer_times)):
        raise PlanError("layer times must be finite and >= 0 seconds")
    net = nx.DiGraph()
    net.add_edge("edge", 0)                           # no capacity = infinite: input on edge
    for v in range(n):
        if v > 0:
            net.add_edge("edge", v, capacity=float(cloud_times[v]))
        net.add_edge(v, "cloud", capacity=float(edge_times[v]))
        if v + 1 < n:
            net.add_edge(v, v + 1, capacity=float(transfer_times[v]))
            net.add_edge(v + 1, v)                    # infinite reverse edge: contiguous cut
    value, (edge_side, _) = nx.minimum_cut(net, "edge", "cloud")
    on_edge = sorted(v for v in edge_side if v != "edge")
    k = len(on_edge)
    if on_edge != list(range(k)):                     # cannot happen with reverse edges
        raise PlanError(f"min cut is not contiguous: {on_edge}")
    all_edge = float(sum(edge_times))
    full = float(transfer_times[0] + sum(cloud_times[1:]) + edge_times[0])
    pred = float(sum(edge_times[:k]) + (transfer_times[k - 1] if k < n else 0.0)
                 + sum(cloud_times[k:]))
    return DslCut(edge_layers=k, predicted_s=pred, all_edge_s=all_edge,
                  full_offload_s=full, cut_value=float(value))


def dsl_cut_from_layer_table(edge_times: Sequence[float] | None = None,
                             cloud_times: Sequence[float] | None = None,
                             transfer_times: Sequence[float] | None = None) -> DslCut:
    """The DSL min cut on a per-layer table (vertex 0 = the input). With no arguments it
    runs on the seed's own VGG16 measurements (``data.seeds.DSL_LAYERS``): the cut is
    full offload, predicted 0.891 s = input transfer 0.6846 s + the sum of the 23 cloud
    (server) times 0.2068 s = 0.8914 s; running everything on the edge costs 4.30 s."""
    if edge_times is None:
        edge_times = [row[2] for row in DSL_LAYERS]
    if cloud_times is None:
        cloud_times = [row[4] for row in DSL_LAYERS]
    if transfer_times is None:
        transfer_times = [row[3] for row in DSL_LAYERS]
    return min_cut_chain(edge_times, cloud_times, transfer_times)


def default_cloud(mesh, source: str, sink: str) -> str:
    reach = nx.node_connected_component(mesh.graph, source)
    return min(reach, key=lambda d: (-mesh.devices[d].flops, d != sink, natural_key(d)))


@register("dsl", "DSL: one edge/cloud split chosen by a minimum s-t cut (contiguous)")
def plan_dsl(g: ModelGraph, mesh, req: PlanRequest) -> Plan:
    edge = req.source
    cloud = str(req.options.get("cloud") or default_cloud(mesh, edge, req.sink))
    if cloud not in mesh.devices:
        raise PlanError(f"cloud device {cloud!r} is not in mesh {mesh.name!r}")
    pos = g.positions
    fe, fc = mesh.devices[edge].flops, mesh.devices[cloud].flops

    def ship(a: str, b: str, nbytes: int) -> float:
        return 0.0 if a == b else mesh.transfer_time(a, b, int(nbytes))

    edge_t = [0.0] + [g.flops_between(a, b) / fe for a, b in zip(pos, pos[1:])]
    cloud_t = [0.0] + [g.flops_between(a, b) / fc for a, b in zip(pos, pos[1:])]
    xfer = [ship(edge, cloud, g.tensor_bytes(p)) for p in pos]
    out_bytes = g.tensor_bytes(pos[-1])
    edge_t[-1] += ship(edge, req.sink, out_bytes)
    cloud_t[-1] += ship(cloud, req.sink, out_bytes)
    cut = min_cut_chain(edge_t, cloud_t, xfer)
    split = pos[cut.edge_layers - 1]            # ops [0, split) on the edge
    stages = []
    if split > 0:
        stages.append(make_stage(g, 0, 0, split, [(None, edge)]))
    if split < len(g.ops):
        stages.append(make_stage(g, len(stages), split, len(g.ops), [(None, cloud)]))
    return Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops), stages=stages,
                source=req.source, sink=req.sink, strategy="dsl",
                meta={"dsl": {**cut.to_dict(), "edge": edge, "cloud": cloud,
                              "split_position": split}})
