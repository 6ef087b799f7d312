"""A star mesh: every device reaches the others through one MQTT broker.

A real MQTT deployment is a star: a piece from ``a`` to ``b`` crosses ``a``'s uplink
to the broker, waits in the broker, and crosses ``b``'s downlink (store and forward).
``Star`` holds where the broker is (a device id, or its own host) and each device's
access link (``Access``: uplink/downlink bit/s, one-way latency to the broker).
Optionally one shared medium: the devices of one Wi-Fi cell share airtime, so every
access transfer of any of them occupies the same medium.

For code that thinks in device-to-device links (routing, strategies, the emulator)
a star mesh also has a *virtual link* per device pair: latency = both access
latencies, bandwidth = the store-and-forward throughput of the slower direction
(``1 / (1/up_a + 1/down_b)``). The cost model does not use virtual links for a
star: it charges the access hops and their contention (``access_hops``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from meshdl.errors import TopologyError

BROKER = "@broker"       # the broker's name in access hops (never a device id: '@')


@dataclass(frozen=True)
class Access:
    """A device's link to the broker: bit/s each way, one-way latency (s)."""

    up_bps: float
    down_bps: float
    latency_s: float = 0.001

    def to_dict(self) -> dict[str, float]:
        return {"up_bps": self.up_bps, "down_bps": self.down_bps, "latency_s": self.latency_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Access":
        return cls(float(d["up_bps"]), float(d["down_bps"]), float(d.get("latency_s", 0.001)))

    def scaled(self, bw_factor: float, lat_factor: float) -> "Access":
        return Access(self.up_bps * bw_factor, self.down_bps * bw_factor,
                      self.latency_s * lat_factor)


@dataclass(frozen=True)
class Star:
    """``broker_device``: the device hosting the broker (its own access is loopback),
    or None when the broker has its own host (``broker_host`` names it).
    ``medium``: devices sharing one medium (one Wi-Fi cell), empty when none."""

    access: Mapping[str, Access]
    broker_device: str | None = None
    broker_host: str = "broker"
    medium: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "access", MappingProxyType(dict(self.access)))
        object.__setattr__(self, "medium", frozenset(self.medium))

    def validate(self, devices: Mapping[str, Any], where: str) -> None:
        missing = sorted(d for d in devices if d not in self.access
                         and d != self.broker_device)
        if missing:
            raise TopologyError(f"{where}: device(s) {', '.join(missing)} have no access link "
                                "to the broker; give each an access: {bandwidth_mbps, "
                                "latency_ms} (or use a profile with net figures)")
        if self.broker_device is not None and self.broker_device not in devices:
            raise TopologyError(f"{where}: the broker is on device {self.broker_device!r}, "
                                "which is not a device of this mesh")
        for dev, acc in self.access.items():
            for what, v in (("uplink", acc.up_bps), ("downlink", acc.down_bps)):
                if not (math.isfinite(v) and v > 0):
                    raise TopologyError(f"{where}: device {dev!r} {what} is {v!r} bit/s; it "
                                        "must be a positive number (bandwidth_mbps: 50)")
            if not (math.isfinite(acc.latency_s) and acc.latency_s >= 0):
                raise TopologyError(f"{where}: device {dev!r} access latency is "
                                    f"{acc.latency_s!r}; it must be >= 0")

    def link_of(self, dev: str) -> Access | None:
        """The access link of ``dev``; None for the broker's own device (loopback)."""
        if dev == self.broker_device:
            return None
        return self.access.get(dev)

    def restricted(self, keep: set[str]) -> "Star":
        return replace(self, access={d: a for d, a in self.access.items() if d in keep},
                       broker_device=self.broker_device,
                       medium=frozenset(d for d in self.medium if d in keep))

    def with_access(self, dev: str, access: Access) -> "Star":
        return replace(self, access={**self.access, dev: access})

    def scaled(self, bw_factor: float = 1.0, lat_factor: float = 1.0,
               cap_bps: float | None = None) -> "Star":
        out = {}
        for d, a in self.access.items():
            a = a.scaled(bw_factor, lat_factor)
            if cap_bps is not None:
                a = Access(min(a.up_bps, cap_bps), min(a.down_bps, cap_bps), a.latency_s)
            out[d] = a
        return replace(self, access=out)

    def hops(self, a: str, b: str) -> list[tuple[str, str, float, float]]:
        """The access hops of a piece a -> b: [(from, to, bandwidth_bps, latency_s)],
        through ``BROKER``; a hop on the broker's own device is left out."""
        out = []
        up, down = self.link_of(a), self.link_of(b)
        if up is not None:
            out.append((a, BROKER, up.up_bps, up.latency_s))
        if down is not None:
            out.append((BROKER, b, down.down_bps, down.latency_s))
        return out

    def path_time(self, a: str, b: str, nbytes: float) -> float:
        return sum(lat + nbytes * 8.0 / bps for _, _, bps, lat in self.hops(a, b))

    def inbound_time(self, dev: str, nbytes: float) -> float:
        """Seconds for ``nbytes`` from the broker's side (a client's input) to reach
        ``dev``: its downlink (0 for the broker's own device)."""
        acc = self.link_of(dev)
        return 0.0 if acc is None else acc.latency_s + nbytes * 8.0 / acc.down_bps

    def virtual(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth_bps, latency_s) of the virtual a-b link (slower direction)."""
        def per_bit(x: str, y: str) -> tuple[float, float]:
            hops = self.hops(x, y)
            return (sum(1.0 / bps for _, _, bps, _ in hops), sum(l for *_, l in hops))
        (s1, l1), (s2, l2) = per_bit(a, b), per_bit(b, a)
        s = max(s1, s2)
        return (1.0 / s if s > 0 else 1e12, max(l1, l2))

    def to_dict(self) -> dict[str, Any]:
        return {"access": {d: a.to_dict() for d, a in self.access.items()},
                "broker_device": self.broker_device, "broker_host": self.broker_host,
                "medium": sorted(self.medium)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Star":
        return cls(access={str(k): Access.from_dict(v) for k, v in d["access"].items()},
                   broker_device=d.get("broker_device"),
                   broker_host=str(d.get("broker_host") or "broker"),
                   medium=frozenset(d.get("medium") or ()))


__all__ = ["Access", "BROKER", "Star"]
