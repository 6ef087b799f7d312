"""This node's Device: from a profile, its topology entry, or a measurement."""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Mapping

from meshdl.mesh import Device, Mesh, load_profile, load_topology
from meshdl.node.config import NodeConfig, NodeError
from meshdl.node.flops import measure_flops

log = logging.getLogger(__name__)


def host_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def resolve(cfg: NodeConfig) -> tuple[Device, Mesh | None]:
    """(this node's Device, the base topology or None).

    Figures come from ``--profile`` if given, else the topology's device of this id,
    else the ``generic`` profile. Emulated nodes keep those figures; real nodes
    replace FLOP/s and memory with this host's (a short benchmark)."""
    base = load_topology(cfg.topology) if cfg.topology else None
    k = cfg.time_scale if cfg.emulate else 1.0
    if base is not None and k != 1.0:
        base = base.dilated(k)      # every device and link k times slower
    if cfg.profile:
        p = load_profile(cfg.profile)
        dev = Device(cfg.node_id, p.name, p.flops / k, p.memory_bytes, p.power)
    elif base is not None and cfg.node_id in base.devices:
        dev = base.devices[cfg.node_id]
    elif cfg.emulate:
        raise NodeError(f"--emulate needs figures for {cfg.node_id!r}: give --profile, or a "
                        f"--topology that has a device {cfg.node_id!r}")
    else:
        p = load_profile("generic")
        dev = Device(cfg.node_id, p.name, p.flops, p.memory_bytes, p.power)
    if not cfg.emulate:
        dev = Device(dev.id, dev.profile, measure_flops(), host_memory(), dev.power,
                     {**dev.meta, "measured": True})
    if cfg.bundle:
        from meshdl.security.bundle import Bundle
        dev = within_enrolment(dev, Bundle.load(cfg.bundle).entry_info.caps)
    return dev, base


def within_enrolment(dev: Device, caps: Mapping[str, float]) -> Device:
    """``dev`` with FLOP/s and memory no higher than its enrolled ceiling: every other
    member caps this node's claims there, so the node must rank and plan itself with
    the same figures (a host measured faster than its profile otherwise sees itself
    as the best member while the others see another: two claimants, no leader)."""
    out, said = dev, []
    for field_, what in (("flops", "FLOP/s"), ("memory_bytes", "bytes of memory")):
        cap, have = caps.get(field_), getattr(dev, field_)
        if cap and have > cap:
            said.append(f"{have:.3g} {what} as {cap:.3g}")
            out = replace(out, **{field_: type(have)(cap)})
    if said:
        log.warning("%s announces this host's %s, its enrolled ceiling, as every member "
                    "reads it (enrol it with a faster profile to use more)", dev.id,
                    " and ".join(said))
    return out
