"""The mesh value types: ``Power``, ``Device``, ``Link`` and ``Mesh``.

Units are SI everywhere in code: FLOP/s, bytes, watts, bit/s, seconds. (The YAML
files use Mbit/s and ms for readability; ``meshdl.mesh.loader`` converts.)

A ``Mesh`` is immutable: every "change" (``with_bandwidth_cap``, ``without``,
``with_link``...) returns a new mesh. It validates itself on construction, so a
``Mesh`` that exists is well formed. Its networkx view and its routes are
computed on first use and cached on the instance.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any

import networkx as nx

from meshdl.errors import TopologyError
from meshdl.mesh.star import Access, Star

log = logging.getLogger(__name__)

DEFAULT_ROUTE_BYTES = 1 << 20
_ROUTE_CACHE_MAX = 4096
_BAD_ID_CHARS = frozenset("/+#")


@dataclass(frozen=True)
class Power:
    """Whole-device electrical power (watts) while computing, sending, receiving, idle."""

    compute_w: float
    tx_w: float
    rx_w: float
    idle_w: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"compute_w": self.compute_w, "tx_w": self.tx_w, "rx_w": self.rx_w,
                "idle_w": self.idle_w}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Power) -> Power:
        if isinstance(d, Power):
            return d
        return cls(compute_w=float(d["compute_w"]), tx_w=float(d["tx_w"]),
                   rx_w=float(d.get("rx_w", d["tx_w"])), idle_w=float(d.get("idle_w", 0.0)))


@dataclass(frozen=True)
class Device:
    """One mesh member: effective FLOP/s, memory, power and free-form ``meta``
    (e.g. ``group``, ``groups``, ``pos``, ``load``)."""

    id: str
    profile: str
    flops: float
    memory_bytes: int
    power: Power
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "flops": self.flops, "memory_bytes": self.memory_bytes,
                "power": self.power.to_dict(), "meta": plain(self.meta)}

    @classmethod
    def from_dict(cls, device_id: str, d: Mapping[str, Any]) -> Device:
        return cls(id=str(device_id), profile=str(d.get("profile", "custom")),
                   flops=float(d["flops"]), memory_bytes=int(d["memory_bytes"]),
                   power=Power.from_dict(d["power"]), meta=dict(d.get("meta") or {}))


@dataclass(frozen=True)
class Link:
    """An undirected link. ``bandwidth_bps`` in bit/s, ``latency_s`` one-way seconds."""

    a: str
    b: str
    bandwidth_bps: float
    latency_s: float = 0.001

    @property
    def key(self) -> frozenset[str]:
        return frozenset((self.a, self.b))

    def other(self, end: str) -> str:
        """The end of the link that is not ``end``."""
        if end == self.a:
            return self.b
        if end == self.b:
            return self.a
        raise TopologyError(f"device {end!r} is not an end of link {self.a}-{self.b}")

    def transfer_s(self, nbytes: float) -> float:
        """Time for ``nbytes`` to cross this hop: latency + serialisation."""
        return self.latency_s + nbytes * 8.0 / self.bandwidth_bps

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "bandwidth_bps": self.bandwidth_bps,
                "latency_s": self.latency_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Link:
        return cls(a=str(d["a"]), b=str(d["b"]), bandwidth_bps=float(d["bandwidth_bps"]),
                   latency_s=float(d.get("latency_s", 0.001)))


def plain(value: Any) -> Any:
    """A JSON/msgpack-safe copy of ``value`` (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _positive(value: float, what: str, fix: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise TopologyError(f"{what} is {value!r}; it must be a positive number. {fix}")


@dataclass(frozen=True, eq=False)
class Mesh:
    """Devices and undirected links. ``defaults`` may hold ``source``/``sink``;
    ``meta`` keeps descriptive data (description, provenance, power groups)."""

    name: str
    devices: Mapping[str, Device]
    links: tuple[Link, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    star: Star | None = None     # set: every piece goes through the broker (see mesh/star.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", MappingProxyType(dict(self.devices)))
        if self.star is not None:
            self.star.validate(self.devices, f"mesh {self.name!r}")
            object.__setattr__(self, "star", self.star.restricted(set(self.devices)))
            ids = sorted(self.devices)
            virtual = []
            for i, a in enumerate(ids):
                for b in ids[i + 1:]:
                    bps, lat = self.star.virtual(a, b)
                    virtual.append(Link(a, b, bandwidth_bps=bps, latency_s=lat))
            object.__setattr__(self, "links", tuple(virtual))
        object.__setattr__(self, "links", tuple(self.links))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))
        object.__setattr__(self, "_route_cache", {})
        self.validate()

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> Mesh:
        """Raise TopologyError on any malformed device or link; return self.
        A disconnected mesh is allowed (routing between its parts raises)."""
        where = f"mesh {self.name!r}"
        for key, dev in self.devices.items():
            if not isinstance(dev, Device):
                raise TopologyError(f"{where}: device {key!r} is a {type(dev).__name__}, "
                                    "not a Device")
            if key != dev.id:
                raise TopologyError(f"{where}: device stored under {key!r} has id {dev.id!r}; "
                                    "use the same id for both")
            check_device_id(dev.id, where)
            _positive(dev.flops, f"{where}: device {dev.id!r} flops",
                      "Give its effective FLOP/s, e.g. 1.5e9.")
            _positive(dev.memory_bytes, f"{where}: device {dev.id!r} memory_bytes",
                      "Give its memory in bytes, e.g. 1073741824.")
            for name, watts in dev.power.to_dict().items():
                if not (math.isfinite(watts) and watts >= 0):
                    raise TopologyError(f"{where}: device {dev.id!r} power {name} is {watts!r}; "
                                        "power figures must be >= 0 watts.")
        seen: dict[frozenset[str], Link] = {}
        for link in self.links:
            for end in (link.a, link.b):
                if end not in self.devices:
                    raise TopologyError(
                        f"{where}: link {link.a}-{link.b} names unknown device {end!r}; "
                        f"known devices: {', '.join(sorted(self.devices)) or '(none)'}. "
                        "Add the device or fix the link.")
            if link.a == link.b:
                raise TopologyError(f"{where}: link {link.a}-{link.b} is a self-loop; "
                                    "remove it (a device needs no link to itself).")
            if link.key in seen:
                raise TopologyError(f"{where}: link {link.a}-{link.b} is listed twice; "
                                    "links are undirected, keep one entry per device pair.")
            seen[link.key] = link
            _positive(link.bandwidth_bps, f"{where}: link {link.a}-{link.b} bandwidth",
                      "Give its throughput, e.g. bandwidth_mbps: 50.")
            if not (math.isfinite(link.latency_s) and link.latency_s >= 0):
                raise TopologyError(f"{where}: link {link.a}-{link.b} latency is "
                                    f"{link.latency_s!r}; it must be >= 0 seconds.")
        return self

    # ---- views ------------------------------------------------------------------------
    @cached_property
    def _by_pair(self) -> dict[frozenset[str], Link]:
        return {link.key: link for link in self.links}

    @cached_property
    def graph(self) -> nx.Graph:
        """A frozen networkx view: node attrs profile/flops/memory_bytes/power/meta and
        compute_w/tx_w/rx_w/idle_w; edge attrs bandwidth_bps/latency_s/link."""
        g = nx.Graph(name=self.name)
        for dev in self.devices.values():
            g.add_node(dev.id, profile=dev.profile, flops=dev.flops,
                       memory_bytes=dev.memory_bytes, power=dev.power, meta=dev.meta,
                       **dev.power.to_dict())
        for link in self.links:
            g.add_edge(link.a, link.b, bandwidth_bps=link.bandwidth_bps,
                       latency_s=link.latency_s, link=link)
        return nx.freeze(g)

    def device(self, device_id: str) -> Device:
        try:
            return self.devices[device_id]
        except KeyError:
            raise TopologyError(
                f"mesh {self.name!r} has no device {device_id!r}; known devices: "
                f"{', '.join(sorted(self.devices))}") from None

    def link(self, a: str, b: str) -> Link:
        """The link between a and b (either order); TopologyError when there is none."""
        self.device(a)
        self.device(b)
        try:
            return self._by_pair[frozenset((a, b))]
        except KeyError:
            raise TopologyError(f"mesh {self.name!r} has no link between {a!r} and {b!r}; "
                                f"use mesh.route({a!r}, {b!r}) for a multi-hop path") from None

    def has_link(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._by_pair

    def find_link(self, a: str, b: str) -> Link | None:
        """The a-b link, or None (no error)."""
        return self._by_pair.get(frozenset((a, b)))

    def neighbours(self, a: str) -> list[str]:
        """Direct neighbours of a, sorted."""
        self.device(a)
        return sorted(self.graph.neighbors(a))

    def is_connected(self) -> bool:
        return len(self.devices) > 0 and nx.is_connected(self.graph)

    # ---- routing ----------------------------------------------------------------------
    def _paths_from(self, a: str, nbytes: int) -> dict[str, list[str]]:
        key = (a, int(nbytes))
        cache: dict = self._route_cache  # type: ignore[attr-defined]
        if key not in cache:
            self.device(a)
            if len(cache) >= _ROUTE_CACHE_MAX:   # many message sizes: start afresh
                cache.clear()
            bits = 8.0 * nbytes

            def cost(_u: str, _v: str, e: Mapping[str, Any]) -> float:
                return e["latency_s"] + bits / e["bandwidth_bps"]

            cache[key] = nx.single_source_dijkstra_path(self.graph, a, weight=cost)
        return cache[key]

    def route(self, a: str, b: str, nbytes: int = DEFAULT_ROUTE_BYTES) -> list[str]:
        """Fastest path a -> b for a message of ``nbytes`` (per hop: latency +
        nbytes*8/bandwidth, store-and-forward). [a] when a == b."""
        self.device(b)
        path = self._paths_from(a, nbytes).get(b)
        if path is None:
            raise TopologyError(f"mesh {self.name!r}: no path between {a!r} and {b!r} "
                                "(they are in disconnected parts of the mesh); add a link "
                                "or pick devices in the same component")
        return list(path)

    def routes_from(self, a: str, nbytes: int = DEFAULT_ROUTE_BYTES) -> dict[str, list[str]]:
        """Fastest path from a to every reachable device."""
        return {dst: list(p) for dst, p in self._paths_from(a, nbytes).items()}

    def path_time(self, path: Iterable[str], nbytes: float) -> float:
        """Store-and-forward time for nbytes along ``path`` (no contention)."""
        nodes = list(path)
        return sum(self.link(u, v).transfer_s(nbytes) for u, v in zip(nodes, nodes[1:]))

    def transfer_time(self, a: str, b: str, nbytes: int = DEFAULT_ROUTE_BYTES) -> float:
        """Time for nbytes along ``route(a, b, nbytes)``."""
        return self.path_time(self.route(a, b, nbytes), nbytes)

    def hops(self, a: str, b: str) -> int:
        """Fewest hops between a and b (BFS)."""
        self.device(a)
        self.device(b)
        try:
            return nx.shortest_path_length(self.graph, a, b)
        except nx.NetworkXNoPath:
            raise TopologyError(f"mesh {self.name!r}: no path between {a!r} and {b!r} "
                                "(disconnected); add a link between their parts") from None

    def hop_counts(self) -> dict[str, dict[str, int]]:
        """All-pairs BFS hop counts (only reachable pairs)."""
        return {a: dict(d) for a, d in nx.all_pairs_shortest_path_length(self.graph)}

    # ---- derived meshes ---------------------------------------------------------------
    def _derive(self, devices: Mapping[str, Device] | None = None,
                links: Iterable[Link] | None = None, name: str | None = None) -> Mesh:
        return Mesh(name=name or self.name,
                    devices=self.devices if devices is None else devices,
                    links=self.links if links is None else tuple(links),
                    defaults={k: v for k, v in self.defaults.items()
                              if devices is None or k not in ("source", "sink")
                              or v in devices},
                    meta=self.meta, star=self.star)

    def with_bandwidth_cap(self, mbps: float | None) -> Mesh:
        """DISNET's B_max: every link's bandwidth becomes min(bandwidth, mbps Mbit/s)."""
        if mbps is None:
            return self
        _positive(mbps, "bandwidth cap (Mbit/s)", "Pass e.g. bandwidth_cap_mbps=10.")
        cap = float(mbps) * 1e6
        if self.star is not None:
            return replace(self, star=self.star.scaled(cap_bps=cap))
        return self._derive(links=[replace(l, bandwidth_bps=min(l.bandwidth_bps, cap))
                                   for l in self.links])

    def with_latency(self, latency_s: float) -> Mesh:
        """Every link's latency set to ``latency_s`` (0 reproduces the seeds' formulas);
        on a star mesh, every access link's."""
        if self.star is not None:
            return replace(self, star=replace(self.star, access={
                d: Access(a.up_bps, a.down_bps, float(latency_s))
                for d, a in self.star.access.items()}))
        return self._derive(links=[replace(l, latency_s=float(latency_s)) for l in self.links])

    def with_link(self, a: str, b: str, bandwidth_bps: float | None = None,
                  latency_s: float | None = None, *, bandwidth_mbps: float | None = None,
                  latency_ms: float | None = None) -> Mesh:
        """Add or replace the a-b link. Unspecified figures keep the old link's values
        (a new link needs a bandwidth; its latency defaults to 1 ms)."""
        if bandwidth_mbps is not None:
            bandwidth_bps = bandwidth_mbps * 1e6
        if latency_ms is not None:
            latency_s = latency_ms / 1e3
        old = self._by_pair.get(frozenset((a, b)))
        if old is None and bandwidth_bps is None:
            raise TopologyError(f"with_link({a!r}, {b!r}): a new link needs a bandwidth; "
                                "pass bandwidth_bps= or bandwidth_mbps=")
        new = Link(a, b,
                   bandwidth_bps=float(bandwidth_bps if bandwidth_bps is not None
                                       else old.bandwidth_bps),  # type: ignore[union-attr]
                   latency_s=float(latency_s if latency_s is not None
                                   else (old.latency_s if old else 0.001)))
        links = [l for l in self.links if l.key != new.key] + [new]
        return self._derive(links=links)

    def subgraph(self, device_ids: Iterable[str], name: str | None = None) -> Mesh:
        """The mesh restricted to ``device_ids`` and the links among them."""
        keep = list(device_ids)
        for d in keep:
            self.device(d)
        kept = set(keep)
        return self._derive(devices={d: self.devices[d] for d in self.devices if d in kept},
                            links=[l for l in self.links if l.a in kept and l.b in kept],
                            name=name)

    def without(self, device_ids: Iterable[str]) -> Mesh:
        """The mesh with ``device_ids`` (and their links) removed."""
        drop = list(device_ids)
        for d in drop:
            self.device(d)
        gone = set(drop)
        return self.subgraph([d for d in self.devices if d not in gone])

    def with_access(self, device: str, bandwidth_bps: float | None = None,
                    latency_s: float | None = None, *, up_bps: float | None = None,
                    down_bps: float | None = None) -> Mesh:
        """A star mesh with ``device``'s access link changed (unspecified figures kept)."""
        if self.star is None:
            raise TopologyError(f"mesh {self.name!r} has no broker (not a star mesh); "
                                "change a device-to-device link with with_link()")
        self.device(device)
        old = self.star.access.get(device)
        if old is None:
            raise TopologyError(f"device {device!r} hosts the broker of mesh {self.name!r}; "
                                "it has no access link to change")
        new = Access(float(up_bps or bandwidth_bps or old.up_bps),
                     float(down_bps or bandwidth_bps or old.down_bps),
                     float(old.latency_s if latency_s is None else latency_s))
        return replace(self, star=self.star.with_access(device, new))

    def dilated(self, k: float) -> Mesh:
        """Time dilation by ``k``: every device k times slower, every link's bandwidth
        / k and latency x k (``meta["time_scale"]`` multiplied by k). Plans made on
        the dilated mesh are the same; every time in them is k times longer."""
        _positive(k, "time scale", "Pass e.g. --time-scale 4.")
        if k == 1:
            return self
        devices = {d: replace(dev, flops=dev.flops / k) for d, dev in self.devices.items()}
        meta = {**self.meta, "time_scale": float(self.meta.get("time_scale", 1.0)) * k}
        links = [replace(l, bandwidth_bps=l.bandwidth_bps / k, latency_s=l.latency_s * k)
                 for l in self.links]
        star = self.star.scaled(1.0 / k, k) if self.star is not None else None
        return Mesh(name=self.name, devices=devices, links=tuple(links),
                    defaults=self.defaults, meta=meta, star=star)

    @property
    def time_scale(self) -> float:
        return float(self.meta.get("time_scale", 1.0))

    def broker_path(self, a: str, b: str) -> list[str]:
        """The physical path of a piece a -> b: [a, "@broker", b] on a star mesh (the
        broker's own device leaves out its loopback hop), else ``route(a, b)``."""
        if self.star is None:
            return self.route(a, b)
        self.device(a)
        self.device(b)
        if a == b:
            return [a]
        return [a] + [h[1] for h in self.star.hops(a, b)]

    # ---- plain data -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/msgpack-safe data (SI units); inverse of ``from_dict``."""
        out = {"name": self.name,
               "devices": {d.id: d.to_dict() for d in self.devices.values()},
               "links": [l.to_dict() for l in self.links],
               "defaults": plain(self.defaults), "meta": plain(self.meta)}
        if self.star is not None:
            out["star"] = self.star.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Mesh:
        try:
            devices = {str(k): Device.from_dict(k, v) for k, v in d["devices"].items()}
            links = tuple(Link.from_dict(l) for l in d.get("links", ()))
            star = Star.from_dict(d["star"]) if d.get("star") else None
            return cls(name=str(d.get("name", "mesh")), devices=devices, links=links,
                       defaults=dict(d.get("defaults") or {}), meta=dict(d.get("meta") or {}),
                       star=star)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TopologyError(f"mesh data is malformed ({type(exc).__name__}: {exc}); "
                                "pass what Mesh.to_dict() produces") from exc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mesh) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.devices)), len(self.links)))

    def __repr__(self) -> str:
        return (f"Mesh({self.name!r}, {len(self.devices)} devices, "
                f"{len(self.links)} links)")


def check_device_id(device_id: Any, where: str) -> None:
    """Device ids become MQTT topic levels: non-empty strings without / + #."""
    if not isinstance(device_id, str) or not device_id or _BAD_ID_CHARS & set(device_id):
        raise TopologyError(f"{where}: device id {device_id!r} is invalid; ids are non-empty "
                            "strings without '/', '+' or '#' (they become MQTT topic levels)")
