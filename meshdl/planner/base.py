"""What every strategy shares: the request, the registry, routes and scoring."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from meshdl.errors import PlanError
from meshdl.graph import ModelGraph
from meshdl.graph.plan import Plan


@dataclass(frozen=True)
class PlanRequest:
    """Everything a strategy may look at besides the graph and the mesh."""

    source: str
    sink: str
    alpha: float = 0.5                    # 0 = minimum energy, 1 = minimum latency
    bandwidth_cap_mbps: float | None = None
    options: dict[str, Any] = field(default_factory=dict)   # strategy-specific knobs


Strategy = Callable[[ModelGraph, Any, PlanRequest], Plan]

_REGISTRY: dict[str, tuple[Strategy, str]] = {}


def register(name: str, summary: str) -> Callable[[Strategy], Strategy]:
    """Decorator: make ``fn(graph, mesh, request) -> Plan`` selectable by name."""
    def deco(fn: Strategy) -> Strategy:
        _REGISTRY[name] = (fn, summary)
        return fn
    return deco


def registry() -> dict[str, tuple[Strategy, str]]:
    return dict(_REGISTRY)


def fill_routes(plan: Plan, g: ModelGraph, mesh) -> Plan:
    """Give every transfer of the plan a mesh path (kept where the strategy chose one)."""
    pairs: set[tuple[str, str]] = set()
    for s in plan.stages:
        for t in s.tasks:
            if s.index == 0:
                pairs.add((plan.source, t.device))
            for p, _ in plan.producers(t):
                pairs.add((p.device, t.device))
            if s.index == len(plan.stages) - 1:
                pairs.add((t.device, plan.sink))
    for a, b in sorted(pairs):
        key = f"{a}>{b}"
        if a != b and key not in plan.routes:
            plan.routes[key] = mesh.route(a, b)
    return plan


def plan_id(plan: Plan) -> str:
    """A short content hash: equal plans get equal ids."""
    d = plan.to_dict()
    for k in ("plan_id", "term", "latency_s", "energy_j", "meta", "notes"):
        d.pop(k, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def check_request(g: ModelGraph, mesh, req: PlanRequest) -> None:
    for role, dev in (("source", req.source), ("sink", req.sink)):
        if dev not in mesh.devices:
            known = ", ".join(sorted(mesh.devices)[:12])
            raise PlanError(f"{role} device {dev!r} is not in mesh {mesh.name!r}; "
                            f"known devices: {known}")
    if not 0.0 <= req.alpha <= 1.0:
        raise PlanError(f"alpha must be in [0, 1] (0 = minimum energy, 1 = minimum "
                        f"latency), got {req.alpha}")
    try:
        mesh.route(req.source, req.sink)
    except Exception as exc:
        raise PlanError(f"source {req.source!r} cannot reach sink {req.sink!r} in mesh "
                        f"{mesh.name!r}: {exc}. Add a link or choose devices that are "
                        "connected") from exc
