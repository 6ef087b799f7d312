"""Strategy ``local``: the whole model as one task on the source device; the answer
then travels to the sink. The yardstick every other strategy is measured against."""
from __future__ import annotations

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan
from meshdl.graph.tiling import make_stage
from meshdl.planner.base import PlanRequest, register


def whole_plan(g, device: str, source: str, sink: str, strategy: str = "local") -> Plan:
    """One stage covering the whole model, one whole task on ``device``."""
    stage = make_stage(g, 0, 0, len(g.ops), [(None, device)])
    return Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops),
                stages=[stage], source=source, sink=sink, strategy=strategy)


def local_fits(g, mesh, device: str) -> bool:
    """True when ``device`` holds the model's weights and its input + output."""
    need = g.weight_bytes + g.tensor_bytes(0) + g.tensor_bytes(len(g.ops))
    return need <= mesh.devices[device].memory_bytes


@register("local", "everything on the source device, one whole task; the answer is sent "
                   "to the sink")
def plan_local(g, mesh, req: PlanRequest) -> Plan:
    dev = mesh.devices[req.source]
    need = g.weight_bytes + g.tensor_bytes(0) + g.tensor_bytes(len(g.ops))
    if need > dev.memory_bytes:
        raise PlanError(f"{g.name} needs {need / 2**20:.1f} MiB (weights + input + output) "
                        f"but source {req.source!r} has {dev.memory_bytes / 2**20:.1f} MiB; "
                        "use strategy 'meshdl', which spreads the weights over devices")
    plan = whole_plan(g, req.source, req.source, req.sink)
    plan.notes.append(f"whole model on {req.source}")
    return plan


__all__ = ["plan_local", "whole_plan", "local_fits"]
