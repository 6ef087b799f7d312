"""Device profiles: the figures of one kind of device (``nodes/*.yaml``)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshdl.data import data_dir
from meshdl.errors import TopologyError
from meshdl.mesh.model import Power
from meshdl.mesh.yamlio import check_keys, number, read_data, require_mapping, size_bytes

log = logging.getLogger(__name__)

_PROFILE_KEYS = {"name", "description", "flops", "memory_bytes", "power", "net"}
_POWER_KEYS = {"compute_w", "tx_w", "rx_w", "idle_w"}
_NET_KEYS = {"bandwidth_mbps", "latency_ms"}


@dataclass(frozen=True)
class Profile:
    """A device kind. ``net`` holds optional link defaults (bandwidth_mbps, latency_ms)."""

    name: str
    description: str
    flops: float
    memory_bytes: int
    power: Power
    net: Mapping[str, float] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "flops": self.flops,
                "memory_bytes": self.memory_bytes, "power": self.power.to_dict(),
                "net": dict(self.net)}


def parse_power(data: Any, what: str, base: Power | None = None) -> Power:
    """Power from a mapping; with ``base``, missing fields come from it (overrides).
    Without a base, rx_w defaults to tx_w and idle_w to 0."""
    d = require_mapping(data, what)
    check_keys(d, _POWER_KEYS, what)
    vals = {k: number(v, f"{what}.{k}") for k, v in d.items()}
    for k, v in vals.items():
        if v < 0:
            raise TopologyError(f"{what}.{k} is {v}; power must be >= 0 watts")
    if base is not None:
        return Power(**{**base.to_dict(), **vals})
    if "compute_w" not in vals or "tx_w" not in vals:
        raise TopologyError(f"{what} needs at least compute_w and tx_w (watts); "
                            "rx_w defaults to tx_w, idle_w to 0")
    return Power(compute_w=vals["compute_w"], tx_w=vals["tx_w"],
                 rx_w=vals.get("rx_w", vals["tx_w"]), idle_w=vals.get("idle_w", 0.0))


def parse_profile(data: Any, where: str) -> Profile:
    d = require_mapping(data, where)
    check_keys(d, _PROFILE_KEYS, where)
    for key in ("name", "flops", "memory_bytes", "power"):
        if key not in d:
            raise TopologyError(f"{where}: missing field {key!r}; a profile needs name, "
                                "flops, memory_bytes and power")
    flops = number(d["flops"], f"{where}: flops")
    mem = size_bytes(d["memory_bytes"], f"{where}: memory_bytes")
    if flops <= 0 or mem <= 0:
        raise TopologyError(f"{where}: flops and memory_bytes must be positive "
                            f"(got {flops}, {mem})")
    net = require_mapping(d.get("net") or {}, f"{where}: net")
    check_keys(net, _NET_KEYS, f"{where}: net")
    return Profile(name=str(d["name"]), description=str(d.get("description", "")).strip(),
                   flops=flops, memory_bytes=mem,
                   power=parse_power(d["power"], f"{where}: power"),
                   net={k: number(v, f"{where}: net.{k}") for k, v in net.items()})


def list_profiles() -> list[str]:
    """Names of the installed device profiles."""
    return sorted(p.stem for p in data_dir("nodes").glob("*.yaml"))


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml", ".json")) or "/" in name or "\\" in name


def load_profile(name_or_path: str | Path, relative_to: Path | None = None) -> Profile:
    """An installed profile by name (``rpi4``) or a profile file path. Relative paths
    are resolved against ``relative_to`` (a topology file's folder) when given."""
    if isinstance(name_or_path, Path) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path)
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        return parse_profile(read_data(path), str(path))
    name = str(name_or_path)
    path = data_dir("nodes") / f"{name}.yaml"
    if not path.is_file():
        raise TopologyError(f"unknown device profile {name!r}; known profiles: "
                            f"{', '.join(list_profiles())} (or give a path to a profile "
                            ".yaml, or explicit flops/memory_bytes/power)")
    profile = parse_profile(read_data(path), str(path))
    if profile.name != name:
        raise TopologyError(f"{path}: declares name {profile.name!r} but the file is "
                            f"{name}.yaml; make them match")
    return profile
