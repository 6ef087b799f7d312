"""distributedCNNs (Disabato, Roveri, Alippi; IEEE Trans. Computers 2021): design-time
placement of CNN layers on IoT units as a mixed-integer programme, solved with HiGHS
(``scipy.optimize.milp``) instead of Gurobi.

Model, for CNNs u (several at once, each from its own source to its own sink), layers
j and units i:

- ``a[u,j,i]`` binary: layer j of CNN u runs on unit i; ``sum_i a[u,j,i] = 1``.
- Transfers, linearised as a flow: ``x[u,j,i,k] >= 0`` for consecutive layers j, j+1
  with ``sum_k x[u,j,i,k] = a[u,j,i]`` and ``sum_i x[u,j,i,k] = a[u,j+1,k]``; with
  binary ``a`` the only solution is ``x = a[u,j,i] * a[u,j+1,k]``, so the quadratic
  objective becomes linear and exact (tighter than McCormick's three inequalities).
- At most ``max_layers_per_unit`` layers per unit (the seed's L+1; option, default
  unlimited); memory: ``sum m_j a[u,j,i] <= memory_i``; processing load (optional
  ``load_cap_s``): ``sum (c_j / speed_i) a[u,j,i] <= load_cap_s``.
- Objective: the sum over CNNs of the data-to-decision latency = input from the source
  to layer 0's unit (the seed indexed layer 1) + each layer's processing c_j / speed_i
  + each layer output's store-and-forward transfer over the BFS shortest-hop path
  between consecutive layers' units (the seed's hop search is wrong) + the output to
  the sink. A transfer of K bytes over a path costs, per hop, the link latency + K * 8 /
  bandwidth (= the seed's K * hops / rate on its uniform, latency-free links).
  Early-exit branches (the seed's p and g weights) are not modelled.

Size: U CNNs x J layers x N units give U*J*N binaries and U*(J-1)*N^2 continuous flow
variables (1 AlexNet on 50 units: 400 + 17,500); HiGHS solves that in seconds.
Option ``time_limit`` (s, default 30) bounds it; the best solution and the gap are
reported in ``plan.meta["distcnn"]``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import networkx as nx
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from meshdl.errors import PlanError
from meshdl.graph import ModelGraph
from meshdl.graph.plan import Plan
from meshdl.graph.tiling import make_stage
from meshdl.planner.base import PlanRequest, register
from meshdl.planner.data.seeds import DISTCNN_ALEXNET, DISTCNN_INPUT_KB, KB
from meshdl.planner.disnet_common import natural_key

_WEIGHTED = ("conv2d", "linear")


@dataclass
class CnnTable:
    """Per-layer processing FLOPs ``c``, weight bytes ``m`` and output bytes ``k`` of one
    CNN, plus its input bytes."""

    c: list[float]
    m: list[float]
    k: list[float]
    input_bytes: float
    names: list[str] = field(default_factory=list)


@dataclass
class Placement:
    units: list[list[str]]             # per CNN, the unit of each layer
    latency_s: list[float]             # per CNN, predicted data-to-decision latency
    objective_s: float
    status: str
    gap: float | None
    solve_s: float
    n_binary: int
    n_continuous: int
    n_constraints: int

    def to_dict(self) -> dict:
        return asdict(self)


def seed_alexnet() -> CnnTable:
    """The seed's AlexNet table (c MFLOP, m and K in KB of 1000 bytes)."""
    d = DISTCNN_ALEXNET
    return CnnTable(c=[v * 1e6 for v in d["c_mflop"]], m=[v * KB for v in d["m_kb"]],
                    k=[v * KB for v in d["k_kb"]], input_bytes=DISTCNN_INPUT_KB * KB,
                    names=list(d["names"]))


