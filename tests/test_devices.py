"""README "Run it on your devices", as far as one machine allows: the README's own
mosquitto config on a non-loopback address inside a network namespace (its own network
stack, reached over a veth pair), password required, two nodes and an inference from
"the laptop" (this host) connecting to it with the README's commands.

Needs root, iproute2 and mosquitto; names start with ``i10`` and are always removed."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from meshdl.errors import TransportError
from meshdl.transport.broker import mosquitto_binary, port_open
from proc_util import kill_tagged, tagged, wait_gone

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30)


def readme_broker_config() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Run it on your devices"):]
    m = re.search(r"meshdl\.conf >/dev/null <<'EOF'\n(.*?)\nEOF\n", section, re.S)
    assert m, "README's broker config block not found"
    return m.group(1)


@pytest.fixture
def netns():
    """A namespace with a veth to the host: yields (host_ip, ns_ip, ns_name)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace")
    suffix = secrets.token_hex(3)
    ns, host_if, ns_if = f"i10ns{suffix}", f"i10h{suffix}", f"i10n{suffix}"
    octet = 100 + int(suffix[:2], 16) % 150
    host_ip, ns_ip = f"10.210.{octet}.1", f"10.210.{octet}.2"
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _sh("ip", "link", "set", ns_if, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        _sh("ip", "link", "del", host_if, check=False)
        _sh("ip", "netns", "del", ns, check=False)
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.strip()}")
    try:
        yield host_ip, ns_ip, ns
    finally:
        _sh("ip", "link", "del", host_if, check=False)
        _sh("ip", "netns", "del", ns, check=False)


def test_the_readme_device_recipe_on_a_broker_in_a_network_namespace(netns, tmp_path):
    binary = mosquitto_binary()
    if binary is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed")
    host_ip, ns_ip, ns = netns
    password = secrets.token_urlsafe(16)
    pw_db = tmp_path / "meshdl.passwd"
    _sh("mosquitto_passwd", "-b", "-c", str(pw_db), "meshdl", password)
    conf = tmp_path / "meshdl.conf"
    # the README's config verbatim; only the password file path moves, and (as root,
    # with files in a private test dir) mosquitto keeps root instead of dropping to its user
    conf.write_text("user root\n" + readme_broker_config().replace(
        "/etc/mosquitto/meshdl.passwd", str(pw_db)) + "\n")
    pw_file = tmp_path / "meshdl-pw"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    tag = uuid.uuid4().hex
    env = dict(os.environ, MESHDL_TEST_TAG=tag)
    env.pop("MESHDL_PASSWORD", None)
    broker = subprocess.Popen(["ip", "netns", "exec", ns, binary, "-c", str(conf)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"mqtt://{ns_ip}:1883"
    login = ["--username", "meshdl", "--password-file", str(pw_file)]
    nodes = []
    try:
        deadline = time.monotonic() + 20
        while not port_open(ns_ip, 1883) and time.monotonic() < deadline:
            assert broker.poll() is None, "mosquitto exited"
            time.sleep(0.1)
        assert port_open(ns_ip, 1883), "the broker is not reachable on its non-loopback address"
        from meshdl.transport.paho_bus import PahoBus
        with pytest.raises(TransportError):                 # a password is required
            PahoBus(url, connect_timeout=3.0).close()
        for dev, profile in (("pi4-kitchen", "rpi4"), ("pi3-hall", "rpi3bplus")):
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "meshdl.cli", "node", "start", "--broker", url,
                 "--mesh", "home", *login, "--profile", profile, "--id", dev,
                 "--models", "tiny_cnn"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 120
        status = {}
        while time.monotonic() < deadline:
            r = subprocess.run([sys.executable, "-m", "meshdl.cli", "mesh", "status",
                                "--broker", url, "--mesh", "home", *login, "--json"],
                               env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            status = json.loads(r.stdout)
            online = {n for n, m in status["members"].items() if m["online"]}
            if online == {"pi4-kitchen", "pi3-hall"} and status["leader"] and status["plans"]:
                break
            time.sleep(1.0)
        else:
            raise AssertionError(f"nodes did not join the mesh (and plan): {status}")
        live = tmp_path / "pics"
        live.mkdir()
        r = subprocess.run([sys.executable, "-m", "meshdl.cli", "plan", "show", "--broker", url,
                            "--mesh", "home", *login, "-o", str(live / "live.png")],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in live.iterdir()) == ["live.png"]    # exactly that file
        r = subprocess.run([sys.executable, "-m", "meshdl.cli", "infer", "sample", "--model",
                            "tiny_cnn", "--broker", url, "--mesh", "home", *login, "--json"],
                           env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert len(out["top5"]) == 5
        assert {d for st in out["stages"] for d in st["devices"]} <= {"pi4-kitchen",
                                                                      "pi3-hall"}
    finally:
        for p in nodes:
            p.send_signal(signal.SIGTERM)
        for p in nodes:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
        kill_tagged(tag)
    assert wait_gone(tag, 5) == [] and tagged(tag) == []
