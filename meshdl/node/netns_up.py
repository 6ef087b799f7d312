"""NetnsMeshUp: ``MeshUp`` with the broker and every node in their own network
namespaces, joined by veth pairs shaped to each device's access link.

    with NetnsMeshUp("home-wifi", model="resnet18", time_scale=4) as up:
        up.wait_ready(120)
        up.namespace("pi5")                 # -> "mdl4242xa1b2-d0"
        up.shape("pi4-a", up_bps=20e6)      # real-world bit/s (divided by the time scale)

Real TCP over real rate-limited links through a real mosquitto; the nodes pace compute
(``--emulate``, x time scale) and add only link latency themselves (``--shaped-links``),
and their telemetry measures the shaped links. Needs root and iproute2 (``ip``, ``tc``);
otherwise ``NetnsError`` says so. The topology must be a star (``broker:`` and access
links), since a namespace mesh is a star around its broker.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from meshdl.mesh import Mesh
from meshdl.node.launcher import LaunchError, MeshUp
from meshdl.node.netns import (BROKER_ADDR, BROKER_PORT, Namespaces, NetnsError,
                               check_available, cleanup_stale, in_netns, make_prefix)

log = logging.getLogger(__name__)


class NetnsMeshUp(MeshUp):
    def __init__(self, topology: str | Path | Mesh, *, time_scale: float = 1.0,
                 prefix: str | None = None, **kw) -> None:
        if kw.get("broker") is not None:
            raise LaunchError("--netns starts its own broker inside the mesh's namespaces; "
                              "leave out --broker")
        if kw.get("backend", "auto") == "amqtt":
            raise LaunchError("--netns runs mosquitto in the broker's namespace; amqtt is "
                              "not supported there")
        super().__init__(topology, **kw)
        if self.mesh_obj.star is None:
            raise LaunchError(
                f"topology {self.mesh_obj.name!r} has no broker: --netns builds a star "
                "around the broker (one shaped link per device), so the topology needs "
                "'broker:' and access links (e.g. home-wifi, home-wifi-n, home-jetson)")
        if not time_scale > 0:
            raise LaunchError(f"time scale {time_scale!r} must be positive")
        self.time_scale = float(time_scale)
        self._prefix = prefix
        self.ns: Namespaces | None = None
        self._node_args = ["--shaped-links", "--time-scale", repr(self.time_scale)] \
            + self._node_args

    def _access_bps(self) -> dict[str, tuple[float, float]]:
        k = self.time_scale
        return {d: (a.up_bps / k, a.down_bps / k)
                for d, a in self.mesh_obj.star.access.items()}

    @property
    def url(self) -> str:
        return f"mqtt://{BROKER_ADDR}:{BROKER_PORT}"

    def namespace(self, device: str) -> str:
        if self.ns is None:
            raise LaunchError("mesh not started; call start() first")
        return self.ns.ports[device].namespace

    def start(self) -> "NetnsMeshUp":
        check_available()
        cleanup_stale()
        star = self.mesh_obj.star
        self.ns = Namespaces(sorted(self.mesh_obj.devices), self._access_bps(),
                             broker_device=star.broker_device,
                             prefix=self._prefix or make_prefix())
        try:
            self.ns.create()
            in_netns(self.ns.broker_ns, self._start_inside)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_inside(self) -> None:
        """On a thread inside the broker's namespace: broker, watcher, nodes (the
        node processes then enter their own namespace with ``ip netns exec``)."""
        from meshdl.transport.broker import EmbeddedBroker
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.broker = EmbeddedBroker(None, host=BROKER_ADDR, port=BROKER_PORT,
                                     backend="mosquitto").start()
        self._topology_path = str(self._topology_arg) if isinstance(
            self._topology_arg, (str, Path)) else self._write_topology()
        from meshdl.node.status import MeshWatcher
        from meshdl.transport.paho_bus import PahoBus
        self._watch_bus = PahoBus(self.url, protocol="auto")
        self.watcher = MeshWatcher(self._watch_bus, self.mesh_name)
        for dev in self.devices:
            self.spawn(dev)

    def _write_topology(self) -> str:
        from meshdl.mesh import dump_topology
        path = self.log_dir / "topology.yaml"
        path.write_text(dump_topology(self.mesh_obj))
        return str(path)

    def node_command(self, device: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(device)] + super().node_command(device)

    def shape(self, device: str, up_bps: float | None = None,
              down_bps: float | None = None) -> None:
        """Reshape ``device``'s access link to real-world rates (bit/s): the kernel
        rate is divided by the time scale."""
        if self.ns is None:
            raise LaunchError("mesh not started; call start() first")
        k = self.time_scale
        self.ns.shape(device, None if up_bps is None else up_bps / k,
                      None if down_bps is None else down_bps / k)

    def stop(self, timeout: float | None = None) -> None:
        try:
            super().stop(timeout)
        finally:
            if self.ns is not None:
                self.ns.destroy()

    def link_lines(self) -> list[str]:
        """Where each device's shaped link is, for reshaping it by hand (stderr)."""
        if self.ns is None:
            return []
        lines = ["links: class 1:1 of each veth end is the link; reshape one by hand with "
                 "`tc -n NAMESPACE class change dev VETH parent 1: classid 1:1 htb rate R "
                 "ceil R` (kernel rates: the topology's / time scale)"]
        for d in sorted(self.mesh_obj.devices):
            port = self.ns.ports[d]
            if port.veth_broker is None:
                lines.append(f"  {d}: hosts the broker (loopback, not shaped)")
                continue
            up, down = self._access_bps()[d]
            lines.append(f"  {d}: uplink {port.namespace} {port.veth_device} "
                         f"{up / 1e6:.4g} Mbit/s, downlink {self.ns.broker_ns} "
                         f"{port.veth_broker} {down / 1e6:.4g} Mbit/s")
        return lines

    def describe(self) -> list[str]:
        """The lines ``mesh up --netns`` prints when ready."""
        lines = [f"broker: {self.url}"]
        lines += [f"namespace {d}: {self.namespace(d)}" for d in sorted(self.mesh_obj.devices)]
        return lines


__all__ = ["NetnsError", "NetnsMeshUp"]
