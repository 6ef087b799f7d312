"""Control plane with real node PROCESSES on a real broker (mosquitto; core flows on
amqtt): join, election, failover, re-planning, late join, duplicate ids, auth and
malformed frames. Every wait is a condition with a deadline (MeshWatcher)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from meshdl.node.launcher import MeshUp
from meshdl.node.probe import Probe, encode_probe
from meshdl.wire.topics import node_probe as probe_topic
from meshdl.node.status import MeshWatcher
from meshdl.transport.paho_bus import PahoBus
from meshdl.wire import topics
from meshdl.wire.control import Campaign, NodeState, encode_control

MESH = "t"


def node_cmd(url, node_id, *extra):
    return [sys.executable, "-m", "meshdl.cli", "-v", "node", "start", "--broker", url,
            "--mesh", MESH, "--id", node_id, "--emulate", "--topology", "home-4",
            "--models", "tiny_cnn", "--no-dataplane", *extra]


def plan_ts(snap):
    return {p: m.ts for p, m in snap.plans.items()}


@pytest.fixture
def home4(mosquitto, tmp_path):
    up = MeshUp("home-4", broker=mosquitto, mesh=MESH, model="tiny_cnn", dataplane=False,
                log_dir=tmp_path / "logs", node_args=["--strategy", "deepthings"],
                telemetry_period=1.0)
    with up:
        yield up


def test_mesh_lifecycle_on_mosquitto(home4, mosquitto):
    up = home4
    t0 = time.monotonic()
    snap = up.wait_ready(60)
    # join + election: the best device (most FLOP/s) leads term 1; the plan uses all four
    assert snap.online == ["nano", "pi3", "pi4-a", "pi4-b"]
    assert snap.leader.node == "nano" and snap.leader.term == 1
    assert snap.plan_devices() == {"nano", "pi3", "pi4-a", "pi4-b"}
    print(f"ready in {time.monotonic() - t0:.2f} s")

    with PahoBus(mosquitto) as bus:
        watch = MeshWatcher(bus, MESH)
        watch.settle()

        # malformed and foreign frames on every meshdl topic: dropped, nodes keep working
        junk = [b"", b"\xc1", b"\x93\x01\x02", encode_control(Campaign("pi3", 1, "vote"))]
        for payload in junk:
            for t in (topics.node_state(MESH, "pi3"), topics.node_telemetry(MESH, "pi3"),
                      topics.election(MESH), topics.plan(MESH, "junk"),
                      topics.job(MESH, "c~j1", "request"), probe_topic(MESH, "pi3"),
                      f"meshdl/v1/{MESH}/bogus/x", f"meshdl/v1/{MESH}/node/pi3/state/extra"):
                if payload or "state" not in t:        # an empty retained state = cleared
                    bus.publish(t, payload, qos=1)
        foreign = NodeState("pi4-b", False, 1, "rpi4")        # pi4-b's offline on pi3's topic
        bus.publish(topics.node_state(MESH, "pi3"), encode_control(foreign), qos=1)
        bus.publish(topics.leader(MESH), b"\x00junk", qos=1)   # not retained
        bus.flush()

        # a degraded link (emulated figure changed on pi4-a) makes the leader re-plan
        before = plan_ts(watch.snapshot())
        t1 = time.monotonic()
        bus.publish(probe_topic(MESH, "pi4-a"), encode_probe(Probe(
            "set_link", "test", link={"peer": "pi4-b", "bandwidth_bps": 1e5})), qos=1)
        snap = watch.wait_for(lambda s: s.plans and any(
            s.plans[p].ts > before.get(p, 0) for p in s.plans), 10)
        assert snap is not None, up.tails(["nano"])
        print(f"re-plan after link change in {time.monotonic() - t1:.2f} s")
        assert all(p.poll() is None for p in up.procs.values()), "a node died on junk"
        assert "dropped" in up.log_path("pi3").read_text()

        # a worker killed (SIGKILL): its will drops it, the leader re-plans without it
        t2 = time.monotonic()
        up.kill("pi3")
        snap = watch.wait_for(lambda s: "pi3" not in s.online and s.plans
                              and "pi3" not in s.plan_devices(), 15)
        assert snap is not None, up.tails(["nano"])
        print(f"plan without the dead worker in {time.monotonic() - t2:.2f} s")

        # the leader killed: a new leader (the next best, pi4-a) within 3 s, higher term
        t3 = time.monotonic()
        up.kill("nano")
        snap = watch.wait_for(lambda s: s.leader is not None and s.leader.node != "nano", 5)
        failover = time.monotonic() - t3
        assert snap is not None and failover < 3.0, up.tails(["pi4-a", "pi4-b"])
        assert snap.leader.node == "pi4-a" and snap.leader.term >= 2
        print(f"leader failover in {failover:.2f} s")
        snap = up.wait_for(lambda s: s.agreed(["pi4-a", "pi4-b"]) and "nano" not in
                           s.plan_devices(), 30, "a plan without the dead leader")
        assert all(m.term == snap.leader.term for m in snap.plans.values())

        # a late joiner gets the retained state and the plan
        up.spawn("nano")
        snap = up.wait_ready(30)
        assert snap.leader.node == "pi4-a"           # a stable leader: no take-over
        assert snap.view("nano")[0] == "pi4-a"

        # a duplicate node id is refused, the original keeps running
        dup = subprocess.run(node_cmd(mosquitto, "pi4-b"), capture_output=True, text=True,
                             timeout=30)
        assert dup.returncode == 2 and "already online" in dup.stderr, dup.stderr[-2000:]
        assert up.procs["pi4-b"].poll() is None
        assert "pi4-b" in watch.settle().online

    # clean leave: SIGTERM publishes offline (not a will), clears the leader record
    assert up.terminate("pi4-a") == 0
    with PahoBus(mosquitto) as bus:
        snap = MeshWatcher(bus, MESH).wait_for(
            lambda s: "pi4-a" not in s.online and s.leader is not None
            and s.leader.node != "pi4-a", 10)
        assert snap is not None


def test_auth_refuses_wrong_password(tmp_path):
    from conftest import _need_mosquitto
    from meshdl.transport.broker import EmbeddedBroker
    _need_mosquitto()
    with EmbeddedBroker("auth", users={"alice": "s3cret"}, workdir=tmp_path / "b") as b:
        bad = subprocess.run(node_cmd(b.url, "pi4-a", "--username", "alice", "--password",
                                      "wrong"), capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "refused the login" in bad.stderr, bad.stderr[-2000:]
        p = subprocess.Popen(node_cmd(b.url, "pi4-a", "--username", "alice", "--password",
                                      "s3cret"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            with PahoBus(b.url, username="alice", password="s3cret") as bus:
                snap = MeshWatcher(bus, MESH).wait_for(lambda s: s.leader is not None, 20)
                assert snap is not None and snap.online == ["pi4-a"]
        finally:
            p.terminate()
            p.wait(10)


def test_core_flows_on_amqtt(tmp_path):
    pytest.importorskip("amqtt")
    with MeshUp("home-4", backend="amqtt", mesh=MESH, devices=["nano", "pi3", "pi4-a"],
                model="tiny_cnn", dataplane=False, log_dir=tmp_path / "logs") as up:
        snap = up.wait_ready(60)
        assert snap.leader.node == "nano" and snap.online == ["nano", "pi3", "pi4-a"]
        up.kill("nano")
        # amqtt runs inside this (busy) test process: allow it more than mosquitto's 3 s
        up.wait_for(lambda s: s.leader is not None and s.leader.node == "pi4-a", 8,
                    "a new leader on amqtt")
        up.wait_for(lambda s: s.agreed(["pi3", "pi4-a"]), 30, "agreement on amqtt")
