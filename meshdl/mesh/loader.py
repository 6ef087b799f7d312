"""Topology files: ``topologies/*.yaml`` (meshdl's format), any .yaml/.json path, and
the DISNET seed's JSON format ``{"name", "nodes": {id: weight}, "edges": [[a, b, mbps]]}``.

YAML format (units for humans: Mbit/s, ms)::

    name: home-4
    description: ...
    defaults: {source: pi4-a, sink: pi4-a}
    link_defaults: {bandwidth_mbps: 72.2, latency_ms: 1}     # optional
    devices:
      pi4-a: rpi4                                   # a profile name
      nano: {profile: jetson_nano_5w, flops: 3.0e+9} # profile + overrides
      x: {flops: 1.0e+9, memory_bytes: 1 GiB, power: {compute_w: 3, tx_w: 1}}
    links:
      - {a: pi4-a, b: nano, bandwidth_mbps: 60, latency_ms: 3}
      - [pi4-a, x, 20]                               # [a, b, mbps(, ms)]

A star (every piece through the MQTT broker, see ``meshdl.mesh.star``) names its
broker and gives each device an access link instead of ``links`` (default: the
profile's ``net`` figures)::

    name: home-wifi
    broker: {host: router}          # the broker's own host, or {device: pi5}
    medium: [pi5, pi4]              # optional: devices sharing one Wi-Fi cell's airtime
    devices:
      pi5: rpi5                                      # access from the profile's net
      pi4: {profile: rpi4, access: {bandwidth_mbps: 60, latency_ms: 3}}
      pc: {profile: laptop, access: {up_mbps: 40, down_mbps: 300, latency_ms: 2}}
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from meshdl.data import data_dir
from meshdl.errors import TopologyError
from meshdl.mesh.model import Device, Link, Mesh, Power, plain, check_device_id
from meshdl.mesh.profiles import Profile, list_profiles, load_profile, parse_power
from meshdl.mesh.star import Access, Star
from meshdl.mesh.yamlio import check_keys, number, read_data, require_mapping, size_bytes

log = logging.getLogger(__name__)

DEFAULT_LATENCY_MS = 1.0
_TOP_KEYS = {"name", "description", "provenance", "defaults", "link_defaults", "devices",
             "links", "power_groups", "meta", "broker", "medium"}
_DEVICE_KEYS = {"profile", "flops", "memory_bytes", "power", "meta", "pos", "group",
                "groups", "description", "access"}
_ACCESS_KEYS = {"bandwidth_mbps", "up_mbps", "down_mbps", "latency_ms"}
_LINK_KEYS = {"a", "b", "bandwidth_mbps", "latency_ms"}

# DISNET seed power by node group (watts): compute and transmit. Intended groups:
# node index <= 3, <= 7, <= 10; the seed's code actually puts 0-3 in group 0, 4-9 in 1.
DISNET_COMPUTE_W = (3.8, 2.2, 1.2)
DISNET_TX_W = (1.0, 0.8, 1.1)
DISNET_MEMORY_BYTES = 4 * 2**30


def disnet_groups(index: int) -> dict[str, int]:
    """The DISNET power group of node ``index``: intended and as the seed computes it."""
    intended = 0 if index <= 3 else 1 if index <= 7 else 2
    return {"intended": intended, "seed": 0 if index <= 3 else 1}


def list_topologies() -> list[str]:
    """Names of the installed topologies."""
    return sorted(p.stem for p in data_dir("topologies").glob("*.yaml"))


def load_topology(name_or_path: str | Path | Mesh) -> Mesh:
    """A Mesh from an installed topology name (``disnet-net0``) or a .yaml/.json path."""
    if isinstance(name_or_path, Mesh):
        return name_or_path
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml", ".json")) \
            or "/" in text or "\\" in text:
        path = Path(name_or_path)
    else:
        path = data_dir("topologies") / f"{text}.yaml"
        if not path.is_file():
            raise TopologyError(f"unknown topology {text!r}; installed topologies: "
                                f"{', '.join(list_topologies())} (or pass a path to a "
                                ".yaml/.json file)")
    data = read_data(path)
    where = str(path)
    if isinstance(data, Mapping) and "nodes" in data and "edges" in data \
            and "devices" not in data:
        return disnet_json_to_mesh(data, where, default_name=path.stem)
    return parse_topology(data, where, base_dir=path.parent, default_name=path.stem)


def parse_topology(data: Any, where: str = "<topology>", base_dir: Path | None = None,
                   default_name: str = "mesh") -> Mesh:
    """A Mesh from the parsed YAML mapping (see the module docstring)."""
    d = require_mapping(data, where)
    check_keys(d, _TOP_KEYS, where)
    devices_raw = d.get("devices")
    if not isinstance(devices_raw, Mapping) or not devices_raw:
        raise TopologyError(f"{where}: 'devices' must be a non-empty mapping of "
                            "id -> profile name or figures")
    profiles: dict[str, Profile] = {}
    devices: dict[str, Device] = {}
    access: dict[str, Access | None] = {}
    for raw_id, spec in devices_raw.items():
        dev_id = _device_id(raw_id, where)
        if dev_id in devices:
            raise TopologyError(f"{where}: device {dev_id!r} is defined twice; keep one")
        devices[dev_id] = _parse_device(dev_id, spec, f"{where}: device {dev_id!r}",
                                        profiles, base_dir)
        access[dev_id] = _parse_access(spec, f"{where}: device {dev_id!r}", profiles)
    star = _parse_star(d, devices, access, where)
    link_defaults = require_mapping(d.get("link_defaults") or {}, f"{where}: link_defaults")
    check_keys(link_defaults, {"bandwidth_mbps", "latency_ms"}, f"{where}: link_defaults")
    links_raw = d.get("links") or []
    if not isinstance(links_raw, list):
        raise TopologyError(f"{where}: 'links' must be a list of "
                            "{a, b, bandwidth_mbps, latency_ms} entries")
    links = [_parse_link(item, f"{where}: links[{i}]", link_defaults)
             for i, item in enumerate(links_raw)]
    if star is not None and links:
        raise TopologyError(f"{where}: a mesh with a broker is a star (devices reach each "
                            "other through it); remove 'links' and give devices access "
                            "links, or remove 'broker' for a device-to-device mesh")
    defaults = dict(require_mapping(d.get("defaults") or {}, f"{where}: defaults"))
    for key in ("source", "sink"):
        if key in defaults:
            defaults[key] = _device_id(defaults[key], f"{where}: defaults.{key}")
            if defaults[key] not in devices:
                raise TopologyError(f"{where}: defaults.{key} is {defaults[key]!r}, which is "
                                    "not a device of this topology; fix it or remove it")
    meta = dict(require_mapping(d.get("meta") or {}, f"{where}: meta"))
    for key in ("description", "provenance", "power_groups"):
        if key in d:
            meta[key] = d[key]
    try:
        return Mesh(name=str(d.get("name") or default_name), devices=devices,
                    links=tuple(links), defaults=defaults, meta=meta, star=star)
    except TopologyError as exc:
        raise TopologyError(f"{where}: {exc}") from None


def _parse_access(spec: Any, where: str, profiles: dict[str, Profile]) -> Access | None:
    """A device's access link: its ``access`` entry over its profile's ``net``."""
    base: dict[str, Any] = {}
    if isinstance(spec, str):
        spec = {"profile": spec}
    if isinstance(spec, Mapping) and "profile" in spec:
        prof = profiles.get(str(spec["profile"]))
        if prof is not None:
            base = dict(prof.net)
    raw = spec.get("access") if isinstance(spec, Mapping) else None
    if raw is not None:
        raw = require_mapping(raw, f"{where}.access")
        check_keys(raw, _ACCESS_KEYS, f"{where}.access")
        base.update(raw)
    if not base:
        return None
    both = base.get("bandwidth_mbps")
    up, down = base.get("up_mbps", both), base.get("down_mbps", both)
    if up is None or down is None:
        raise TopologyError(f"{where}.access needs bandwidth_mbps (or up_mbps and down_mbps)")
    up = number(up, f"{where}.access.up_mbps")
    down = number(down, f"{where}.access.down_mbps")
    ms = number(base.get("latency_ms", DEFAULT_LATENCY_MS), f"{where}.access.latency_ms")
    if up <= 0 or down <= 0 or ms < 0:
        raise TopologyError(f"{where}.access: bandwidths must be > 0 Mbit/s and latency >= 0 "
                            f"ms (got up {up}, down {down}, {ms} ms)")
    return Access(up * 1e6, down * 1e6, ms / 1e3)


def _parse_star(d: Mapping[str, Any], devices: Mapping[str, Device],
                access: Mapping[str, Access | None], where: str) -> Star | None:
    if "broker" not in d:
        if "medium" in d:
            raise TopologyError(f"{where}: 'medium' needs a 'broker' (a shared medium is "
                                "the cell of a star mesh)")
        return None
    b = d["broker"]
    if isinstance(b, str):
        b = {"device": b} if b in devices else {"host": b}
    b = require_mapping(b, f"{where}: broker")
    check_keys(b, {"device", "host"}, f"{where}: broker")
    if ("device" in b) == ("host" in b):
        raise TopologyError(f"{where}: broker is {{device: ID}} (on a device) or "
                            "{host: NAME} (its own host), exactly one of them")
    dev = _device_id(b["device"], f"{where}: broker.device") if "device" in b else None
    if dev is not None and dev not in devices:
        raise TopologyError(f"{where}: broker.device {dev!r} is not a device of this "
                            f"topology; devices: {', '.join(sorted(devices))}")
    medium_raw = d.get("medium") or []
    if medium_raw == "all":
        medium_raw = [x for x in devices if x != dev]
    if not isinstance(medium_raw, list):
        raise TopologyError(f"{where}: medium is a list of device ids sharing one cell "
                            "(or 'all')")
    medium = {_device_id(x, f"{where}: medium") for x in medium_raw}
    unknown = sorted(medium - set(devices))
    if unknown:
        raise TopologyError(f"{where}: medium names unknown device(s) {', '.join(unknown)}")
    return Star(access={k: v for k, v in access.items() if v is not None and k != dev},
                broker_device=dev, broker_host=str(b.get("host") or dev),
                medium=frozenset(medium))


def _device_id(raw: Any, where: str) -> str:
    # YAML reads unquoted 0..9 as ints: accept ints, refuse floats/bools/other.
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise TopologyError(f"{where}: device id {raw!r} must be a string (quote it)")
    dev_id = str(raw)
    check_device_id(dev_id, where)
    return dev_id


def _profile(name: str, cache: dict[str, Profile], base_dir: Path | None) -> Profile:
    if name not in cache:
        cache[name] = load_profile(name, relative_to=base_dir)
    return cache[name]


def _parse_device(dev_id: str, spec: Any, where: str, profiles: dict[str, Profile],
                  base_dir: Path | None) -> Device:
    if isinstance(spec, str):
        spec = {"profile": spec}
    spec = require_mapping(spec, where)
    check_keys(spec, _DEVICE_KEYS, where)
    meta: dict[str, Any] = dict(require_mapping(spec.get("meta") or {}, f"{where}.meta"))
    for key in ("group", "groups", "description"):
        if key in spec:
            meta[key] = spec[key]
    if "pos" in spec:
        pos = spec["pos"]
        if not isinstance(pos, list) or len(pos) not in (2, 3):
            raise TopologyError(f"{where}.pos must be [x, y] (or [x, y, z]), got {pos!r}")
        meta["pos"] = tuple(number(v, f"{where}.pos") for v in pos)
    if "profile" in spec:
        prof = _profile(str(spec["profile"]), profiles, base_dir)
        flops = number(spec.get("flops", prof.flops), f"{where}.flops")
        mem = size_bytes(spec.get("memory_bytes", prof.memory_bytes), f"{where}.memory_bytes")
        power = parse_power(spec["power"], f"{where}.power", base=prof.power) \
            if "power" in spec else prof.power
        profile_name = prof.name
    else:
        missing = [k for k in ("flops", "memory_bytes", "power") if k not in spec]
        if missing:
            raise TopologyError(f"{where}: give a profile name or all of flops, memory_bytes "
                                f"and power (missing: {', '.join(missing)})")
        flops = number(spec["flops"], f"{where}.flops")
        mem = size_bytes(spec["memory_bytes"], f"{where}.memory_bytes")
        power = parse_power(spec["power"], f"{where}.power")
        profile_name = "custom"
    if flops <= 0:
        raise TopologyError(f"{where}: flops is {flops}; it must be a positive FLOP/s figure")
    if mem <= 0:
        raise TopologyError(f"{where}: memory_bytes is {mem}; it must be positive")
    return Device(id=dev_id, profile=profile_name, flops=flops, memory_bytes=mem,
                  power=power, meta=meta)


def _parse_link(item: Any, where: str, defaults: Mapping[str, Any]) -> Link:
    if isinstance(item, list):
        if len(item) not in (2, 3, 4):
            raise TopologyError(f"{where}: a list link is [a, b, mbps] or [a, b, mbps, ms], "
                                f"got {item!r}")
        item = dict(zip(("a", "b", "bandwidth_mbps", "latency_ms"), item))
    d = require_mapping(item, where)
    check_keys(d, _LINK_KEYS, where)
    if "a" not in d or "b" not in d:
        raise TopologyError(f"{where}: a link needs both ends 'a' and 'b'")
    a, b = _device_id(d["a"], where), _device_id(d["b"], where)
    if "bandwidth_mbps" not in d and "bandwidth_mbps" not in defaults:
        raise TopologyError(f"{where}: link {a}-{b} has no bandwidth_mbps (and there is no "
                            "link_defaults.bandwidth_mbps)")
    mbps = number(d.get("bandwidth_mbps", defaults.get("bandwidth_mbps")),
                  f"{where}.bandwidth_mbps")
    ms = number(d.get("latency_ms", defaults.get("latency_ms", DEFAULT_LATENCY_MS)),
                f"{where}.latency_ms")
    if mbps <= 0:
        raise TopologyError(f"{where}: link {a}-{b} bandwidth_mbps is {mbps}; it must be > 0")
    if ms < 0:
        raise TopologyError(f"{where}: link {a}-{b} latency_ms is {ms}; it must be >= 0")
    return Link(a, b, bandwidth_bps=mbps * 1e6, latency_s=ms / 1e3)


def disnet_json_to_mesh(data: Mapping[str, Any], where: str = "<disnet json>",
                        default_name: str = "disnet",
                        latency_ms: float = DEFAULT_LATENCY_MS) -> Mesh:
    """The DISNET seed's JSON: node weight w -> w GFLOP/s; edge [a, b, mbps];
    power by the intended node group (both groupings recorded in ``meta.groups``)."""
    nodes = require_mapping(data.get("nodes"), f"{where}: nodes")
    devices = {}
    for raw_id, weight in nodes.items():
        dev_id = _device_id(raw_id, where)
        try:
            index = int(dev_id)
        except ValueError:
            raise TopologyError(f"{where}: DISNET node ids are integers, got {dev_id!r}") \
                from None
        groups = disnet_groups(index)
        g = groups["intended"]
        devices[dev_id] = Device(
            id=dev_id, profile="disnet", flops=number(weight, f"{where}: node {dev_id}") * 1e9,
            memory_bytes=DISNET_MEMORY_BYTES,
            power=Power(DISNET_COMPUTE_W[g], DISNET_TX_W[g], DISNET_TX_W[g], 0.0),
            meta={"weight": weight, "groups": groups})
    edges = data.get("edges")
    if not isinstance(edges, list):
        raise TopologyError(f"{where}: 'edges' must be a list of [a, b, mbps]")
    links = [_parse_link([str(e[0]), str(e[1]), e[2], latency_ms] if isinstance(e, list)
                         and len(e) == 3 else e, f"{where}: edges[{i}]", {})
             for i, e in enumerate(edges)]
    try:
        return Mesh(name=str(data.get("name") or default_name), devices=devices,
                    links=tuple(links),
                    meta={"power_groups": {"compute_w": list(DISNET_COMPUTE_W),
                                           "tx_w": list(DISNET_TX_W),
                                           "rx_w": list(DISNET_TX_W)}})
    except TopologyError as exc:
        raise TopologyError(f"{where}: {exc}") from None


def dump_topology(mesh: Mesh) -> str:
    """The mesh as topology YAML (explicit figures, Mbit/s and ms), loadable again."""
    devices: dict[str, Any] = {}
    installed = set(list_profiles())
    for dev in mesh.devices.values():
        entry: dict[str, Any] = {"profile": dev.profile} if dev.profile in installed else {}
        entry.update(flops=dev.flops, memory_bytes=dev.memory_bytes,
                     power=dev.power.to_dict())
        meta = {k: v for k, v in dev.meta.items() if k != "pos"}
        if "pos" in dev.meta:
            entry["pos"] = [round(float(v), 4) for v in dev.meta["pos"]]
        if meta:
            entry["meta"] = plain(meta)
        devices[dev.id] = entry
    doc: dict[str, Any] = {"name": mesh.name}
    if mesh.meta.get("time_scale"):
        doc["meta"] = {"time_scale": mesh.meta["time_scale"]}
    if mesh.defaults:
        doc["defaults"] = dict(mesh.defaults)
    doc["devices"] = devices
    if mesh.star is not None:
        st = mesh.star
        doc["broker"] = ({"device": st.broker_device} if st.broker_device is not None
                         else {"host": st.broker_host})
        if st.medium:
            doc["medium"] = sorted(st.medium)
        for dev_id, acc in st.access.items():
            devices[dev_id]["access"] = {"up_mbps": round(acc.up_bps / 1e6, 6),
                                         "down_mbps": round(acc.down_bps / 1e6, 6),
                                         "latency_ms": round(acc.latency_s * 1e3, 6)}
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
    doc["links"] = [{"a": l.a, "b": l.b, "bandwidth_mbps": round(l.bandwidth_bps / 1e6, 6),
                     "latency_ms": round(l.latency_s * 1e3, 6)} for l in mesh.links]
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
