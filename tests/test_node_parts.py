"""Pure parts of the node: probes, duplicate-claim verdicts, sessions, telemetry
decoding, re-plan decisions, standing requests, status agreement."""
from __future__ import annotations

import pytest

from meshdl.errors import PlanError, WireError
from meshdl.mesh import load_topology
from meshdl.node.config import NodeConfig, NodeError, next_session
from meshdl.node.leader import StandingRequest, needs_replan
from meshdl.node.membership import claim_verdict, state_event, telemetry_event
from meshdl.node.probe import Probe, decode_probe, encode_probe
from meshdl.wire.topics import node_probe as probe_topic
from meshdl.node.status import Snapshot
from meshdl.node.telemetry import topology_links
from meshdl.wire.control import (JobRequest, LeaderInfo, NodeState, PlanMessage, Telemetry)


def test_probe_roundtrip_and_rejects():
    p = Probe("ping", "a", 7, "n1", 1.5, b"\0" * 10)
    assert decode_probe(encode_probe(p)) == p
    assert probe_topic("m", "a") == "meshdl/v1/m/node/a/probe"
    for junk in (b"", b"\xc1", b"\x81\xa1v\x01", encode_probe(p)[:-3]):
        with pytest.raises(WireError):
            decode_probe(junk)
    with pytest.raises(WireError):
        decode_probe(encode_probe(Probe("set_link", "t", link={"peer": "x/y"})))


@pytest.mark.parametrize("mine, other, keeps", [
    ((1, "b"), (2, "a"), True),        # earlier session keeps the id
    ((2, "a"), (1, "b"), False),
    ((5, "a"), (5, "b"), True),        # same session: smaller nonce
    ((5, "b"), (5, "a"), False),
])
def test_claim_verdict(mine, other, keeps):
    assert claim_verdict(mine, other) is keeps


def test_sessions_grow_and_persist(tmp_path):
    a = next_session(tmp_path, "n", "m")
    b = next_session(tmp_path, "n", "m")
    assert b > a
    assert next_session(None, "n", "m", at_least=10**18) == 10**18 + 1
    (tmp_path / "m.n.session").write_text(str(10**17))
    assert next_session(tmp_path, "n", "m") == 10**17 + 1


def test_config_validates():
    with pytest.raises(NodeError, match="node id"):
        NodeConfig(node_id="a/b")
    with pytest.raises(NodeError, match="alpha"):
        NodeConfig(node_id="a", alpha=2)


def test_state_and_telemetry_events():
    st = NodeState("a", True, 3, "rpi4", 1e9, 1 << 30, {"compute_w": 5, "tx_w": 1})
    ev = state_event(st)
    assert ev.session == 3 and ev.caps["flops"] == 1e9 and ev.caps["profile"] == "rpi4"
    assert state_event(NodeState("a", False, 3)).__class__.__name__ == "NodeOffline"
    t = Telemetry("a", 0.0, 0.5, {"b": {"rtt_s": 0.004, "bps": 5e7}, "c": {"rtt_s": "x"},
                                  7: {}}, {"session": 3})
    e = telemetry_event(t)
    assert dict(e.links) == {"b": {"rtt_s": 0.004, "throughput_bps": 5e7}} and e.session == 3


def test_topology_links_with_overrides():
    m = load_topology("home-4")
    links = topology_links(m, "pi4-a", {"pi4-b": {"bandwidth_bps": 1e5}})
    assert links["pi4-b"] == {"rtt_s": 0.004, "throughput_bps": 1e5}
    assert links["nano"] == {"rtt_s": 0.006, "throughput_bps": 60e6}


def test_needs_replan():
    m = load_topology("home-4")
    assert needs_replan(None, m, 0.3)
    assert not needs_replan(m, m, 0.3)
    assert needs_replan(m, m.without(["pi3"]), 0.3)
    assert not needs_replan(m, m.with_link("pi4-a", "pi4-b", bandwidth_bps=90e6), 0.3)
    assert needs_replan(m, m.with_link("pi4-a", "pi4-b", bandwidth_bps=10e6), 0.3)


def test_standing_request_from_job():
    d = StandingRequest("tiny_cnn", "meshdl", 0.5)
    assert StandingRequest.from_job(JobRequest("j", "c"), d) == d
    r = StandingRequest.from_job(JobRequest("j", "c", "vgg16", "local",
                                            options={"alpha": 1, "source": "x"}), d)
    assert r == StandingRequest("vgg16", "local", 1.0, "x", None)
    with pytest.raises(PlanError, match="alpha"):
        StandingRequest.from_job(JobRequest("j", "c", options={"alpha": 3}), d)
    with pytest.raises(WireError):
        StandingRequest.from_job(JobRequest("j", "c", options={"sink": "a/b"}), d)
    assert StandingRequest.from_plan({"meta": {"request": {"model": "m", "alpha": 0.2}}}) \
        == StandingRequest("m", "meshdl", 0.2)
    assert StandingRequest.from_plan({"meta": {}}) is None


