"""The live mesh as a pure fold over membership and telemetry events.

``apply(state, event) -> state`` never mutates: ``MeshState`` is frozen and every
mapping in it is a fresh read-only copy. Each node carries a session counter
(its birth counter, also in its MQTT will): an event whose session is older than
the one the state knows for that node is stale and ignored, so a late "offline"
from a previous life never removes a node that has come back.

Rules, per node with known session S (none if never seen):
- NodeOnline(s):  s > S -> online with the new caps (old link measurements dropped);
                  s == S -> online with refreshed caps (a node whose will fired while it
                  was unreachable re-announces itself after reconnecting: per-topic
                  order in MQTT means a same-session birth after the offline is newer);
                  s < S -> ignored.
- NodeOffline(s): s >= S -> offline (its link measurements dropped), S = s;
                  s < S -> ignored.
- NodeCleared:    the retained record was cleared: the node is forgotten.
- NodeHeard:      the node answered (a heartbeat or a live birth) in this life: marked
                  heard (a new session starts unheard again).
- Bounded: at most ``MAX_MEMBERS`` records. A birth of a new node when full evicts
  the oldest offline record, else the oldest never-heard one (a flood of fake
  retained births cannot lock real nodes out); only a mesh full of heard members
  refuses it (logged).
- Telemetry:      only from an online node, and (when it carries a session) only
                  for the current one; updates load and the measured links.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Union

from meshdl.errors import TopologyError
from meshdl.mesh.model import Device, Link, Mesh, Power
from meshdl.mesh.profiles import Profile
from meshdl.mesh.star import BROKER
from meshdl.security.bounds import MAX_FLOPS, sanitise

log = logging.getLogger(__name__)
MAX_MEMBERS = 256


def _frozen(d: Mapping[Any, Any] | None) -> Mapping[Any, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class NodeOnline:
    id: str
    caps: Mapping[str, Any]
    session: int


@dataclass(frozen=True)
class NodeOffline:
    id: str
    session: int


@dataclass(frozen=True)
class Telemetry:
    """links: neighbour id -> {"rtt_s": float, "throughput_bps": float} (either may
    be missing)."""

    id: str
    load: float = 0.0
    links: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    session: int | None = None


@dataclass(frozen=True)
class NodeCleared:
    """The node's retained state record was cleared (empty payload): forget it."""

    id: str


@dataclass(frozen=True)
class NodeHeard:
    """The node answered in its current life (heartbeat, live birth)."""

    id: str


Event = Union[NodeOnline, NodeOffline, Telemetry, NodeCleared, NodeHeard]


@dataclass(frozen=True)
class Member:
    id: str
    session: int
    online: bool
    caps: Mapping[str, Any] = field(default_factory=dict)
    load: float = 0.0
    heard: bool = False


@dataclass(frozen=True)
class LinkObs:
    """The latest measurement of an undirected link (as reported by ``by``). Both
    ends of a device-to-device link report it: ``ends`` keeps each end's latest
    (node, rtt_s, throughput_bps) and the figures are the conservative pair (the
    larger RTT, the smaller rate), so two ends that disagree do not alternate."""

    rtt_s: float | None
    throughput_bps: float | None
    by: str
    ends: tuple = ()
    # an access link's directions, each measured on its own (node/probe_dir.py): their
    # ratio shapes the measured series rate into an uplink and a downlink
    up_bps: float | None = None
    down_bps: float | None = None


