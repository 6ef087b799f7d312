"""Credit-based flow control (issue 8): a receiver grants the bytes it can still hold,
a sender never has more unacked bytes in flight to it than that grant, waits without
blocking anybody, and fails by name when the receiver is gone."""
from __future__ import annotations

import threading
from contextlib import contextmanager
import time

import pytest
import torch

import meshdl
from meshdl.client import MeshClient
from meshdl.node.credit import Acker, CreditLedger
from meshdl.node.flow import ReliableSender
from meshdl.node.harness import InProcessMesh, finish_plan
from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
from meshdl.wire.codec import AckFrame, decode_frame, encode_ack

from test_dataplane import broker_template, close_enough, rename
from proc_util import wait_for


class Wire:
    """A transmit that records what left (and when it was called)."""

    def __init__(self):
        self.sent: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, tr, frames, on_sent):
        with self.lock:
            self.sent.append((tr.piece, tr.nbytes))
        on_sent()

    def pieces(self):
        with self.lock:
            return [p for p, _ in self.sent]


def frames(n: int):
    return [("t", b"x" * n)]


# ----------------------------------------------------------------- pure sender logic
@contextmanager
def sending(wire, **kw):
    """A ReliableSender "a" on ``wire`` (no retransmission within a test), stopped after."""
    s = ReliableSender("a", wire, rto_min_s=30.0, **kw)
    try:
        yield s
    finally:
        s.stop()


def test_sender_keeps_inflight_within_the_grant_and_queues_without_blocking():
    wire, failures = Wire(), []
    with sending(wire, initial_grant=1000) as s:
        t0 = time.monotonic()
        for i in range(5):
            s.send("j", f"p{i}", "b", ["a", "b"], frames(400), 0.0, failures.append)
        assert time.monotonic() - t0 < 0.5            # never blocks the caller
        assert wire.pieces() == ["p0", "p1"]          # 800 <= 1000 < 1200
        assert s.inflight_to("b") == 800 and s.queued_bytes == 1200
        s.on_ack_frame(AckFrame("j", "p0", "b", credit=400))    # grant shrinks to 400
        assert s.inflight_to("b") == 400
        time.sleep(0.1)
        assert wire.pieces() == ["p0", "p1"]          # 400 + 400 > 400: still waits
        s.on_ack_frame(AckFrame("j", "p1", "b", credit=2000))
        assert wait_for(lambda: wire.pieces() == ["p0", "p1", "p2", "p3", "p4"])
        assert s.inflight_to("b") == 1200 <= s.grant_of("b")
        assert s.credit_waits == 3 and not failures


def test_zero_grant_holds_everything_until_an_update():
    wire, failures = Wire(), []
    with sending(wire, initial_grant=10_000) as s:
        s.on_credit("b", 0)
        s.send("j", "p0", "b", ["a", "b"], frames(10), 0.0, failures.append)
        time.sleep(0.1)
        assert wire.pieces() == [] and s.inflight_to("b") == 0
        s.on_credit("b", 5)            # a piece larger than the whole grant goes alone
        assert wait_for(lambda: wire.pieces() == ["p0"])
        s.send("j", "p1", "b", ["a", "b"], frames(10), 0.0, failures.append)
        time.sleep(0.1)
        assert wire.pieces() == ["p0"]                 # ... but never a second one
        assert s.on_ack("j", "p0")
        assert wait_for(lambda: wire.pieces() == ["p0", "p1"])


def test_waiting_for_credit_fails_by_name_at_its_deadline():
    wire, failures = Wire(), []
    with sending(wire, initial_grant=100) as s:
        s.on_credit("b", 0)
        s.send("j", "p0", "b", ["a", "b"], frames(10), 0.0, failures.append, wait_s=0.2)
        assert wait_for(lambda: failures, 5.0)
        assert "credit" in failures[0] and "p0" in failures[0] and "device b" in failures[0]
        assert s.queued_bytes == 0 and not s.pending()


def test_a_dropped_receiver_fails_sent_and_waiting_pieces_by_name():
    wire, failures = Wire(), []
    with sending(wire, initial_grant=100) as s:
        s.send("j", "p0", "b", ["a", "b"], frames(80), 0.0, failures.append)
        s.send("j", "p1", "b", ["a", "b"], frames(80), 0.0, failures.append)   # queued
        s.send("j", "p2", "c", ["a", "c"], frames(80), 0.0, failures.append)   # other peer
        assert s.fail_peer("b", "device b stopped responding") == 2
        assert len(failures) == 2 and all("stopped responding" in f for f in failures)
        assert {f.split()[1] for f in failures} == {"p0", "p1"}
        assert s.pending() == [("j", "p2")] and s.inflight_bytes == 80


