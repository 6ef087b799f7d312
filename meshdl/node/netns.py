"""Network namespaces and shaped links under a local mesh (``meshdl mesh up --netns``).

Layout (one mesh, prefix ``P`` unique to the launching process, e.g. ``mdl4242xa1b2``):

- ``P-br``: the broker's namespace: a bridge ``br0`` with ``10.211.0.1/16``; the MQTT
  broker listens there. A device that hosts the broker (``broker: {device: ID}``) runs
  its node in this namespace too (loopback to the broker, as on the real device).
- ``P-d<i>``: device i's namespace; a veth pair joins it to the bridge. Its address
  is ``10.211.<hi>.<lo>``. Only addresses inside these namespaces are used.
- Each veth end has an htb qdisc whose class 1:1 (rate = ceil) is the link: the device
  end shapes the device's uplink, the bridge end its downlink (the access link of the
  topology, divided by the time scale); two leaves under it only order small packets
  first. The ends carry the alias ``DEVICE uplink`` / ``DEVICE downlink`` (``ip link``).
  ``shape()`` changes them live, as one does by hand: ``tc -n NS class change dev VETH
  parent 1: classid 1:1 htb rate R ceil R``.
- netem is absent in this kernel: latency is added by the node's own link emulation
  (``--shaped-links``: latency only, as a pure delay).

Everything is torn down by ``destroy()`` (idempotent); ``cleanup_stale()`` removes the
namespaces of a launcher that died (its pid is gone) on the next start.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from meshdl.errors import MeshdlError

log = logging.getLogger(__name__)

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
SUBNET = "10.211"
BROKER_ADDR = f"{SUBNET}.0.1"
BROKER_PORT = 1883
_NAME_RE = re.compile(r"^mdl(\d+)x([0-9a-z]+)-(br|d\d+)$")
MIN_BURST = 3200             # bytes: two full frames at least
LEAF_RATE = "8kbit"          # the leaves' own guarantee: next to nothing (they borrow)
LEAF_CEIL = "100gbit"        # no limit of their own: class 1:1 alone sets the rate
LEAF_QUANTUM = "1600"        # bytes (r2q would give a tiny quantum at LEAF_RATE)


class NetnsError(MeshdlError):
    """Network namespaces or traffic shaping are unavailable, or a command failed."""


def unavailable_reason() -> str | None:
    """Why namespaces with shaped links cannot be used here (None when they can)."""
    if os.geteuid() != 0:
        return ("--netns needs root (network namespaces, veth pairs and tc qdiscs); run "
                "it as root, or leave out --netns for the plain emulator")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return (f"--netns needs the '{tool}' command (iproute2), which is not "
                    "installed; install iproute2 or leave out --netns")
    return None


def check_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsError(reason)


def run(cmd: list[str], check: bool = True) -> str:
    """Run one ip/tc command; NetnsError (with its stderr) when it fails."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(cmd)} failed: {exc}") from exc
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed (exit {p.returncode}): "
                         f"{p.stderr.strip()[:500]}")
    return p.stdout


