"""The throughput objective: plans for the steady-state rate of a stream of frames.

A stream's rate is set by its busiest resource (a device's compute or a link), not
by one frame's latency: a pipeline that puts consecutive layer ranges on different
devices keeps them all busy on different frames at once. Candidates (bounded, pure,
deterministic):

1. the strategy's own plan (for the requested alpha);
2. the whole model on each device that holds it;
3. pipelines: ordered tuples of 2-4 of the fastest devices (the source and the sink
   among them), the layer positions cut so each device's share of the FLOPs follows
   its speed, then each cut moved while the bottleneck period falls;
4. replica sets: greedily add the candidate that most lowers the weighted bottleneck
   of the set (frames go to replicas by weighted round robin, weights = each plan's
   own rate), at most ``max_replicas``; replicas may share devices (a stage
   replicated on two devices, the others shared), the shared load adds up.

The few best sets by the analytic bottleneck are then scored by ``simulate_stream``
(a windowed stream) and the best frames/s wins (ties: lower frame latency). The plan
returned is the first replica; the others travel in ``plan.meta["replicas"]`` (plan
dicts) with ``meta["replica_weights"]``, and ``meta["stream"]`` holds the predicted
stream score.
"""
from __future__ import annotations

from itertools import permutations
from typing import Callable, Sequence

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan
from meshdl.graph.tiling import make_stage
from meshdl.planner.base import PlanRequest, fill_routes, plan_id
from meshdl.planner.simulate import Simulator
from meshdl.planner.stream import auto_weights, bottleneck_of, simulate_stream, _shares

OBJECTIVES = ("latency", "energy", "throughput")


def check_objective(objective: str | None) -> str | None:
    if objective is not None and objective not in OBJECTIVES:
        raise PlanError(f"objective {objective!r}: use one of {', '.join(OBJECTIVES)} (or "
                        "leave it out for the alpha mix of latency and energy)")
    return objective


def stream_window(replicas: int) -> int:
    """The default window (frames in flight) of a stream over ``replicas`` plans."""
    return 2 * replicas + 4


def _whole_plan(g, devices: Sequence[str], bounds: Sequence[int], source: str, sink: str
                ) -> Plan:
    """Stage k = ops [bounds[k], bounds[k+1]) whole on devices[k]."""
    stages = [make_stage(g, k, a, b, [(None, d)])
              for k, (a, b, d) in enumerate(zip(bounds, bounds[1:], devices))]
    return Plan(model=g.name, input_shape=tuple(g.input_shape), num_ops=len(g.ops),
                stages=stages, source=source, sink=sink, strategy="throughput")


def _balanced(g, positions: Sequence[int], speeds: Sequence[float]) -> list[int] | None:
    """Cut positions so device k's FLOP share follows speeds[k] (each stage non-empty)."""
    total = g.flops_between(0, len(g.ops))
    k = len(speeds)
    if len(positions) < k + 1:
        return None
    cum = [g.flops_between(0, p) for p in positions]
    bounds = [0]
    acc = 0.0
    for j in range(k - 1):
        acc += speeds[j] / sum(speeds) * total
        lo = positions.index(bounds[-1]) + 1
        hi = len(positions) - (k - 1 - j) - 1
        best = min(range(lo, hi + 1), key=lambda i: abs(cum[i] - acc))
        bounds.append(positions[best])
    bounds.append(len(g.ops))
    return bounds


class _Scorer:
    def __init__(self, g, mesh, wire) -> None:
        self.g, self.mesh, self.wire = g, mesh, wire
        self.sim = Simulator(g, mesh, wire)

    def period(self, plans: Sequence[Plan]) -> float:
        progs = [self.sim.compile_plan(p) for p in plans]
        return bottleneck_of(self.sim, progs, _shares(auto_weights(self.sim, progs)))[0]

    def fits(self, plan: Plan) -> bool:
        prog = self.sim.compile_plan(plan)
        return all(m <= self.sim.memory[d] for d, m in prog.peak_mem.items())


def _finish(p: Plan, g, mesh) -> Plan:
    fill_routes(p, g, mesh)
    p.plan_id = plan_id(p)
    return p