@dataclass(frozen=True)
class MeshState:
    members: Mapping[str, Member] = field(default_factory=dict)
    links: Mapping[frozenset[str], LinkObs] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", _frozen(self.members))
        object.__setattr__(self, "links", _frozen(self.links))

    @property
    def online(self) -> list[str]:
        """Ids of the online members, sorted."""
        return sorted(m.id for m in self.members.values() if m.online)

    def to_mesh(self, base: Mesh | None = None, name: str | None = None,
                profiles: Mapping[str, Profile] | None = None) -> Mesh:
        """The live Mesh of the online members, figures from their caps (falling back
        to the base device of the same id, then to ``profiles[caps["profile"]]``), links
        from measurements (falling back to the base topology's link). A member whose
        figures are unusable (none advertised and no fallback, NaN, <= 0 FLOP/s, a
        bad power map) is left out with a logged reason: it never stops planning."""
        devices = {}
        for m in self.online:
            try:
                devices[m] = _device(self.members[m], base, profiles)
            except (TopologyError, TypeError, ValueError, KeyError) as exc:
                log.warning("left out node %s: %s", sanitise(m), exc)
        links: dict[frozenset[str], Link] = {}
        if base is not None:
            for link in base.links:
                if link.a in devices and link.b in devices:
                    links[link.key] = link
        for key, obs in self.links.items():
            a, b = sorted(key)
            if a not in devices or b not in devices:
                continue
            old = links.get(key)
            bw = obs.throughput_bps if obs.throughput_bps else (old.bandwidth_bps if old
                                                                else None)
            lat = obs.rtt_s / 2.0 if obs.rtt_s is not None else (old.latency_s if old
                                                                 else 0.001)
            if bw is None:
                log.debug("link %s-%s has no throughput figure yet; left out", a, b)
                continue
            links[key] = Link(a, b, bandwidth_bps=float(bw), latency_s=float(lat))
        star = base.star if base is not None else None
        if star is not None:       # a star: links are virtual, from the access links
            star = _measured_access(star, self.links, devices)
            star = replace(star, access={d: a for d, a in star.access.items() if d in devices})
            links = {}
        return Mesh(name=name or (base.name if base else "live"), devices=devices,
                    star=star if star is not None and star.broker_device in (None, *devices)
                    else (replace(star, broker_device=None) if star is not None else None),
                    links=tuple(links[k] for k in sorted(links, key=sorted)),
                    defaults={k: v for k, v in (base.defaults if base else {}).items()
                              if k not in ("source", "sink") or v in devices},
                    meta=base.meta if base else {})


def _measured_access(star, observed: Mapping[frozenset[str], LinkObs],
                     devices: Mapping[str, Device]):
    """A star's access links with measured figures applied: a node's probe through the
    broker back to itself (link key {node, "@broker"}) crosses its uplink then its
    downlink, so its throughput figure is the series rate; it scales the up/down pair
    to match: the directions as measured one by one when the node reported them (a
    link shaped one way only), else as declared (equal halves when nothing is)."""
    from meshdl.mesh.star import BROKER, Access
    access = dict(star.access)
    for dev in devices:
        if dev not in access and dev != star.broker_device:
            log.info("%s is not in the star topology; assuming a 50 Mbit/s, 2 ms access link "
                     "until it is measured", dev)
            access[dev] = Access(5e7, 5e7, 0.002)
    for key, obs in observed.items():
        if BROKER not in key:
            continue
        (dev,) = tuple(key - {BROKER}) or ("",)
        if dev not in devices or dev == star.broker_device:
            continue
        old = access.get(dev)
        up, down, lat = (old.up_bps, old.down_bps, old.latency_s) if old else (1e8, 1e8, 0.001)
        if obs.up_bps and obs.down_bps:
            up, down = obs.up_bps, obs.down_bps
        if obs.throughput_bps:
            series = 1.0 / (1.0 / up + 1.0 / down)
            f = float(obs.throughput_bps) / series
            up, down = up * f, down * f
        if obs.rtt_s is not None:
            lat = float(obs.rtt_s) / 2.0
        access[dev] = Access(up, down, lat)
    return replace(star, access=access)