def make_prefix(token: str | None = None) -> str:
    """``mdl<pid>x<token>``: unique per process (and per mesh with a random token)."""
    tok = token if token is not None else secrets.token_hex(2)
    if not re.fullmatch(r"[0-9a-z]{1,8}", tok):
        raise NetnsError(f"namespace token {tok!r} must be 1-8 lowercase letters/digits")
    return f"mdl{os.getpid()}x{tok}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete namespaces named by this module whose launcher process is gone (a crash
    left them); their veths and qdiscs go with them. Returns the names removed."""
    removed = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _kill_pids_in(name)
        run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    if removed:
        log.warning("removed %d stale namespace(s) of a dead launcher: %s", len(removed),
                    ", ".join(removed))
    return removed


def _kill_pids_in(ns: str) -> None:
    out = run(["ip", "netns", "pids", ns], check=False)
    for tok in out.split():
        try:
            os.kill(int(tok), 9)
        except (ValueError, OSError):
            pass


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread that has entered namespace ``name``: sockets it
    opens and threads (and processes) it starts stay in that namespace."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetnsError(f"cannot enter namespace {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:      # handed to the caller
            box["error"] = exc
    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def htb_rate(bps: float) -> tuple[str, str]:
    """(rate, burst) arguments of an htb class for ``bps`` bit/s."""
    rate = max(8000, int(round(bps)))
    burst = max(MIN_BURST, int(rate / 8 * 0.002))     # ~2 ms of traffic
    return f"{rate}bit", f"{burst}b"


@dataclass(frozen=True)
class Port:
    device: str
    namespace: str
    address: str
    veth_broker: str | None      # None: the device is in the broker's namespace
    veth_device: str | None


class Namespaces:
    """The namespaces, veths and qdiscs of one mesh (see the module docstring)."""

    def __init__(self, devices: list[str], access: Mapping[str, tuple[float, float]],
                 broker_device: str | None = None, prefix: str | None = None) -> None:
        if len(devices) > 60000:
            raise NetnsError("at most 60000 devices per namespace mesh")
        self.prefix = prefix or make_prefix()
        if not re.fullmatch(r"mdl\d+x[0-9a-z]+", self.prefix):
            raise NetnsError(f"prefix {self.prefix!r} must look like mdl<pid>x<token>")
        self.broker_ns = f"{self.prefix}-br"
        tag = "m" + hashlib.sha1(self.prefix.encode()).hexdigest()[:6]
        self.ports: dict[str, Port] = {}
        self._access = {d: tuple(v) for d, v in access.items()}
        for i, dev in enumerate(devices):
            if dev == broker_device:
                self.ports[dev] = Port(dev, self.broker_ns, BROKER_ADDR, None, None)
                continue
            host = i + 2
            self.ports[dev] = Port(dev, f"{self.prefix}-d{i}",
                                   f"{SUBNET}.{host // 256}.{host % 256}",
                                   f"{tag}{i}b", f"{tag}{i}d")
        self._created: list[str] = []
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [self.broker_ns] + sorted({p.namespace for p in self.ports.values()
                                          if p.namespace != self.broker_ns})

    def create(self) -> "Namespaces":
        """Create everything; on any failure remove what was made, then raise."""
        check_available()
        try:
            self._add_ns(self.broker_ns)
            br = self.broker_ns
            run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", br, "addr", "add", f"{BROKER_ADDR}/16", "dev", "br0"])
            # the broker's sockets send through br0: without this their 64 KB GSO
            # super-packets reach a downlink's htb as one skb, which htb lets through
            # whole when its bucket is not empty (a 64 KiB message then crossed a
            # 3 Mbit/s downlink at ~5 Mbit/s; the ports' own limits do not reach br0)
            run(["ip", "-n", br, "link", "set", "br0", "gso_max_size", "1500",
                 "gso_max_segs", "1"])
            run(["ip", "-n", br, "link", "set", "br0", "up"])
            for dev, port in self.ports.items():
                if port.veth_broker is None:
                    continue
                self._add_ns(port.namespace)
                run(["ip", "link", "add", port.veth_broker, "netns", br, "type", "veth",
                     "peer", "name", port.veth_device, "netns", port.namespace])
                # no GSO/TSO: a 64 KB super-packet would pass htb at once after idle
                # (a short probe then saw the link far faster than its rate)
                for ns_, dev_ in ((br, port.veth_broker),
                                  (port.namespace, port.veth_device)):
                    run(["ip", "-n", ns_, "link", "set", dev_, "gso_max_size", "1500",
                         "gso_max_segs", "1"])
                run(["ip", "-n", br, "link", "set", port.veth_broker, "master", "br0"])
                run(["ip", "-n", br, "link", "set", port.veth_broker, "up"])
                run(["ip", "-n", port.namespace, "addr", "add", f"{port.address}/16", "dev",
                     port.veth_device])
                run(["ip", "-n", port.namespace, "link", "set", port.veth_device, "up"])
                # so `ip link` tells an outside checker which end is which link
                run(["ip", "-n", port.namespace, "link", "set", port.veth_device, "alias",
                     f"{dev} uplink"])
                run(["ip", "-n", br, "link", "set", port.veth_broker, "alias",
                     f"{dev} downlink"])
                up, down = self._access[dev]
                self._qdisc(port.namespace, port.veth_device, up)
                self._qdisc(br, port.veth_broker, down)
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        with self._lock:
            self._created.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    @staticmethod
    def _qdisc(ns: str, dev: str, bps: float) -> None:
        """htb: class 1:1 at the link's rate (rate = ceil) is the only limit; under it
        small packets (IP length < 512: heartbeats, votes, acks, TCP acks) in 1:10 go
        before bulk data in 1:20, as a Wi-Fi voice/video queue would (a megabyte piece on a
        slow link must not starve a heartbeat past its liveness timeout). The two leaves
        guarantee next to nothing (``LEAF_RATE``) and may borrow without bound, so they
        always borrow from 1:1 in priority order, and a plain
        ``tc class change dev DEV classid 1:1 htb rate R ceil R`` (an outside check
        reshaping the link by hand) is the whole change: leaves with a guaranteed rate of
        their own would send that much past a lowered 1:1."""
        rate, burst = htb_rate(bps)
        tc = ["tc", "-n", ns]
        run(tc + ["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20"])
        run(tc + ["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                  "rate", rate, "ceil", rate, "burst", burst, "cburst", burst])
        for cid, prio in (("1:10", "0"), ("1:20", "1")):
            run(tc + ["class", "add", "dev", dev, "parent", "1:1", "classid", cid, "htb",
                      "rate", LEAF_RATE, "ceil", LEAF_CEIL, "burst", burst, "cburst", burst,
                      "quantum", LEAF_QUANTUM, "prio", prio])
        run(tc + ["filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                  "u32", "match", "u16", "0x0000", "0xfe00", "at", "2", "flowid", "1:10"])

    def shape(self, device: str, up_bps: float | None = None,
              down_bps: float | None = None) -> None:
        """Change ``device``'s uplink and/or downlink rate live (bit/s): class 1:1 of
        each veth end, as one would by hand."""
        port = self.ports.get(device)
        if port is None:
            raise NetnsError(f"no device {device!r} in this namespace mesh")
        if port.veth_broker is None:
            raise NetnsError(f"device {device!r} hosts the broker: its link is loopback "
                             "and cannot be shaped")
        for ns, dev, bps in ((port.namespace, port.veth_device, up_bps),
                             (self.broker_ns, port.veth_broker, down_bps)):
            if bps is None:
                continue
            if not bps > 0:
                raise NetnsError(f"rate {bps!r} bit/s for {device} must be positive")
            rate, burst = htb_rate(bps)
            run(["tc", "-n", ns, "class", "change", "dev", dev, "parent", "1:", "classid",
                 "1:1", "htb", "rate", rate, "ceil", rate, "burst", burst, "cburst", burst])
        cur = self._access.get(device, (0.0, 0.0))
        self._access[device] = (up_bps or cur[0], down_bps or cur[1])

    def rates(self, device: str) -> tuple[float, float]:
        """(uplink, downlink) bit/s as the kernel reports them now."""
        port = self.ports[device]
        if port.veth_broker is None:
            return (float("inf"), float("inf"))
        return (_read_rate(port.namespace, port.veth_device),
                _read_rate(self.broker_ns, port.veth_broker))

    def destroy(self) -> None:
        """Remove every namespace made here (their veths and qdiscs go with them);
        kills any process still inside one. Idempotent."""
        with self._lock:
            names, self._created = list(self._created), []
        for name in reversed(names):
            _kill_pids_in(name)
            run(["ip", "netns", "del", name], check=False)


def _read_rate(ns: str, dev: str) -> float:
    out = run(["tc", "-n", ns, "class", "show", "dev", dev, "classid", "1:1"])
    m = re.search(r"rate (\d+(?:\.\d+)?)([KMG]?)bit", out)
    if m is None:
        raise NetnsError(f"no htb class on {dev} in {ns}: {out.strip()[:200]}")
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


__all__ = ["BROKER_ADDR", "BROKER_PORT", "Namespaces", "NetnsError", "Port", "check_available",
           "cleanup_stale", "in_netns", "make_prefix", "unavailable_reason"]