def test_snapshot_agreement():
    s = Snapshot("m", states={n: NodeState(n, True, 1) for n in ("a", "b")},
                 leader=LeaderInfo("a", 2), plans={"p": PlanMessage("p", 2, {})})
    view = {"leader": "a", "term": 2, "plans": ["p"]}
    s.telemetry = {"a": Telemetry("a", 0, extra=view), "b": Telemetry("b", 0, extra=view)}
    assert s.agreed()
    s.telemetry["b"] = Telemetry("b", 0, extra={**view, "term": 1})
    assert not s.agreed() and s.agreed(["a"])


def test_graph_cache_keeps_one_weight_copy_per_model():
    """Every input shape of a model is traced from one built module: the weights exist
    once per node, however many shapes clients ask for; the LRU bounds the graphs."""
    from meshdl.node.graphs import GraphCache
    gc = GraphCache(max_graphs=3)
    graphs = [gc.get("tiny_cnn", (1, 3, s, s)) for s in (32, 40, 48, 56)]
    assert len({id(g.module) for g in graphs}) == 1
    ptrs = {p.data_ptr() for g in graphs for p in g.module.parameters()}
    assert len(ptrs) == len(list(graphs[0].module.parameters()))
    assert len(gc._graphs) == 3                     # LRU bound on traced graphs
    assert graphs[1].input_shape == (1, 3, 40, 40) and graphs[3].input_shape == (1, 3, 56, 56)


def test_a_stopped_node_lets_its_process_exit_cleanly_while_it_was_planning():
    """A leader stopped while its planner thread is inside torch (a fresh process
    importing and tracing the model) waits for it: the process exits with 0, not
    with torch's abort at interpreter exit (134)."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import time
        from meshdl.mesh import Device, Power
        from meshdl.node.agent import NodeAgent
        from meshdl.node.config import NodeConfig
        from meshdl.transport.memory import MemoryBroker
        broker = MemoryBroker()
        cfg = NodeConfig(node_id="a", mesh="m", emulate=True, models=("resnet18",))
        dev = Device("a", "generic", 2e9, 1 << 30, Power(3.0, 1.0, 1.0, 0.5))
        a = NodeAgent(cfg, device=dev, base=None, dataplane=False,
                      bus_factory=lambda cid, will: broker.bus(cid, will)).start()
        deadline = time.monotonic() + 30
        while not a.is_leader and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.is_leader, "never led"
        a.stop()                 # its planner is importing torch and tracing the model
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_plan_cleared_while_a_node_was_away_is_dropped_after_it_reconnects():
    """An empty retained record is not re-sent: a node that was disconnected (frozen,
    its will fired) when the leader cleared a superseded plan would hold it for good,
    and its view would never agree with the mesh again. After a reconnect, the plans
    the broker does not show again within RECONCILE_S are dropped; those it shows stay."""
    import threading
    import time
    from test_election import el_leader, mem_agent
    from meshdl.node import agent as agent_mod
    from meshdl.transport.memory import MemoryBroker
    from meshdl.wire import topics
    from meshdl.wire.control import Campaign, PlanMessage, encode_control
    broker = MemoryBroker()
    pub = broker.bus("test")
    plan = {"version": 1, "model": "tiny_cnn", "input_shape": [1, 3, 8, 8], "num_ops": 1,
            "stages": [], "source": "a", "sink": "a"}
    pub.publish(topics.node_state("m", "L"), encode_control(
        NodeState("L", True, 1, "generic", 9e9, 1 << 30, {"compute_w": 1, "tx_w": 1})),
        retain=True)
    pub.publish(topics.leader("m"), encode_control(el_leader("L", 1)), retain=True)
    for pid in ("old", "new"):
        pub.publish(topics.plan("m", pid), encode_control(PlanMessage(pid, 1, plan)),
                    retain=True)
    stop = threading.Event()

    def leader_heartbeats():                 # "L" is alive: "a" follows it
        while not stop.wait(0.2):
            pub.publish(topics.election("m"), encode_control(
                Campaign("L", 1, "heartbeat", 9e9, "", time.time())))
    threading.Thread(target=leader_heartbeats, daemon=True).start()
    a = mem_agent(broker, "a", 1e9, models=()).start()
    try:
        deadline = time.monotonic() + 5
        while (a.plan("old") is None or a.plan("new") is None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.plan("old") is not None and a.plan("new") is not None
        with broker._lock:              # cleared while "a" was away: it never saw the clear
            del broker._retained[topics.plan("m", "old")]
        a._reannounce()                 # what its control thread does on a reconnect
        pub.publish(topics.plan("m", "new"), encode_control(PlanMessage("new", 1, plan)),
                    retain=True)        # the broker shows the plans it still holds
        deadline = time.monotonic() + getattr(agent_mod, "RECONCILE_S", 2.0) + 5
        while a.plan("old") is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert a.plan("old") is None and a.plan("new") is not None
        assert "old" not in a.view()[2] and "new" in a.view()[2]
    finally:
        stop.set()
        a.stop()
