"""The mesh: devices, links, profiles, topologies, routing and live state.

``load_topology("disnet-net0")`` -> ``Mesh``; ``load_profile("rpi4")`` -> ``Profile``;
``random_mesh(500, seed=1)``; ``MeshState`` + ``apply`` fold membership/telemetry.
"""
from __future__ import annotations

from meshdl.mesh.generate import mix_counts, random_mesh
from meshdl.mesh.loader import (disnet_json_to_mesh, dump_topology, list_topologies,
                                load_topology, parse_topology)
from meshdl.mesh.model import DEFAULT_ROUTE_BYTES, Device, Link, Mesh, Power
from meshdl.mesh.profiles import Profile, list_profiles, load_profile
from meshdl.mesh.state import (Event, LinkObs, Member, MeshState, NodeOffline, NodeOnline,
                               ReplanGate, Telemetry, apply, changed_links, fold, link_changed,
                               mesh_changed)

__all__ = ["DEFAULT_ROUTE_BYTES", "Device", "Event", "Link", "LinkObs", "Member", "Mesh",
           "MeshState", "NodeOffline", "NodeOnline", "Power", "Profile", "ReplanGate", "Telemetry", "apply",
           "changed_links", "disnet_json_to_mesh", "dump_topology", "fold", "link_changed",
           "list_profiles", "list_topologies", "load_profile", "load_topology", "mesh_changed",
           "mix_counts",
           "parse_topology", "random_mesh"]