def _device(member: Member, base: Mesh | None, profiles: Mapping[str, Profile] | None
            ) -> Device:
    caps = member.caps
    fallback: Any = None
    if base is not None and member.id in base.devices:
        fallback = base.devices[member.id]
    elif profiles and caps.get("profile") in profiles:
        fallback = profiles[caps["profile"]]

    missing = [k for k in ("flops", "memory_bytes", "power") if caps.get(k) is None]
    if missing and fallback is None:
        raise TopologyError(f"node {member.id!r} advertised no {', '.join(map(repr, missing))} "
                            "and has no base device or known profile to fall back on; "
                            "include them in its birth capabilities")

    def pick(key: str) -> Any:
        return caps[key] if caps.get(key) is not None else getattr(fallback, key)

    profile = caps.get("profile") or (getattr(fallback, "profile", None)
                                      or getattr(fallback, "name", None) or "custom")
    meta = dict(getattr(fallback, "meta", {}) or {})
    meta.update({"load": member.load, "session": member.session})
    power = pick("power")
    if isinstance(power, Mapping):
        base_power = getattr(fallback, "power", None)
        merged = {**(base_power.to_dict() if base_power else {}), **power}
        try:
            power = Power.from_dict(merged)
        except (KeyError, TypeError, ValueError):
            raise TopologyError(f"node {member.id!r} advertised power {dict(power)!r}; it needs "
                                "compute_w and tx_w (watts)") from None
    flops, memory = float(pick("flops")), int(pick("memory_bytes"))
    if not (math.isfinite(flops) and 0 < flops <= MAX_FLOPS) or memory <= 0:
        raise TopologyError(f"node {sanitise(member.id)} advertised {flops!r} FLOP/s and "
                            f"{memory!r} bytes; both must be finite and > 0")
    if not isinstance(power, Power) or not all(
            math.isfinite(w) and w >= 0 for w in power.to_dict().values()):
        raise TopologyError(f"node {sanitise(member.id)} advertised an unusable power map")
    return Device(id=member.id, profile=str(profile), flops=flops,
                  memory_bytes=memory, power=power, meta=meta)


def _drop_links_of(links: Mapping[frozenset[str], LinkObs], node: str
                   ) -> dict[frozenset[str], LinkObs]:
    return {k: v for k, v in links.items() if node not in k}


def apply(state: MeshState, event: Event) -> MeshState:
    """The state after ``event`` (pure; stale events return ``state`` unchanged)."""
    known = state.members.get(event.id)
    if isinstance(event, NodeCleared):
        if known is None:
            return state
        return MeshState({k: v for k, v in state.members.items() if k != event.id},
                         _drop_links_of(state.links, event.id))
    if isinstance(event, NodeOnline):
        if known is not None and event.session < known.session:
            log.debug("stale online of %s (session %d, known %d)", event.id, event.session,
                      known.session)
            return state
        if known is None and len(state.members) >= MAX_MEMBERS:
            victim = _eviction_victim(state)
            if victim is None:
                log.warning("ignored birth of %s: the mesh already knows %d nodes, all "
                            "heard (the cap)", sanitise(event.id), MAX_MEMBERS)
                return state
            log.info("evicted %s (%s) to make room for %s (at most %d members)",
                     sanitise(victim), "offline" if not state.members[victim].online
                     else "never heard", sanitise(event.id), MAX_MEMBERS)
            state = apply(state, NodeCleared(victim))
        new_life = known is None or event.session > known.session
        member = Member(event.id, event.session, True, _frozen(event.caps),
                        0.0 if new_life else known.load,  # type: ignore[union-attr]
                        heard=False if new_life else known.heard)  # type: ignore[union-attr]
        links = _drop_links_of(state.links, event.id) if new_life else state.links
        return MeshState({**state.members, event.id: member}, links)
    if isinstance(event, NodeHeard):
        if known is None or not known.online or known.heard:
            return state
        return MeshState({**state.members, event.id: replace(known, heard=True)}, state.links)
    if isinstance(event, NodeOffline):
        if known is not None and event.session < known.session:
            log.debug("stale offline of %s (session %d, known %d)", event.id, event.session,
                      known.session)
            return state
        caps = known.caps if known is not None else {}
        member = Member(event.id, event.session, False, caps, 0.0)
        return MeshState({**state.members, event.id: member},
                         _drop_links_of(state.links, event.id))
    if isinstance(event, Telemetry):
        if known is None or not known.online or (event.session is not None
                                                 and event.session != known.session):
            return state
        links = dict(state.links)
        for nb, fig in event.links.items():
            nb = str(nb)
            if nb == event.id or (nb not in state.members and nb != BROKER):
                continue                 # links only between known members (or a node's
                                         # access link to the broker): bounded
            key = frozenset((event.id, nb))
            prev = state.links.get(key)
            ends = tuple(e for e in (prev.ends if prev is not None else ())
                         if e[0] != event.id)[-1:] + (
                (event.id, _opt(fig.get("rtt_s")), _opt(fig.get("throughput_bps"))),)
            rtts = [e[1] for e in ends if e[1] is not None]
            rates = [e[2] for e in ends if e[2] is not None]
            up, down = _rate(fig.get("up_bps")), _rate(fig.get("down_bps"))
            if (up is None or down is None) and prev is not None:
                up, down = prev.up_bps, prev.down_bps   # the last measured shape holds
            links[key] = LinkObs(rtt_s=max(rtts) if rtts else None,
                                 throughput_bps=min(rates) if rates else None,
                                 by=event.id, ends=ends,
                                 up_bps=up if nb == BROKER else None,
                                 down_bps=down if nb == BROKER else None)
        return MeshState({**state.members, event.id: replace(known, load=float(event.load))},
                         links)
    raise TypeError(f"not a mesh event: {event!r}")


