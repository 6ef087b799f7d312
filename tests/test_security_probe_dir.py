"""Per-direction link probes (node/probe_dir.py) on a secure mesh: a device measures both
directions of its access link through meshdl's own TLS broker and generated ACL, and no
other identity can write (so skew) or read its probe topics."""
from __future__ import annotations

import threading

import pytest

from meshdl.node.probe import MIN_EXTRA_S
from meshdl.node.probe_dir import DirectionProbe
from meshdl.security.authority import init_authority, write_bundle
from meshdl.security.broker import SecureBroker
from meshdl.security.bundle import Bundle
from meshdl.security.securebus import SecureBus
from meshdl.transport.broker import mosquitto_binary
from meshdl.transport.paho_bus import PahoBus
from meshdl.wire import topics

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

MESH = "pd"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe_dir")
    a = init_authority(MESH, d / "authority")
    files = {who: write_bundle(a.issue(who, role, "rpi4" if role == "device" else None),
                               d / f"{who}.bundle")
             for who, role in (("pi", "device"), ("other", "device"), ("cli", "client"))}
    with SecureBroker(a) as br:
        yield br, {who: Bundle.load(f) for who, f in files.items()}


def test_a_device_measures_both_directions_through_the_secure_broker(mesh):
    br, b = mesh
    with SecureBus(PahoBus(br.url, **b["pi"].tls_files()), b["pi"]) as bus:
        probe = DirectionProbe(bus, MESH, "pi", MIN_EXTRA_S)
        got = probe.measure(8 * 1024, 256 * 1024, lambda n: 5.0)
        assert got is not None, "no per-direction figure on the secure mesh"
        up, down = got
        assert up > 0 and down > 0
        assert probe.worked and probe.fails == 0


@pytest.mark.parametrize("who", ["other", "cli"])
def test_no_other_identity_writes_or_reads_a_device_probe_topic(mesh, who):
    br, b = mesh
    d0 = topics.node_probe_dirs(MESH, "pi")[0]
    with PahoBus(br.url, **b["pi"].tls_files()) as owner, \
            PahoBus(br.url, **b[who].tls_files()) as intruder:
        seen: list[bytes] = []
        got = threading.Event()

        def on(topic, payload, retained):
            seen.append(bytes(payload))
            if bytes(payload) == b"o" * 10:
                got.set()
        owner.subscribe(d0, on, qos=1)
        intruder.publish(d0, b"x" * 100, qos=1, retain=True).wait_for_publish(5)
        owner.publish(d0, b"o" * 10, qos=1, retain=True).wait_for_publish(5)
        assert got.wait(5), "the owner never saw its own probe message"
        assert b"x" * 100 not in seen, "another identity wrote the probe topic"
        stolen: list[bytes] = []
        peek = threading.Event()
        intruder.subscribe(d0, lambda t, p, r: (stolen.append(bytes(p)), peek.set()), qos=1)
        # the owner's retained message would reach a permitted reader at once
        assert not peek.wait(1.5), "another identity read the probe topic"
        owner.publish(d0, b"", qos=1, retain=True).wait_for_publish(5)