def test_cancel_job_forgets_waiting_pieces_and_peers_stay_bounded():
    wire, failures = Wire(), []
    with sending(wire, initial_grant=100, max_peers=8) as s:
        s.send("j", "p0", "b", ["a", "b"], frames(80), 0.0, failures.append)
        s.send("j", "p1", "b", ["a", "b"], frames(80), 0.0, failures.append)
        assert s.cancel_job("j") == 2 and s.queued_bytes == 0 and s.inflight_bytes == 0
        for i in range(100):
            s.on_credit(f"n{i}", 50)
            s.send(f"k{i}", "p", f"n{i}", ["a", f"n{i}"], frames(10), 0.0, failures.append)
            s.on_ack(f"k{i}", "p")
        assert s.peers() <= 8 and not failures


def test_without_credit_the_grant_is_ignored():
    wire = Wire()
    with sending(wire, initial_grant=10, credit=False) as s:
        for i in range(4):
            s.send("j", f"p{i}", "b", ["a", "b"], frames(100), 0.0, lambda m: None)
        assert len(wire.pieces()) == 4


# ----------------------------------------------------------------- receiver side
def test_ledger_grants_free_room_shared_by_active_senders():
    now = [0.0]
    led = CreditLedger(1000, min_grant=100, active_s=2.0, clock=lambda: now[0])
    assert led.grant("a") == 1000
    assert led.grant("b") == 500                       # two active senders share
    led.hold("j", "t0<s", 600)
    assert led.grant("a") == 200 and led.held == 600
    led.hold("j", "t1<s", 350)
    assert led.grant("a") == 50                        # all that is free (< min_grant)
    led.hold("j", "t2<s", 100)
    assert led.grant("a") == 0                         # full
    assert led.release("j", "t0<s") == 600
    assert "a" in led.stale()                          # room freed: tell it
    now[0] = 10.0                                      # b went quiet: a gets it all
    assert led.grant("a") == 1000 - 450
    assert led.release_job("j") == 450 and led.held == 0
    assert led.peak_held == 1050


def test_ledger_and_acker_maps_are_bounded():
    led = CreditLedger(1 << 30, max_entries=50, max_peers=20)
    for i in range(500):
        led.hold(f"j{i}", "x", 10)
        led.grant(f"peer{i}")
    assert led.entries() == 50 and led.held == 500 and led.peers() == 20
    sent = []
    ack = Acker("r", lambda hop, topic, payload: sent.append(payload), remember=30,
                credit=lambda peer, active: 7, max_peers=10)
    try:
        for i in range(200):
            ack.ack("h", f"route/x/j{i}/p", f"j{i}", "p", 0, peer=f"s{i}")
        assert wait_for(lambda: ack.frames == 200)
        assert ack.known_peers() == 10
        assert not ack.refresh("s0") and ack.refresh("s199")
        last = decode_frame(sent[-1])
        assert last.job == "j199" and last.credit == 7
    finally:
        ack.stop()


def test_ack_credit_round_trips_and_is_optional():
    a = decode_frame(encode_ack(AckFrame("j", "p", "n", credit=123456, more=("q",))))
    assert a.credit == 123456 and a.pieces == ("p", "q")
    assert decode_frame(encode_ack(AckFrame("j", "p", "n"))).credit is None


