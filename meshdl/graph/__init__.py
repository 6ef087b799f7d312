"""The split engine: tracing, region algebra, tiles, plans and their execution.

Loaded lazily: ``meshdl.graph.plan`` (plain data) must not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ModelGraph": "meshdl.graph.model_graph", "RegionPlan": "meshdl.graph.model_graph",
    "trace": "meshdl.graph.model_graph", "Op": "meshdl.graph.fxtrace",
    "check_plan": "meshdl.graph.tiling", "grid_regions": "meshdl.graph.tiling",
    "make_stage": "meshdl.graph.tiling", "manual_plan": "meshdl.graph.tiling",
    "row_regions": "meshdl.graph.tiling", "split_even": "meshdl.graph.tiling",
    "split_ratio": "meshdl.graph.tiling", "validate_tiles": "meshdl.graph.tiling",
    "assemble": "meshdl.graph.runner", "execute": "meshdl.graph.runner",
    "run_task": "meshdl.graph.runner", "stitch": "meshdl.graph.runner",
    "task_input": "meshdl.graph.runner",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'meshdl.graph' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
