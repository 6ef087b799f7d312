"""Network namespaces with shaped links (``mesh up --netns``): real TCP over veth pairs
rate-limited by tc htb. Skipped, with the reason, when not root or iproute2 is missing."""
from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from meshdl.node import netns
from meshdl.node.netns import (BROKER_ADDR, Namespaces, NetnsError, cleanup_stale, in_netns,
                               list_namespaces, make_prefix, unavailable_reason)

REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"netns tests: {REASON}")


def token() -> str:
    return "i11" + secrets.token_hex(2)


def _mine(prefix: str) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(prefix + "-")]


def _veths(tag_prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if l.startswith(tag_prefix)]


def _send(ns_from: str, ns_to: str, addr: str, nbytes: int) -> float:
    """Seconds to push nbytes over TCP from a socket in ns_from to a listener in ns_to
    (timed at the receiver, from accept to the last byte)."""
    ready, result = threading.Event(), {}

    def serve(srv: socket.socket) -> None:
        conn, _ = srv.accept()
        t0, got = time.monotonic(), 0
        while got < nbytes:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
        result["s"], result["got"] = time.monotonic() - t0, got
        conn.close()
        srv.close()

    def listen() -> socket.socket:
        srv = socket.socket()
        srv.bind((addr, 0))
        srv.listen(1)
        return srv
    srv = in_netns(ns_to, listen)
    port = srv.getsockname()[1]
    th = threading.Thread(target=serve, args=(srv,), daemon=True)
    th.start()

    def client() -> None:
        s = socket.create_connection((addr, port), timeout=30)
        s.sendall(b"\0" * nbytes)
        s.close()
    in_netns(ns_from, client)
    th.join(60)
    assert result.get("got") == nbytes
    return result["s"]


