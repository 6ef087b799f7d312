"""meshdl: cooperative, exact DNN inference across a mesh of unequal edge devices.

The public API (../docs and DESIGN section 2) is loaded lazily, so that light
commands (``meshdl --version``, a node's control loop) do not pay torch's import.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from meshdl.errors import (MeshdlError, TraceError, PlanError, ModelError, ImageError,
                           TopologyError, WireError, TransportError, JobError, SplitWarning)
from meshdl.graph.plan import Plan, Stage, Task, Region

# public name -> (module, attribute)
_LAZY = {
    "models": ("meshdl.models", None),
    "trace": ("meshdl.graph", "trace"),
    "ModelGraph": ("meshdl.graph", "ModelGraph"),
    "manual_plan": ("meshdl.graph", "manual_plan"),
    "execute": ("meshdl.graph", "execute"),
    "load_topology": ("meshdl.mesh", "load_topology"),
    "Mesh": ("meshdl.mesh", "Mesh"),
    "plan": ("meshdl.planner", "plan"),
    "strategies": ("meshdl.planner", "strategies"),
    "simulate": ("meshdl.planner", "simulate"),
}

__all__ = ["__version__", "MeshdlError", "TraceError", "PlanError", "ModelError", "ImageError",
           "TopologyError", "WireError", "TransportError", "JobError", "SplitWarning", "Plan", "Stage", "Task",
           "Region", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'meshdl' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