# ----------------------------------------------------------------- real mosquitto
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_slow_receiver_limits_a_fast_senders_inflight_to_its_grant(tmp_path):
    """pi4-b's compute is busy, so the pieces it acks pile up: its grant shrinks to 0
    and pi4-a's stage-0 outputs wait for credit (its compute thread never blocks);
    once b computes, credit returns and every answer is exact."""
    model = meshdl.models.build("tiny_cnn")
    shape = (1, 3, 256, 256)
    g = meshdl.trace(model, shape, name="tiny_cnn")
    mesh = meshdl.load_topology("home-4")
    plan = rename(meshdl.manual_plan(g, cuts=[1], grids=[(1, 1), (1, 1)]), ["pi4-a"],
                  "pi4-a", "pi4-a")
    plan.stages[1].tasks[0].device = "pi4-b"
    finish_plan(plan, g, mesh, 1)
    piece = 8 * 127 * 127 * 4                          # stage 0's output, ~516 KB
    cap = 3 * piece // 2 + 1000                        # b holds at most ~1.5 pieces
    with EmbeddedBroker(broker_template(tmp_path), backend="mosquitto",
                        workdir=tmp_path / "b") as b:
        with InProcessMesh(b.url, mesh, mesh_name="credit", fixed={"tiny_cnn": plan},
                           chunk_bytes=128 << 10, held_bytes=cap,
                           initial_grant=cap) as m, MeshClient(b.url, "credit") as c:
            a_dp, b_dp = m.planes["pi4-a"], m.planes["pi4-b"]
            gate = threading.Event()
            b_dp.compute.submit(lambda: gate.wait(60))          # b is busy
            xs = [torch.randn(*shape) for _ in range(6)]
            results: dict[int, object] = {}
            errors: list[BaseException] = []

            def run(i):
                try:
                    results[i] = c.infer(xs[i], model="tiny_cnn", timeout=90).output
                except BaseException as exc:        # noqa: BLE001 - reported below
                    errors.append(exc)
            peak, stop = [0], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], a_dp.sender.inflight_to("pi4-b"))
                    time.sleep(0.001)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
            for t in threads:
                t.start()
            try:
                assert wait_for(lambda: a_dp.sender.queued_bytes > 0, 60), \
                    "pi4-a never had to wait for credit"
                # b is full: grant 0, everything a sent is acked (held by b)
                assert wait_for(lambda: a_dp.sender.grant_of("pi4-b") == 0
                                and a_dp.sender.inflight_to("pi4-b") == 0, 30)
                held = b_dp.credit.held
                assert cap <= held <= cap + piece
                time.sleep(0.3)                       # a waits; nothing more reaches b
                assert b_dp.credit.held == held and a_dp.sender.queued_bytes > 0
            finally:
                gate.set()
                for t in threads:
                    t.join(120)
                stop.set()
                sampler.join()
            assert not errors, errors
            for i, x in enumerate(xs):
                close_enough(results[i], model(x))
            assert peak[0] <= cap, (peak[0], cap)      # never past b's grant
            assert b_dp.credit.peak_held <= cap + piece
            assert b_dp.acker.refreshes > 0            # b told a when room freed up
            assert a_dp.sender.credit_waits > 0
            assert wait_for(lambda: b_dp.credit.held == 0, 10)


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_pieces_waiting_for_a_receiver_that_leaves_fail_by_name(tmp_path):
    """pi4-a's pieces wait for pi4-b's credit; pi4-b leaves the mesh: they fail at once
    naming it (never dropped, never left to wait out their deadline)."""
    model = meshdl.models.build("tiny_cnn")
    shape = (1, 3, 256, 256)
    g = meshdl.trace(model, shape, name="tiny_cnn")
    mesh = meshdl.load_topology("home-4")
    plan = rename(meshdl.manual_plan(g, cuts=[1], grids=[(1, 1), (1, 1)]), ["pi4-a"],
                  "pi4-a", "pi4-a")
    plan.stages[1].tasks[0].device = "pi4-b"
    finish_plan(plan, g, mesh, 1)
    cap = 8 * 127 * 127 * 4 + 1000                     # b holds one piece
    with EmbeddedBroker(broker_template(tmp_path), backend="mosquitto",
                        workdir=tmp_path / "b") as b:
        with InProcessMesh(b.url, mesh, mesh_name="gone", fixed={"tiny_cnn": plan},
                           chunk_bytes=128 << 10, held_bytes=cap,
                           initial_grant=cap) as m, MeshClient(b.url, "gone") as c:
            a_dp, b_dp = m.planes["pi4-a"], m.planes["pi4-b"]
            gate = threading.Event()
            b_dp.compute.submit(lambda: gate.wait(60))          # b is busy, then gone
            failures: list[str] = []

            def run(i):
                try:
                    c.infer(torch.randn(*shape), model="tiny_cnn", timeout=60)
                except meshdl.errors.MeshdlError as exc:
                    failures.append(str(exc))
            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            try:
                for t in threads:
                    t.start()
                assert wait_for(lambda: a_dp.sender.queued_bytes > 0, 60)
                t0 = time.monotonic()
                m.kill("pi4-b")
                assert wait_for(lambda: not a_dp.sender.pending(), 10)
                assert a_dp.sender.queued_bytes == 0 and a_dp.sender.inflight_bytes == 0
                for t in threads:
                    t.join(90)
                assert len(failures) == 4, failures
                assert all("pi4-b" in f for f in failures), failures
                assert time.monotonic() - t0 < 45
            finally:
                gate.set()