def graph_layers(g: ModelGraph, max_layers: int = 20) -> tuple[list[int], CnnTable]:
    """The graph as a chain of layers: a new layer starts at each cut point where a conv
    or linear op begins (for AlexNet: conv1..conv5, fc6..fc8, the seed's 8 layers);
    more than ``max_layers`` are merged into ranges of roughly equal FLOPs."""
    bounds = [0] + [p for p in g.cut_points if g.ops[p].kind in _WEIGHTED] + [len(g.ops)]
    bounds = sorted(set(bounds))
    if len(bounds) - 1 > max_layers:
        total = g.flops
        keep = [0]
        for j in range(1, max_layers):
            target = total * j / max_layers
            cands = [p for p in bounds[1:-1] if p > keep[-1]]
            if cands:
                keep.append(min(cands, key=lambda p: (abs(g.flops_between(0, p) - target), p)))
        bounds = sorted(set(keep + [len(g.ops)]))
    names = [g.ops[a].name for a in bounds[:-1]]
    return bounds, CnnTable(c=[g.flops_between(a, b) for a, b in zip(bounds, bounds[1:])],
                            m=[float(g.weight_bytes_between(a, b))
                               for a, b in zip(bounds, bounds[1:])],
                            k=[float(g.tensor_bytes(b)) for b in bounds[1:]],
                            input_bytes=float(g.tensor_bytes(0)), names=names)


