"""The secure setup from the command line: mesh init, add-device/add-client, broker,
mesh up --secure, mesh status --bundle (real processes, real mosquitto)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from meshdl.cli import main
from meshdl.transport.broker import mosquitto_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


def test_init_add_and_broker(tmp_path):
    r = CliRunner()
    d = tmp_path / "auth"
    out = r.invoke(main, ["mesh", "init", "home", "--dir", str(d)])
    assert out.exit_code == 0, out.output
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    out = r.invoke(main, ["mesh", "add-device", "cam", "--profile", "rpi4", "--dir", str(d),
                          "-o", str(tmp_path / "cam.bundle")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "cam.bundle").stat().st_mode & 0o777 == 0o600
    out = r.invoke(main, ["mesh", "add-client", "me", "--dir", str(d), "-o",
                          str(tmp_path / "me.bundle")])
    assert out.exit_code == 0, out.output
    again = r.invoke(main, ["mesh", "add-device", "cam", "--dir", str(d)])
    assert again.exit_code != 0 and "already enrolled" in again.output
    p = subprocess.Popen([sys.executable, "-m", "meshdl.cli", "broker", "--dir", str(d),
                          "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        line = p.stdout.readline()
        assert re.match(r"mqtts://127\.0\.0\.1:\d+ ", line), line
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)


def test_a_bundle_of_the_wrong_role_or_a_damaged_one_is_named_before_connecting(tmp_path):
    r = CliRunner()
    d = tmp_path / "auth"
    for args in (["mesh", "init", "lab", "--dir", str(d)],
                 ["mesh", "add-device", "pi", "--dir", str(d), "-o", str(tmp_path / "pi.b")],
                 ["mesh", "add-client", "me", "--dir", str(d), "-o", str(tmp_path / "me.b")]):
        assert r.invoke(main, args).exit_code == 0
    (tmp_path / "bad.b").write_bytes((tmp_path / "me.b").read_bytes()[:100])
    nobody = "mqtts://127.0.0.1:1"            # nothing listens: the bundle is read first
    for args, says in (
            (["infer", "sample", "--bundle", str(tmp_path / "pi.b"), "--broker", nobody],
             "is the bundle of device 'pi'; this command needs a client bundle"),
            (["node", "start", "--bundle", str(tmp_path / "me.b"), "--broker", nobody],
             "is the bundle of client 'me'; this command needs a device bundle"),
            (["infer", "sample", "--bundle", str(tmp_path / "bad.b"), "--broker", nobody],
             "is not a meshdl bundle")):
        out = r.invoke(main, args)
        assert out.exit_code == 2 and says in out.output, out.output
    out = r.invoke(main, ["mesh", "status", "--bundle", str(tmp_path / "pi.b"), "--broker",
                          nobody])                    # a device may read the mesh's state
    assert out.exit_code != 0 and "cannot reach the broker" in out.output, out.output


@pytest.mark.slow
def test_mesh_up_secure_and_status(tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    p = subprocess.Popen([sys.executable, "-m", "meshdl.cli", "mesh", "up", "home-4",
                          "--secure", "--mesh", "sq", "--model", "tiny_cnn"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    try:
        url = bundle = None
        end = time.monotonic() + 180
        while time.monotonic() < end and bundle is None:
            line = p.stdout.readline()
            m = re.search(r"--broker (mqtts://\S+) --bundle (\S+)", line)
            if m and "infer" in line:
                url, bundle = m.groups()
        assert bundle, "mesh up --secure never printed its bundle"
        st = subprocess.run([sys.executable, "-m", "meshdl.cli", "mesh", "status", "--broker",
                             url, "--bundle", bundle, "--json"], capture_output=True,
                            text=True, env=env, timeout=60)
        assert st.returncode == 0, st.stderr
        assert {"nano", "pi3", "pi4-a", "pi4-b"} <= set(st.stdout.split('"')), st.stdout
        inf = subprocess.run([sys.executable, "-m", "meshdl.cli", "infer", "sample",
                              "--model", "tiny_cnn", "--broker", url, "--bundle", bundle,
                              "--json"], capture_output=True, text=True, env=env, timeout=120)
        assert inf.returncode == 0, inf.stderr
        assert '"top5"' in inf.stdout or '"output"' in inf.stdout, inf.stdout[:300]
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)


@pytest.mark.slow
def test_sigkill_of_mesh_up_secure_leaves_no_broker_and_no_temp_dir(tmp_path):
    """`meshdl broker` started by `mesh up --secure` goes with it, even on SIGKILL:
    no mosquitto (or node) process tagged with this test survives, and no meshdl-*
    temp dir (broker run dir, TLS files) is left in its TMPDIR."""
    import uuid
    from proc_util import TAG_VAR, cmdline, kill_tagged, tagged, wait_gone
    tag = uuid.uuid4().hex
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), TMPDIR=str(tmp),
               **{TAG_VAR: tag})
    p = subprocess.Popen([sys.executable, "-m", "meshdl.cli", "mesh", "up", "home-4",
                          "--secure", "--mesh", "sk", "--model", "tiny_cnn",
                          "--no-dataplane"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    try:
        end = time.monotonic() + 180
        up, out = False, []
        while time.monotonic() < end and not up:
            line = p.stdout.readline()
            out.append(line)
            up = "mesh is up" in line
            assert line or p.poll() is None, "mesh up --secure exited: " + "".join(out)
        assert up, "mesh up --secure never came up: " + "".join(out)
        procs = {q: cmdline(q) for q in tagged(tag)}
        assert any("mosquitto" in c for c in procs.values()), procs
        assert [d.name for d in tmp.iterdir() if d.name.startswith("meshdl-")]
        p.send_signal(signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
        survivors = wait_gone(tag, 20)
        assert survivors == [], [cmdline(q) for q in survivors]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                d.name.startswith("meshdl-") for d in tmp.iterdir()):
            time.sleep(0.1)
        assert sorted(d.name for d in tmp.iterdir() if d.name.startswith("meshdl-")) == []
    finally:
        kill_tagged(tag)


def test_real_devices_enrolled_below_their_speed_elect_one_leader(tmp_path):
    """The deployment path with real (measured, not emulated) nodes: this host measures
    far above the enrolled profiles, which every member caps a claim to. Each node must
    rank itself by that same ceiling: before, each saw itself as the best member and
    ignored the other's claims (two claimants, terms climbing, no leader ever)."""
    import json
    d = tmp_path / "auth"
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    r = CliRunner()
    for args in (["mesh", "init", "lab", "--dir", str(d)],
                 ["mesh", "add-device", "pi", "--profile", "rpi4_seed", "--dir", str(d),
                  "-o", str(tmp_path / "pi.bundle")],
                 ["mesh", "add-device", "nano", "--profile", "jetson_nano", "--dir", str(d),
                  "-o", str(tmp_path / "nano.bundle")],
                 ["mesh", "add-client", "me", "--dir", str(d), "-o", str(tmp_path / "me.bundle")]):
        out = r.invoke(main, args)
        assert out.exit_code == 0, out.output
    procs = []

    def spawn(*args, out=subprocess.PIPE):
        p = subprocess.Popen([sys.executable, "-m", "meshdl.cli", *args], env=env,
                             stdout=out, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        procs.append(p)
        return p
    try:
        br = spawn("broker", "--dir", str(d), "--port", "0")
        url = br.stdout.readline().split()[0]
        assert url.startswith("mqtts://"), url
        for dev in ("pi", "nano"):
            with open(tmp_path / f"{dev}.log", "w") as log:        # not a pipe nobody reads
                spawn("node", "start", "--bundle", str(tmp_path / f"{dev}.bundle"),
                      "--broker", url, "--models", "tiny_cnn", out=log)
        inf = subprocess.run([sys.executable, "-m", "meshdl.cli", "infer", "sample", "--model",
                              "tiny_cnn", "--broker", url, "--bundle", str(tmp_path / "me.bundle"),
                              "--json", "--timeout", "60"], capture_output=True, text=True,
                             env=env, timeout=120)
        assert inf.returncode == 0, inf.stderr[-2000:]
        st = subprocess.run([sys.executable, "-m", "meshdl.cli", "mesh", "status", "--broker",
                             url, "--bundle", str(tmp_path / "me.bundle"), "--json"],
                            capture_output=True, text=True, env=env, timeout=60)
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        flops = {n: m["flops"] for n, m in status["members"].items()}
        caps = {"pi": 1.12e9, "nano": 4.5e9}              # rpi4_seed and jetson_nano
        assert all(flops[n] <= caps[n] for n in caps), flops        # within enrolment
        # the best as announced: min(measured, enrolled); a loaded host may measure less
        from meshdl.node import election as el
        best = el.order(flops)[0]
        assert status["leader"]["node"] == best, (status["leader"], flops)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