def _eviction_victim(state: MeshState) -> str | None:
    """The oldest offline record, else the oldest never-heard online one, else None."""
    unheard = None
    for mid, m in state.members.items():          # insertion order: oldest first
        if not m.online:
            return mid
        if unheard is None and not m.heard:
            unheard = mid
    return unheard


def _opt(v: Any) -> float | None:
    return None if v is None else float(v)


def _rate(v: Any) -> float | None:
    """A usable rate (a positive finite number), else None."""
    return float(v) if type(v) in (int, float) and 0 < v < float("inf") else None


def fold(events: Iterable[Event], state: MeshState | None = None) -> MeshState:
    """apply() over ``events`` from ``state`` (default: empty)."""
    out = state if state is not None else MeshState()
    for event in events:
        out = apply(out, event)
    return out


def link_changed(old: Link | None, new: Link | None, threshold: float = 0.3,
                 latency_floor_s: float = 0.001) -> bool:
    """True when a link appeared, vanished, or its bandwidth moved by more than
    ``threshold`` (relative), or its latency by more than max(threshold * old,
    latency_floor_s): the cue to re-plan."""
    if old is None or new is None:
        return (old is None) != (new is None)
    if abs(new.bandwidth_bps - old.bandwidth_bps) > threshold * old.bandwidth_bps:
        return True
    return abs(new.latency_s - old.latency_s) > max(threshold * old.latency_s,
                                                      latency_floor_s)


def changed_links(old: Mesh, new: Mesh, threshold: float = 0.3) -> list[tuple[str, str]]:
    """Device pairs whose link ``link_changed`` between two meshes, sorted."""
    pairs = {l.key for l in old.links} | {l.key for l in new.links}
    out = []
    for key in pairs:
        a, b = sorted(key)
        if link_changed(old.find_link(a, b), new.find_link(a, b), threshold):
            out.append((a, b))
    return sorted(out)


def mesh_changed(old: Mesh | None, new: Mesh, threshold: float = 0.3) -> bool:
    """Pure: devices joined or left, a device's FLOP/s moved by more than
    ``threshold``, or a link changed (``link_changed``; on a star mesh, an access link)."""
    if old is None or set(old.devices) != set(new.devices):
        return True
    for d, dev in new.devices.items():
        before = old.devices[d].flops
        if abs(dev.flops - before) > threshold * before:
            return True
    return bool(changed_links(old, new, threshold))


class ReplanGate:
    """When to re-plan, without flapping: at once when devices join or leave; for a
    link (or FLOP/s) change beyond ``threshold`` only once it has persisted for
    ``confirm_s`` (e.g. one telemetry period: seen in two periods). A change that goes
    back under the threshold meanwhile is forgotten. ``pending_until`` tells the caller
    when to look again. The clock is passed in (``now``), so this stays pure."""

    def __init__(self, threshold: float = 0.3, confirm_s: float = 0.0) -> None:
        self.threshold, self.confirm_s = threshold, confirm_s
        self._since: float | None = None

    @property
    def pending_until(self) -> float | None:
        return None if self._since is None else self._since + self.confirm_s

    def check(self, old: Mesh | None, new: Mesh, now: float) -> bool:
        if old is None or set(old.devices) != set(new.devices):
            self._since = None
            return True
        if not mesh_changed(old, new, self.threshold):
            self._since = None
            return False
        if self._since is None:
            self._since = now
        if now - self._since >= self.confirm_s:
            self._since = None
            return True
        return False
