"""Link traces: links that change during a run (``mesh up --link-trace FILE``).

A trace file has one event per line, ``time_s, target, bandwidth_mbps[, latency_ms]``
(commas or spaces; ``#`` starts a comment). ``target`` is a device (its access link
to the broker on a star mesh, both directions) or ``a-b`` (a device-to-device link).
Times are seconds of the real world from the moment the mesh is ready; under a time
scale K the player waits K times longer and the links get bandwidth / K.

``Trace.mesh_at(mesh, t)`` is the mesh of that moment (the oracle of
tools/bench_dynamics.py plans on it); ``TracePlayer`` applies the events on time.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from meshdl.errors import MeshdlError
from meshdl.mesh import Mesh

log = logging.getLogger(__name__)

MAX_EVENTS = 100000


class TraceError(MeshdlError):
    """A link trace file is malformed or names links the mesh does not have."""


@dataclass(frozen=True)
class LinkEvent:
    t: float                  # seconds (real world) since the start
    target: str               # device id, or "a-b"
    bandwidth_bps: float
    latency_s: float | None = None

    def __str__(self) -> str:
        lat = "" if self.latency_s is None else f", {self.latency_s * 1e3:g} ms"
        return f"t={self.t:g} s {self.target}: {self.bandwidth_bps / 1e6:g} Mbit/s{lat}"


@dataclass(frozen=True)
class Trace:
    events: tuple[LinkEvent, ...]

    def check(self, mesh: Mesh) -> "Trace":
        for e in self.events:
            self._resolve(mesh, e)
        return self

    @staticmethod
    def _resolve(mesh: Mesh, e: LinkEvent) -> tuple[str, str | None]:
        if e.target in mesh.devices:
            if mesh.star is None:
                raise TraceError(f"link trace names device {e.target!r}, but mesh "
                                 f"{mesh.name!r} has no broker (no access links); name a "
                                 "link as a-b")
            if mesh.star.link_of(e.target) is None:
                raise TraceError(f"link trace names {e.target!r}, which hosts the broker "
                                 "(its link is loopback)")
            return e.target, None
        a, sep, b = e.target.partition("-")
        if sep and mesh.star is None and mesh.has_link(a, b):
            return a, b
        raise TraceError(f"link trace names {e.target!r}: not a device of mesh {mesh.name!r} "
                         f"nor a link a-b of it; devices: {', '.join(sorted(mesh.devices))}")

    def mesh_at(self, mesh: Mesh, t: float) -> Mesh:
        """``mesh`` with every event up to time ``t`` (real seconds) applied."""
        out = mesh
        for e in self.events:
            if e.t > t:
                break
            a, b = self._resolve(mesh, e)
            if b is None:
                out = out.with_access(a, bandwidth_bps=e.bandwidth_bps, latency_s=e.latency_s)
            else:
                out = out.with_link(a, b, e.bandwidth_bps, e.latency_s)
        return out

    @property
    def times(self) -> list[float]:
        return sorted({e.t for e in self.events})


def parse_trace(text: str, where: str = "<trace>") -> Trace:
    events = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p for p in line.replace(",", " ").split() if p]
        if len(parts) not in (3, 4):
            raise TraceError(f"{where}:{n}: expected 'time_s, target, bandwidth_mbps"
                             f"[, latency_ms]', got {raw.strip()!r}")
        try:
            t, mbps = float(parts[0]), float(parts[2])
            ms = float(parts[3]) if len(parts) == 4 else None
        except ValueError:
            raise TraceError(f"{where}:{n}: time, bandwidth and latency must be numbers: "
                             f"{raw.strip()!r}") from None
        if not (t >= 0 and mbps > 0 and (ms is None or ms >= 0)) or t != t:
            raise TraceError(f"{where}:{n}: time >= 0, bandwidth > 0 Mbit/s and latency "
                             f">= 0 ms please: {raw.strip()!r}")
        events.append(LinkEvent(t, parts[1], mbps * 1e6, None if ms is None else ms / 1e3))
        if len(events) > MAX_EVENTS:
            raise TraceError(f"{where}: more than {MAX_EVENTS} events")
    if not events:
        raise TraceError(f"{where}: no events (lines 'time_s, target, bandwidth_mbps')")
    return Trace(tuple(sorted(events, key=lambda e: e.t)))


def load_trace(path: str | Path) -> Trace:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TraceError(f"cannot read link trace {p}: {exc}") from None
    return parse_trace(text, str(p))


Apply = Callable[..., None]     # apply(target, up_bps=..., down_bps=...) in real units


def emulator_apply(bus, mesh_name: str, time_scale: float = 1.0) -> Apply:
    """An ``apply`` for emulated (not netns) meshes: a ``set_link`` probe tells the
    device's node its new access link (as the series rate it would measure, dilated by
    the time scale); its telemetry carries it to the leader and the other nodes."""
    from meshdl.node.probe import Probe, encode_probe
    from meshdl.wire.topics import node_probe

    def apply(target: str, up_bps: float | None = None, down_bps: float | None = None,
              latency_s: float | None = None) -> None:
        up, down = up_bps or down_bps, down_bps or up_bps
        series = 1.0 / (1.0 / up + 1.0 / down)
        link = {"peer": "@broker", "bandwidth_bps": series / time_scale}
        if latency_s is not None:
            link["latency_s"] = latency_s * time_scale
        bus.publish(node_probe(mesh_name, target),
                    encode_probe(Probe("set_link", "meshdl-trace", link=link)), qos=1)
    return apply


class TracePlayer(threading.Thread):
    """Applies a trace's events on time (t x time_scale after ``start()``) through
    ``apply(device, up_bps=, down_bps=)``; ``on_event`` sees each applied event."""

    def __init__(self, trace: Trace, apply: Apply, *, time_scale: float = 1.0,
                 on_event: Callable[[LinkEvent], None] | None = None,
                 latency: bool = False) -> None:
        """``latency``: ``apply`` also takes ``latency_s`` (emulated links do)."""
        super().__init__(daemon=True, name="link-trace")
        self._latency = latency
        self.trace, self._apply, self._k = trace, apply, float(time_scale)
        self._on_event = on_event
        self._stop = threading.Event()
        self.t0: float | None = None
        self.applied: list[tuple[float, LinkEvent]] = []   # (monotonic time, event)

    def run(self) -> None:
        self.t0 = time.monotonic()
        for e in self.trace.events:
            if self._stop.wait(max(0.0, self.t0 + e.t * self._k - time.monotonic())):
                return
            try:
                if self._latency:
                    self._apply(e.target, up_bps=e.bandwidth_bps, down_bps=e.bandwidth_bps,
                                latency_s=e.latency_s)
                else:
                    self._apply(e.target, up_bps=e.bandwidth_bps, down_bps=e.bandwidth_bps)
            except MeshdlError as exc:
                log.warning("link trace event %s not applied: %s", e, exc)
                continue
            self.applied.append((time.monotonic(), e))
            if e.latency_s is not None and not self._latency:
                log.info("link trace: latency changes are not applied to shaped links "
                         "(netem is absent); %s", e)
            if self._on_event is not None:
                self._on_event(e)

    def stop(self) -> None:
        self._stop.set()


__all__ = ["LinkEvent", "Trace", "TraceError", "TracePlayer", "emulator_apply", "load_trace",
           "parse_trace"]
