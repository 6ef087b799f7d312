"""Unsecured mode: a flood of fake retained births (no heartbeat behind them) neither
crowds the election nor leaves the mesh leaderless nor grows the member table: the
fold is capped and evicts never-heard records first, and a birth counts for the
election and plans only once its node has been heard. On a real mosquitto with real
node processes."""
from __future__ import annotations

import time

import msgpack
import pytest
import torch

import meshdl
from meshdl.mesh.state import MAX_MEMBERS, MeshState, NodeHeard, NodeOffline, NodeOnline, apply
from meshdl.node.liveness import Liveness, LivenessParams
from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
from meshdl.transport.paho_bus import PahoBus
from meshdl.wire import topics

MESH = "flood"
CAPS = {"flops": 1e9, "memory_bytes": 1 << 30, "power": {"compute_w": 1, "tx_w": 1}}


def fake_birth(i: int, flops: float = 1e16) -> bytes:
    return msgpack.packb({"v": 1, "type": "state", "node": f"fake{i:04d}", "online": True,
                          "session": 1, "flops": flops, "memory_bytes": 1 << 30,
                          "power": {"compute_w": 1, "tx_w": 1}}, use_bin_type=True)


# ------------------------------------------------------------------ pure parts
def test_the_fold_is_capped_and_evicts_offline_then_never_heard_records():
    s = MeshState()
    s = apply(s, NodeOnline("real", CAPS, 1))
    s = apply(s, NodeHeard("real"))
    for i in range(MAX_MEMBERS + 50):
        s = apply(s, NodeOnline(f"fake{i}", CAPS, 1))
    assert len(s.members) == MAX_MEMBERS and "real" in s.members     # heard: kept
    assert "fake0" not in s.members and f"fake{MAX_MEMBERS + 49}" in s.members
    s = apply(s, NodeOffline("fake300", 1))
    s = apply(s, NodeOnline("late", CAPS, 1))
    assert "fake300" not in s.members and "late" in s.members       # offline goes first
    full = MeshState()
    for i in range(MAX_MEMBERS):
        full = apply(apply(full, NodeOnline(f"n{i}", CAPS, 1)), NodeHeard(f"n{i}"))
    assert apply(full, NodeOnline("one-more", CAPS, 1)) is full      # all heard: refused
    again = apply(s, NodeOnline("real", CAPS, 2))                    # a new life: unheard
    assert not again.members["real"].heard


def test_never_heard_members_are_out_and_do_not_count_as_a_silent_mesh():
    lv = Liveness(LivenessParams(period=0.5, stall_after=2.5))
    online = ["me", "a", "b"] + [f"fake{i}" for i in range(300)]
    lv.heard("a", 0.0)
    lv.heard("b", 0.0)
    stalled, _ = lv.tick(0.1, online, "me")
    assert not stalled and len(lv.unconfirmed) == 300
    assert lv.excluded(online, "me") == lv.unconfirmed
    lv.heard("a", 2.0)
    for t in (1.0, 2.0, 3.0):
        stalled, _ = lv.tick(t, online, "me")
    # b alone is silent (300 silent fakes do not make it "most of the mesh"): stalled
    assert stalled == {"b"}
    assert lv.excluded(online, "me") == {"b"} | lv.unconfirmed


def test_an_unheard_birth_delays_a_claim_by_two_heartbeats_at_most_and_never_plans():
    """A node joining a running mesh reads retained births before their heartbeats:
    the election gives such a member two heartbeats (it must not claim ahead of a
    better member it has not heard yet); plans never take it; heard, it is in both."""
    lv = Liveness(LivenessParams(period=0.5, stall_after=2.5))
    online = ["me", "best", "fake"]
    assert lv.excluded_from_election(online, "me", 10.0) == set()       # just seen
    assert lv.excluded(online, "me") == {"best", "fake"}                 # plans: strict
    _, changed = lv.tick(10.5, online, "me")
    assert lv.excluded_from_election(online, "me", 10.9) == set()
    lv.heard("best", 10.9)
    _, changed = lv.tick(11.2, online, "me")
    assert changed                                     # the fake left its grace: re-elect
    assert lv.excluded_from_election(online, "me", 11.2) == {"fake"}
    assert lv.excluded(online, "me") == {"fake"}
    lv.forget(["me", "best"])                          # the fake's record went: forgotten
    assert lv.excluded_from_election(["me", "best", "fake"], "me", 20.0) == set()


# ------------------------------------------------------------------ real mesh
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_a_flood_of_fake_retained_births_does_not_stop_the_mesh(tmp_path):
    from meshdl.client import MeshClient
    from meshdl.node.launcher import MeshUp
    n_fake = 300
    with EmbeddedBroker(backend="mosquitto", workdir=tmp_path / "b") as b, \
            PahoBus(b.url) as bad:
        for i in range(n_fake):                  # retained before the mesh starts
            bad.publish(topics.node_state(MESH, f"fake{i:04d}"), fake_birth(i), qos=1,
                        retain=True)
        assert bad.flush(30)
        t0 = time.monotonic()
        with MeshUp("home-4", broker=b.url, mesh=MESH, model="tiny_cnn",
                    log_dir=tmp_path / "logs", verbose=False) as up:
            up.wait_ready(150)
            snap = up.watcher.snapshot()
            assert snap.leader is not None and snap.leader.node in up.devices
            for i in range(n_fake, 2 * n_fake):  # and more while it runs
                bad.publish(topics.node_state(MESH, f"fake{i:04d}"), fake_birth(i), qos=0,
                            retain=True)
            with MeshClient(b.url, MESH) as c:
                model = meshdl.models.build("tiny_cnn")
                x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
                r = c.infer(x, model="tiny_cnn", timeout=90)
                ref = model(x)
                assert (r.output - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
                assert set(r.plan.devices()) <= set(up.devices)
            elapsed = time.monotonic() - t0
            assert all(p.poll() is None for p in up.procs.values())
        for i in range(2 * n_fake):                        # leave the broker clean
            bad.publish(topics.node_state(MESH, f"fake{i:04d}"), b"", qos=0, retain=True)
    assert elapsed < 150, f"the mesh took {elapsed:.0f} s to elect and answer"