def _path_costs(mesh, units: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per unit pair, BFS shortest-hop path: (sum of latencies, sum of 8/bandwidth)."""
    n = len(units)
    lat, inv = np.zeros((n, n)), np.zeros((n, n))
    idx = {u: i for i, u in enumerate(units)}
    for a in units:
        paths = nx.single_source_shortest_path(mesh.graph, a)
        for b, path in paths.items():
            if b not in idx or b == a:
                continue
            links = [mesh.link(u, v) for u, v in zip(path, path[1:])]
            lat[idx[a], idx[b]] = sum(l.latency_s for l in links)
            inv[idx[a], idx[b]] = sum(8.0 / l.bandwidth_bps for l in links)
    return lat, inv


def distcnn_place(cnns: Sequence[CnnTable], sources: Sequence[str], sinks: Sequence[str],
                  mesh, max_layers_per_unit: int | None = None,
                  load_cap_s: float | None = None, time_limit: float = 30.0) -> Placement:
    """Place every layer of every CNN on a unit, minimising the total latency."""
    if not (len(cnns) == len(sources) == len(sinks)) or not cnns:
        raise PlanError("give one source and one sink per CNN (and at least one CNN)")
    units = sorted(mesh.devices, key=natural_key)
    n = len(units)
    reach = set(nx.node_connected_component(mesh.graph, sources[0]))
    for s in (*sources, *sinks):
        if s not in mesh.devices:
            raise PlanError(f"device {s!r} is not in mesh {mesh.name!r}")
    biggest = max(mesh.devices[u].memory_bytes for u in units)
    for ci, t in enumerate(cnns):
        for j, m in enumerate(t.m):
            if m > biggest:
                name = t.names[j] if j < len(t.names) else f"layer {j}"
                raise PlanError(f"CNN {ci} {name} needs {m / 2**20:.1f} MiB of weights but "
                                f"the largest device memory is {biggest / 2**20:.1f} MiB; "
                                "add a device with more memory or split the layer")
    lat, inv = _path_costs(mesh, units)
    unreachable = [u for u in units if u not in reach]
    speed = np.array([mesh.devices[u].flops for u in units])
    mem = np.array([mesh.devices[u].memory_bytes for u in units], dtype=float)
    col = 0
    a_idx, x_idx, cost = [], [], []
    for ci, t in enumerate(cnns):
        J = len(t.c)
        s, z = units.index(sources[ci]), units.index(sinks[ci])
        a_idx.append(np.arange(col, col + J * n).reshape(J, n))
        col += J * n
        for j in range(J):
            c = t.c[j] / speed
            if j == 0:
                c = c + lat[s] + t.input_bytes * inv[s]
            if j == J - 1:
                c = c + lat[:, z] + t.k[j] * inv[:, z]
            cost.extend(c.tolist())
        xs = []
        for j in range(J - 1):
            xs.append(np.arange(col, col + n * n).reshape(n, n))
            col += n * n
            cost.extend((lat + t.k[j] * inv).ravel().tolist())
        x_idx.append(xs)
    n_bin = sum(a.size for a in a_idx)
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(cidx, cval, low, high):
        nonlocal r
        rows.extend([r] * len(cidx))
        cols.extend(int(c) for c in cidx)
        vals.extend(cval)
        lo.append(low)
        hi.append(high)
        r += 1

    for ci, t in enumerate(cnns):
        A = a_idx[ci]
        for j in range(A.shape[0]):
            add(A[j], [1.0] * n, 1.0, 1.0)
        for j, X in enumerate(x_idx[ci]):
            for i in range(n):
                add([*X[i], A[j, i]], [1.0] * n + [-1.0], 0.0, 0.0)
                add([*X[:, i], A[j + 1, i]], [1.0] * n + [-1.0], 0.0, 0.0)
    for i in range(n):
        cidx = [A[j, i] for A in a_idx for j in range(A.shape[0])]
        mvals = [t.m[j] for t, A in zip(cnns, a_idx) for j in range(A.shape[0])]
        add(cidx, mvals, -np.inf, mem[i])
        if max_layers_per_unit is not None:
            add(cidx, [1.0] * len(cidx), -np.inf, float(max_layers_per_unit))
        if load_cap_s is not None:
            lvals = [t.c[j] / speed[i] for t, A in zip(cnns, a_idx) for j in range(A.shape[0])]
            add(cidx, lvals, -np.inf, float(load_cap_s))
    integrality = np.zeros(col)
    integrality[:n_bin] = 1
    upper = np.ones(col)
    for u in unreachable:                       # a unit the source cannot reach is off
        for A in a_idx:
            upper[A[:, units.index(u)]] = 0.0
    cons = LinearConstraint(coo_matrix((vals, (rows, cols)), shape=(r, col)).tocsr(), lo, hi)
    t0 = time.perf_counter()
    res = milp(np.array(cost), constraints=cons, integrality=integrality,
               bounds=Bounds(np.zeros(col), upper),
               options={"time_limit": float(time_limit), "disp": False})
    solve_s = time.perf_counter() - t0
    if res.x is None:
        raise PlanError(f"distcnn: no feasible placement ({res.message}); relax "
                        "max_layers_per_unit/load_cap_s or add devices with more memory")
    x = res.x
    placed, lats = [], []
    for ci, A in enumerate(a_idx):
        placed.append([units[int(np.argmax(x[A[j]]))] for j in range(A.shape[0])])
        lats.append(_latency(cnns[ci], placed[-1], units, sources[ci], sinks[ci],
                             speed, lat, inv))
    status = {0: "optimal", 1: "time/iteration limit", 2: "infeasible", 3: "unbounded"}
    return Placement(units=placed, latency_s=lats, objective_s=float(res.fun),
                     status=status.get(res.status, str(res.status)),
                     gap=None if getattr(res, "mip_gap", None) is None else float(res.mip_gap),
                     solve_s=solve_s, n_binary=n_bin, n_continuous=col - n_bin,
                     n_constraints=r)


def _latency(t: CnnTable, where: list[str], units, source, sink, speed, lat, inv) -> float:
    ix = [units.index(u) for u in where]
    s, z = units.index(source), units.index(sink)
    total = lat[s, ix[0]] + t.input_bytes * inv[s, ix[0]]
    for j, i in enumerate(ix):
        total += t.c[j] / speed[i]
        nxt = ix[j + 1] if j + 1 < len(ix) else z
        total += lat[i, nxt] + t.k[j] * inv[i, nxt]
    return float(total)


@register("distcnn", "distributedCNNs: layer placement by mixed-integer programming "
          "(HiGHS), memory-aware, store-and-forward transfers")
def plan_distcnn(g: ModelGraph, mesh, req: PlanRequest) -> Plan:
    opts = req.options
    bounds, table = graph_layers(g, int(opts.get("max_layers", 20)))
    pl = distcnn_place([table], [req.source], [req.sink], mesh,
                       max_layers_per_unit=opts.get("max_layers_per_unit"),
                       load_cap_s=opts.get("load_cap_s"),
                       time_limit=float(opts.get("time_limit", 30.0)))
    where = pl.units[0]
    stages = []
    a = 0
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if j + 1 < len(where) and where[j + 1] == where[j]:
            continue                                   # merge with the next layer
        stages.append(make_stage(g, len(stages), a, hi, [(None, where[j])]))
        a = hi
    return Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops), stages=stages,
                source=req.source, sink=req.sink, strategy="distcnn",
                meta={"distcnn": {**pl.to_dict(), "layers": table.names,
                                  "layer_bounds": bounds}})
