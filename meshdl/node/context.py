"""The seam between a node's control plane (agent) and its data plane.

The agent (membership, election, plans) builds a ``DataPlane(ctx)`` and calls its
hooks; the data plane reads what it needs through ``NodeContext``. Neither imports
the other's internals.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from meshdl.graph.plan import Plan
    from meshdl.mesh import Device, Mesh
    from meshdl.transport.bus import Bus  # noqa: F401  (named in the protocol)


class NodeContext(Protocol):
    node_id: str
    mesh_name: str
    bus: "Bus"
    emulate: bool            # pace compute and links to the profile/topology figures

    def device(self) -> "Device":
        """This node's own capabilities (flops, memory, power)."""

    def live_mesh(self) -> "Mesh":
        """The current mesh view: online members and measured (or topology) links."""

    def plan(self, plan_id: str) -> "Plan | None":
        """An adopted plan by id (only plans of the current or a newer term)."""

    def term(self) -> int:
        """The newest leader term this node has seen (frames of older terms are dropped)."""


class DataPlaneHooks(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def on_plan(self, plan: "Plan") -> None:
        """A plan was adopted (new id, or a newer term)."""

    def on_members(self, online: set[str]) -> None:
        """Membership changed: jobs waiting on a vanished device should fail fast."""