@needs_netns
def test_shaped_link_takes_size_over_bandwidth_both_ways():
    up_bps, down_bps = 16e6, 24e6
    ns = Namespaces(["dev"], {"dev": (up_bps, down_bps)}, prefix=make_prefix(token()))
    try:
        ns.create()
        port = ns.ports["dev"]
        assert ns.rates("dev") == (up_bps, down_bps)
        n = 1_500_000
        up_s = _send(port.namespace, ns.broker_ns, BROKER_ADDR, n)
        assert up_s == pytest.approx(n * 8 / up_bps, rel=0.15)
        down_s = _send(ns.broker_ns, port.namespace, port.address, n)
        assert down_s == pytest.approx(n * 8 / down_bps, rel=0.15)
        ns.shape("dev", up_bps=8e6)                 # live reshaping (tc class change)
        assert ns.rates("dev")[0] == 8e6
        up2 = _send(port.namespace, ns.broker_ns, BROKER_ADDR, n // 2)
        assert up2 == pytest.approx(n / 2 * 8 / 8e6, rel=0.15)
    finally:
        ns.destroy()
    assert _mine(ns.prefix) == []


@needs_netns
def test_destroy_leaves_nothing_and_stale_namespaces_are_removed():
    ns = Namespaces(["a", "b"], {"a": (1e7, 1e7), "b": (1e7, 1e7)}, broker_device="b",
                    prefix=make_prefix(token()))
    ns.create()
    try:
        assert set(_mine(ns.prefix)) == {ns.broker_ns, ns.ports["a"].namespace}
        assert ns.ports["b"].namespace == ns.broker_ns        # the broker's own device
        with pytest.raises(NetnsError, match="hosts the broker"):
            ns.shape("b", up_bps=1e6)
        qd = subprocess.run(["tc", "-n", ns.ports["a"].namespace, "qdisc", "show"],
                            capture_output=True, text=True).stdout
        assert "htb" in qd
    finally:
        ns.destroy()
    assert _mine(ns.prefix) == []
    # a launcher that died (its pid is gone) left a namespace: the next start removes it
    dead = 4194303
    while True:
        try:
            os.kill(dead, 0)
            dead -= 1
        except ProcessLookupError:
            break
    stale = f"mdl{dead}x{token()}-br"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
    assert stale not in list_namespaces()


def test_clear_errors_without_root_or_tools(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in unavailable_reason()
    with pytest.raises(NetnsError, match="needs root"):
        netns.check_available()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/x")
    assert "'tc'" in unavailable_reason()


def test_netns_needs_a_star_topology():
    from meshdl.node.launcher import LaunchError
    from meshdl.node.netns_up import NetnsMeshUp
    with pytest.raises(LaunchError, match="has no broker"):
        NetnsMeshUp("home-4")
    with pytest.raises(LaunchError, match="leave out --broker"):
        NetnsMeshUp("home-wifi", broker="mqtt://127.0.0.1:1")


@needs_netns
@pytest.mark.slow
def test_mesh_up_netns_cli_answers_from_a_device_namespace_and_tears_down(tmp_path):
    """What an outside check does: start it, inspect namespaces and qdiscs, infer from a
    device namespace, reshape a link under it, stop it with SIGTERM."""
    env = dict(os.environ)
    p = subprocess.Popen([sys.executable, "-m", "meshdl.cli", "mesh", "up", "home-wifi-n",
                          "--netns", "--time-scale", "3", "--model", "tiny_cnn",
                          "--mesh", "i11t"], stdout=subprocess.PIPE,
                         stderr=open(tmp_path / "err", "w"), text=True, env=env)
    lines: list[str] = []
    prefix = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.strip() == "ready":
                break
        assert lines and lines[-1] == "ready", (lines, (tmp_path / "err").read_text()[-2000:])
        assert re.fullmatch(r"broker: mqtt://10\.211\.0\.1:1883", lines[0])
        names = dict(re.fullmatch(r"namespace (\S+): (\S+)", l).groups() for l in lines[1:-1])
        assert set(names) == {"pi5", "pi4", "zero"}
        prefix = names["pi4"].rsplit("-", 1)[0]
        assert set(_mine(prefix)) == set(names.values())
        assert names["pi5"] == f"{prefix}-br"        # the broker runs on pi5
        cls = subprocess.run(["tc", "-n", names["zero"], "class", "show", "dev",
                              _dev_in(names["zero"]), "classid", "1:1"], capture_output=True,
                             text=True).stdout
        rate = float(re.search(r"rate (\d+(?:\.\d+)?)([KM])bit", cls).group(1))
        assert 6.0 <= rate <= 7.0 or rate >= 6000       # 20 Mbit/s / 3 (Mbit or Kbit)
        from meshdl.cli.infer_cmd import sample_image
        r = subprocess.run(["ip", "netns", "exec", names["zero"], sys.executable, "-m",
                            "meshdl.cli", "infer", str(sample_image()), "--broker",
                            "mqtt://10.211.0.1:1883", "--mesh", "i11t", "--model", "tiny_cnn",
                            "--json", "--timeout", "120"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert '"top5"' in r.stdout
        subprocess.run(["tc", "-n", names["zero"], "class", "change", "dev",
                        _dev_in(names["zero"]), "parent", "1:", "classid", "1:1", "htb",
                        "rate", "2mbit", "ceil", "2mbit"], check=True)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    assert p.returncode == 0, (tmp_path / "err").read_text()[-2000:]
    if prefix:
        assert _mine(prefix) == []
    assert subprocess.run(["pgrep", "-f", "--mesh i11t"], capture_output=True).stdout == b""


def _dev_in(ns: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-br", "link"], capture_output=True, text=True).stdout
    return [l.split()[0].split("@")[0] for l in out.splitlines() if not l.startswith("lo")][0]


class _MqttOverShapedLink:
    """One device namespace joined to a broker namespace (real mosquitto) by a veth
    shaped to ``up``/``down`` bit/s; ``dev`` and ``br`` are PahoBus clients in each."""

    def __init__(self, up: float, down: float) -> None:
        self.ns = Namespaces(["dev"], {"dev": (up, down)}, prefix=make_prefix("n11" + token()[3:]))
        self.broker = self.dev = self.br = None

    def __enter__(self):
        from meshdl.transport.broker import EmbeddedBroker
        from meshdl.transport.paho_bus import PahoBus
        try:
            self.ns.create()
            self.broker = in_netns(self.ns.broker_ns, lambda: EmbeddedBroker(
                None, host=BROKER_ADDR, port=netns.BROKER_PORT, backend="mosquitto").start())
            url = f"mqtt://{BROKER_ADDR}:{netns.BROKER_PORT}"
            self.dev = in_netns(self.ns.ports["dev"].namespace, lambda: PahoBus(url))
            self.br = in_netns(self.ns.broker_ns, lambda: PahoBus(url))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for b in (self.dev, self.br):
            if b is not None:
                b.close()
        if self.broker is not None:
            self.broker.stop()
        self.ns.destroy()
        assert _mine(self.ns.prefix) == []

    def timed_publish(self, sender, receiver, nbytes: int, topic: str = "n11/x") -> float:
        """Seconds from ``sender`` publishing ``nbytes`` to ``receiver`` holding them."""
        got, ev = {}, threading.Event()
        receiver.subscribe(topic, lambda t, p, r: (got.setdefault("t", time.perf_counter()),
                                                   got.setdefault("n", len(p)), ev.set()), qos=1)
        time.sleep(0.5)            # subscribed; the link idle (its bucket full)
        t0 = time.perf_counter()
        sender.publish(topic, b"\0" * nbytes, qos=1)
        assert ev.wait(120), "the message never arrived"
        receiver.unsubscribe(topic)
        assert got["n"] == nbytes
        return got["t"] - t0


@needs_netns
def test_mqtt_message_is_store_and_forward_and_short_ones_meet_the_rate():
    """A piece through the broker costs size/up + size/down (the broker holds the whole
    message before sending it on); a 64 KiB message from the broker crosses a 3 Mbit/s
    downlink at that rate (its sockets' 64 KB GSO packets passed htb whole, at ~5)."""
    with _MqttOverShapedLink(6e6, 3e6) as m:
        n = 256 << 10
        t = m.timed_publish(m.dev, m.dev, n)
        assert t == pytest.approx(n * 8 / 6e6 + n * 8 / 3e6, rel=0.15)
        short = 64 << 10
        t = m.timed_publish(m.br, m.dev, short, "n11/y")
        assert t == pytest.approx(short * 8 / 3e6, rel=0.15)


@needs_netns
@pytest.mark.parametrize("mbps", [3.0, 20.0])
def test_probe_estimate_of_a_shaped_access_link(mbps):
    """A node's self-probe through the broker (node.probe.Prober, the node's pong
    answer over the real wire format) reads the series rate of a shaped link within
    15%: at 3 Mbit/s each way it read ~1.9x before (free burst + GSO downlink)."""
    from meshdl.node.probe import BROKER, Probe, Prober, decode_probe, encode_probe
    from meshdl.wire.topics import node_probe
    bps = mbps * 1e6
    with _MqttOverShapedLink(bps, bps) as m:
        prober = Prober(m.dev, "n11p", "p1", 1, access_latency_s=0.002)

        def on_probe(topic, payload, retained):       # what a node answers (agent_join)
            p = decode_probe(payload)
            if p.kind == "ping":
                m.dev.publish(node_probe("n11p", p.sender),
                              encode_probe(Probe("pong", "p1", 1, p.nonce, 0.0, p.pad)))
            elif p.kind == "pong":
                prober.on_pong(p)
        m.dev.subscribe(node_probe("n11p", "p1"), on_probe, qos=1)
        time.sleep(0.5)
        fig = None
        for _ in range(5):
            fig = prober.measure(BROKER) or fig
        assert fig is not None
        assert fig["throughput_bps"] == pytest.approx(bps / 2, rel=0.15)
        assert fig["rtt_s"] == pytest.approx(0.004)


def _tc_rate(ns: str, dev: str, bps: float) -> None:
    """What an outside checker types: plain tc on one veth end (class 1:1)."""
    rate = f"{int(bps)}bit"
    subprocess.run(["tc", "-n", ns, "class", "change", "dev", dev, "parent", "1:", "classid",
                    "1:1", "htb", "rate", rate, "ceil", rate], check=True)


@needs_netns
@pytest.mark.slow
def test_a_hand_made_tc_change_under_a_running_mesh_is_measured(tmp_path):
    """Plain ``tc class change`` on a device's veth ends under ``mesh up --netns``, both
    directions and then one: the device's telemetry follows to the new series rate
    (uplink and downlink in a row, as its self-probe crosses them) within a deadline."""
    from meshdl.node.netns_up import NetnsMeshUp
    from meshdl.node.probe import BROKER
    dev, k = "pi4-b", 4.0

    def series(up: float, down: float) -> float:
        return 1.0 / (1.0 / up + 1.0 / down)

    def measured(snap) -> float | None:
        t = snap.telemetry.get(dev)
        return None if t is None else (t.links.get(BROKER) or {}).get("throughput_bps")

    def follows(want: float, timeout: float):
        got: list = []

        def near(snap) -> bool:
            v = measured(snap)
            if v is not None and (not got or got[-1] != v):
                got.append(v)
            return v is not None and abs(v / want - 1.0) <= 0.2
        snap = up.watcher.wait_for(near, timeout)
        assert snap is not None, (f"{dev}'s telemetry did not reach {want / 1e6:.3g} Mbit/s "
                                  f"within {timeout:.0f} s; it read (Mbit/s) "
                                  f"{[round(v / 1e6, 3) for v in got]}")

    with NetnsMeshUp("home-wifi", time_scale=k, mesh="i11c", models=["tiny_cnn"],
                     log_dir=tmp_path, verbose=False, supervise=True,
                     telemetry_period=1.0) as up:
        up.wait_ready(240)
        port = up.ns.ports[dev]
        ns, br = port.namespace, up.ns.broker_ns
        up0, down0 = up.ns.rates(dev)
        assert up0 == pytest.approx(60e6 / k, rel=0.01)
        follows(series(up0, down0), 60)
        _tc_rate(ns, port.veth_device, up0 / 4)              # both directions
        _tc_rate(br, port.veth_broker, down0 / 4)
        assert up.ns.rates(dev) == pytest.approx((up0 / 4, down0 / 4), rel=0.01)
        follows(series(up0 / 4, down0 / 4), 60)
        _tc_rate(ns, port.veth_device, up0)                  # the uplink alone
        follows(series(up0, down0 / 4), 60)
    assert _mine(up.ns.prefix) == []
