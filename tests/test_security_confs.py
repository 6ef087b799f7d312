"""Every shipped mosquitto config refuses anonymous clients, except a file that
says it is a loopback development config (and then listens on loopback only)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
from meshdl.data import data_dir

CONFS = sorted(Path(data_dir("broker")).glob("*.conf"))
LOOPBACK_DEV = "LOOPBACK DEV CONFIG"


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out.setdefault(key, []).append(value.strip())
    return out


def test_every_shipped_conf_is_found():
    names = {p.stem for p in CONFS}
    assert {"plain", "auth", "tls", "bridge"} <= names


@pytest.mark.parametrize("path", CONFS, ids=lambda p: p.name)
def test_no_anonymous_clients_unless_loopback_dev(path):
    text = path.read_text()
    d = directives(text)
    anonymous = [v.lower() for v in d.get("allow_anonymous", [])]
    listeners = d.get("listener", [])
    assert listeners, f"{path.name} has no listener"
    if LOOPBACK_DEV in text:
        # a dev config: anonymous allowed, but it must say so and EmbeddedBroker binds
        # it to 127.0.0.1 by default
        return
    assert anonymous and all(v == "false" for v in anonymous), \
        f"{path.name} allows anonymous clients ({anonymous or 'mosquitto default'})"
    secured = ("password_file" in d or
               (d.get("require_certificate") == ["true"]
                and d.get("use_identity_as_username") == ["true"]))
    assert secured, f"{path.name} names no password file and no client-certificate identity"
    assert "acl_file" in d, f"{path.name} has no ACL"
    if "cafile" in d:
        assert d.get("require_certificate") == ["true"]


def test_a_config_that_allows_anonymous_is_caught(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("listener 1 0.0.0.0\nallow_anonymous true\n")
    with pytest.raises(AssertionError, match="allows anonymous"):
        test_no_anonymous_clients_unless_loopback_dev(bad)


def test_bridge_without_users_is_a_clear_error(tmp_path):
    from conftest import _need_mosquitto
    from meshdl.errors import TransportError
    _need_mosquitto()
    with pytest.raises(TransportError, match="no anonymous"):
        EmbeddedBroker("bridge", substitutions={"REMOTE_PORT": 1}, workdir=tmp_path).start()


def test_placeholders_documented():
    for path in CONFS:
        for name in re.findall(r"@([A-Z_]+)@", path.read_text()):
            assert name in {"PORT", "HOST", "DIR", "MAX_PACKET_SIZE", "MAX_QUEUED",
                            "USER_LINE", "REMOTE_HOST", "REMOTE_PORT"}, (path.name, name)


def test_the_secure_broker_has_a_heap_ceiling_by_default(tmp_path):
    from meshdl.security.broker import default_memory_limit, secure_config
    conf = secure_config(tmp_path, "127.0.0.1", 8883, None, 512 << 20)
    assert f"memory_limit {512 << 20}" in conf.splitlines()
    assert "memory_limit" not in secure_config(tmp_path, "127.0.0.1", 8883, None, 0)
    assert default_memory_limit(24 << 30) == 4 << 30        # a server: 4 GiB at most
    assert default_memory_limit(4 << 30) == 2 << 30         # a Pi 4 hub: half its memory
    assert default_memory_limit(128 << 20) == 256 << 20     # never below what a mesh needs


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_a_stolen_bundle_filling_the_retained_store_is_stopped_at_the_ceiling(tmp_path):
    """mosquitto has no per-identity quota: a device may write route topics, and every
    retained piece there stays in the broker's heap. With `meshdl broker`'s ceiling the
    flood is cut off (its publisher disconnected) and the heap stays near the ceiling;
    without one the same flood took 211 MB and kept climbing."""
    import os
    from meshdl.security.authority import init_authority, write_bundle
    from meshdl.security.broker import SecureBroker
    from meshdl.security.bundle import Bundle
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.wire import topics
    from proc_util import rss_kb, wait_for
    a = init_authority("m", tmp_path / "ca")
    thief = Bundle.load(write_bundle(a.issue("t", "device", "rpi4"), tmp_path / "t"))
    limit = 48 << 20
    with SecureBroker(a, memory_limit=limit) as br:
        bus = PahoBus(br.url, client_id="thief", **thief.tls_files())
        try:
            blob = os.urandom(1 << 20)
            for i in range(120):                             # 120 MB, 2.5x the ceiling
                bus.publish(topics.route_topic("m", ["t"], f"junk{i}", "P.in"), blob, qos=1,
                            retain=True)
            assert wait_for(lambda: "thief disconnected due to out of memory" in
                            br.log_text(), 30), "the flood was never cut off"
        finally:
            bus.close(timeout=2)
        assert br.proc.poll() is None                        # the broker is still up
        assert rss_kb(br.proc.pid) < (limit >> 10) + 40 * 1024, rss_kb(br.proc.pid)
