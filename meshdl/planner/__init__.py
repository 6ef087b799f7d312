"""Planning: one cost model (a discrete-event simulation) scores every strategy.

``plan(graph, mesh, strategy=..., source=..., sink=..., alpha=...)`` -> Plan with
``latency_s`` and ``energy_j`` predicted by ``simulate``. Strategies are pure
functions ``(graph, mesh, PlanRequest) -> Plan`` registered by name.
"""
from __future__ import annotations

import importlib

from meshdl.errors import PlanError
from meshdl.planner.base import PlanRequest, check_request, fill_routes, plan_id, register, registry
from meshdl.planner.simulate import Score, simulate
from meshdl.planner.stream import StreamScore, simulate_stream

# modules that register strategies, default first
_STRATEGY_MODULES = ("meshdl.planner.optimiser", "meshdl.planner.local",
                     "meshdl.planner.disnet", "meshdl.planner.baselines",
                     "meshdl.planner.dsl", "meshdl.planner.distcnn",
                     "meshdl.planner.optimal")

DEFAULT_STRATEGY = "meshdl"


def _load() -> dict:
    for mod in _STRATEGY_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:   # a strategy module not written yet
            if exc.name != mod:
                raise
    return registry()


def strategies() -> list[str]:
    """Strategy names, the default first."""
    names = list(_load())
    return sorted(names, key=lambda n: (n != DEFAULT_STRATEGY, n))


def describe() -> dict[str, str]:
    return {name: summary for name, (_, summary) in _load().items()}


def plan(graph, mesh, strategy: str = DEFAULT_STRATEGY, source: str | None = None,
         sink: str | None = None, alpha: float = 0.5,
         bandwidth_cap_mbps: float | None = None, objective: str | None = None,
         **options):
    """Plan ``graph`` on ``mesh`` with the named strategy and score it.

    ``objective``: None (the alpha mix of latency and energy), "latency" (alpha 1),
    "energy" (alpha 0) or "throughput" (the steady-state frames/s of a stream, see
    ``planner.throughput``; the strategy's plans are among the candidates).
    ``wire=WireModel(...)`` (an option): score pieces as the nodes compress them."""
    from meshdl.planner.throughput import check_objective, plan_throughput
    objective = check_objective(objective)
    if objective == "latency":
        alpha = 1.0
    elif objective == "energy":
        alpha = 0.0
    reg = _load()
    if strategy not in reg:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of "
                        f"{', '.join(strategies())}")
    if bandwidth_cap_mbps is not None:
        mesh = mesh.with_bandwidth_cap(bandwidth_cap_mbps)
    defaults = getattr(mesh, "defaults", {}) or {}
    source = source or defaults.get("source") or sorted(mesh.devices)[0]
    sink = sink or defaults.get("sink") or source
    req = PlanRequest(source=str(source), sink=str(sink), alpha=float(alpha),
                      bandwidth_cap_mbps=bandwidth_cap_mbps, options=dict(options))
    check_request(graph, mesh, req)
    fn, _ = reg[strategy]
    if objective == "throughput":
        result = plan_throughput(graph, mesh, req, fn, wire=options.get("wire"))
    else:
        result = fn(graph, mesh, req)
    result.strategy, result.alpha = strategy, req.alpha
    result.source, result.sink = req.source, req.sink
    fill_routes(result, graph, mesh)
    score = simulate(result, graph, mesh, wire=options.get("wire"))
    result.latency_s, result.energy_j = score.latency_s, score.energy_j
    result.meta.setdefault("score", score.to_dict())
    result.plan_id = plan_id(result)
    if objective:
        result.meta["objective"] = objective
    return result


__all__ = ["PlanRequest", "Score", "StreamScore", "simulate", "simulate_stream", "plan", "strategies", "describe", "register",
           "fill_routes", "DEFAULT_STRATEGY"]