def _pipelines(sc: _Scorer, req: PlanRequest, pool: Sequence[str], max_stages: int
               ) -> list[Plan]:
    g, mesh = sc.g, sc.mesh
    positions = list(g.positions)
    out = []
    for k in range(2, max_stages + 1):
        for order in permutations(pool, k):
            speeds = [mesh.devices[d].flops for d in order]
            bounds = _balanced(g, positions, speeds)
            if bounds is None:
                continue
            best = _finish(_whole_plan(g, order, bounds, req.source, req.sink), g, mesh)
            best_p = sc.period([best])
            improved = True
            while improved:                  # move each cut while the bottleneck falls
                improved = False
                for j in range(1, k):
                    for step in (-1, 1):
                        i = positions.index(bounds[j]) + step
                        if not (positions.index(bounds[j - 1]) < i
                                < positions.index(bounds[j + 1])):
                            continue
                        nb = list(bounds)
                        nb[j] = positions[i]
                        cand = _finish(_whole_plan(g, order, nb, req.source, req.sink), g,
                                       mesh)
                        p = sc.period([cand])
                        if p < best_p - 1e-12:
                            best, best_p, bounds, improved = cand, p, nb, True
            if sc.fits(best):
                out.append(best)
    return out


def candidates(g, mesh, req: PlanRequest, strategy: Callable[..., Plan] | None,
               wire=None, max_stages: int = 3, pool_size: int = 4) -> list[Plan]:
    """Single plans worth a place in a stream (see the module doc, steps 1-3)."""
    sc = _Scorer(g, mesh, wire)
    out: list[Plan] = []
    if strategy is not None:         # its plan for the requested alpha (one search)
        p = strategy(g, mesh, req)
        p.source, p.sink = req.source, req.sink
        out.append(_finish(p, g, mesh))
    n_ops = len(g.ops)
    for d in sorted(mesh.devices):
        p = _finish(_whole_plan(g, [d], [0, n_ops], req.source, req.sink), g, mesh)
        if sc.fits(p):
            out.append(p)
    fast = sorted(mesh.devices, key=lambda d: (-mesh.devices[d].flops, d))
    pool = list(dict.fromkeys([*fast[:pool_size], req.source, req.sink]))[:pool_size + 1]
    out += _pipelines(sc, req, pool, min(max_stages, len(pool)))
    uniq: dict[str, Plan] = {}
    for p in out:
        uniq.setdefault(p.plan_id, p)
    return list(uniq.values())


def plan_throughput(g, mesh, req: PlanRequest, strategy: Callable[..., Plan] | None,
                    wire=None, max_replicas: int = 4, n_frames: int = 48,
                    finalists: int = 4) -> Plan:
    """The plan (with replicas in ``meta``) of the highest predicted frames/s."""
    sc = _Scorer(g, mesh, wire)
    cands = candidates(g, mesh, req, strategy, wire)
    if not cands:
        raise PlanError(f"no plan of {g.name} fits the devices of mesh {mesh.name!r}")
    ranked = sorted(cands, key=lambda p: (sc.period([p]), p.plan_id))
    sets: list[list[Plan]] = [[p] for p in ranked[:finalists]]
    for first in ranked[:finalists]:
        chosen = [first]
        cur = sc.period(chosen)
        while len(chosen) < max_replicas:
            best, best_p = None, cur
            for c in ranked:
                if c in chosen:
                    continue
                p = sc.period(chosen + [c])
                if p < best_p - 1e-12:
                    best, best_p = c, p
            if best is None:
                break
            chosen.append(best)
            cur = best_p
            sets.append(list(chosen))
    sets.sort(key=lambda s: (sc.period(s), len(s)))
    best_set, best_key, best_score = None, None, None
    for s in sets[:finalists * 2]:
        window = stream_window(len(s))
        score = simulate_stream(s, g, mesh, n_frames=n_frames, window=window, wire=wire)
        key = (-round(score.fps, 6), score.latency_p50_s, len(s))
        if best_key is None or key < best_key:
            best_set, best_key, best_score = s, key, score
    primary = best_set[0]
    progs = [sc.sim.compile_plan(p) for p in best_set]
    weights = auto_weights(sc.sim, progs)
    primary.meta["objective"] = "throughput"
    primary.meta["stream"] = best_score.to_dict()
    if len(best_set) > 1:
        primary.meta["replicas"] = [p.to_dict() for p in best_set[1:]]
        primary.meta["replica_weights"] = [float(w) for w in weights]
        primary.notes.append(f"throughput: frames round-robin over {len(best_set)} plans "
                             f"(weights {', '.join(f'{w / sum(weights):.2f}' for w in weights)})")
    return primary


def replicas(plan: Plan) -> tuple[list[Plan], list[float]]:
    """Every plan of a (possibly replicated) throughput plan and its frame weights."""
    extra = (plan.meta or {}).get("replicas") or []
    plans = [plan] + [Plan.from_dict(d) for d in extra]
    w = (plan.meta or {}).get("replica_weights") or [1.0] * len(plans)
    if len(w) != len(plans) or any(not isinstance(x, (int, float)) or x <= 0 for x in w):
        w = [1.0] * len(plans)
    return plans, [float(x) for x in w]


__all__ = ["OBJECTIVES", "candidates", "check_objective", "plan_throughput", "replicas",
           "stream_window"]
