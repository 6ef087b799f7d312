"""Every shipped mosquitto config refuses anonymous clients, except a file that
says it is a loopback development config (and then listens on loopback only)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshdl.transport.broker import EmbeddedBroker
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
