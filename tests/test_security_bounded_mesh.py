"""Bounded everything, on a real mosquitto with real node processes (no crypto):
out-of-range terms, malformed births, huge requests and floods are dropped with a
logged reason, and a legitimate job stays exact through each of them."""
from __future__ import annotations

import math
import time

import msgpack
import pytest
import torch

import meshdl
from meshdl.client import MeshClient
from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
from meshdl.transport.paho_bus import PahoBus
from meshdl.wire import topics
from proc_util import rss_kb

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

MESH = "tb"


def raw(type_name: str, **fields) -> bytes:
    return msgpack.packb({"v": 1, "type": type_name, **fields}, use_bin_type=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from meshdl.node.launcher import MeshUp
    from tests.test_dataplane import broker_template
    d = tmp_path_factory.mktemp("bounded")
    with EmbeddedBroker(broker_template(d), backend="mosquitto", workdir=d / "b") as b:
        with MeshUp("home-4", broker=b.url, mesh=MESH, model="tiny_cnn", log_dir=d / "logs",
                    verbose=False) as up:
            up.wait_ready(150)
            with MeshClient(b.url, MESH) as c, PahoBus(b.url) as attacker:
                yield up, c, attacker


def exact_job(client: MeshClient, seed: int) -> None:
    model = meshdl.models.build("tiny_cnn")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    r = client.infer(x, model="tiny_cnn", timeout=90)
    ref = model(x)
    assert (r.output - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def logs(up) -> str:
    return "".join(up.log_path(d).read_text(errors="replace") for d in up.devices)


def wait_log(up, needle: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if needle in logs(up):
            return
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} never logged by any node")


def alive(up) -> None:
    dead = {d: p.returncode for d, p in up.procs.items() if p.poll() is not None}
    assert not dead, f"nodes exited: {dead}"


def test_overflowing_terms_do_not_stop_the_mesh(mesh):
    up, client, bad = mesh
    bad.publish(topics.plan(MESH, "evil"), raw("plan", plan_id="evil", term=2**63, plan={}),
                qos=1, retain=True)
    bad.publish(topics.leader(MESH), raw("leader", node="evil", term=2**64 - 1), qos=1,
                retain=True)
    bad.publish(topics.election(MESH), raw("election", node="evil", term=2**53 - 1,
                                           kind="campaign", priority=1e16), qos=1)
    wait_log(up, "is outside [0, 2**53)")
    wait_log(up, "more than 1024 past the known term")
    exact_job(client, 1)
    bad.publish(topics.leader(MESH), b"", qos=1, retain=True)    # let the real leader re-assert
    bad.publish(topics.plan(MESH, "evil"), b"", qos=1, retain=True)
    exact_job(client, 2)
    alive(up)


MALFORMED = [("nan", math.nan, None), ("inf", math.inf, None), ("neg", -5.0, None),
             ("zero", 0.0, None), ("power", 1e9, {"compute_w": math.nan, "tx_w": 1}),
             ("keys", 1e9, {"compute_w": 1, "tx_w": 1, "x": 2})]


def test_malformed_births_are_dropped_and_cleared(mesh):
    up, client, bad = mesh
    for name, flops, power in MALFORMED:
        caps = {"flops": flops} if name == "zero" else {}
        bad.publish(topics.node_state(MESH, f"bad-{name}"),
                    raw("state", node=f"bad-{name}", online=True, session=1, flops=flops,
                        memory_bytes=1 << 30, power=power or {"compute_w": 1, "tx_w": 1},
                        caps=caps), qos=1, retain=True)
    wait_log(up, "state.flops is nan; it must be finite")
    wait_log(up, "state.power has unknown key x")
    exact_job(client, 3)
    for name, _, _ in MALFORMED:                      # an empty retained payload clears
        bad.publish(topics.node_state(MESH, f"bad-{name}"), b"", qos=1, retain=True)
    exact_job(client, 4)
    alive(up)


def test_huge_inputs_and_floods_are_bounded(mesh):
    up, client, bad = mesh
    bad.publish(topics.job(MESH, "x~huge", "request"),
                raw("job_request", job="x~huge", client="x", model="tiny_cnn",
                    options={"input_shape": [1, 3, 4096, 4096]}), qos=1)
    links = {f"ghost{i}": {"rtt_s": 0.01, "bps": 1e6} for i in range(2000)}
    bad.publish(topics.node_telemetry(MESH, up.devices[0]),
                raw("telemetry", node=up.devices[0], ts=time.time(), links=links), qos=1)
    wait_log(up, "elements; request a smaller input")
    wait_log(up, "entries; at most 256")
    exact_job(client, 5)
    alive(up)


def test_a_request_flood_is_rate_limited(mesh):
    up, client, bad = mesh
    for i in range(300):
        bad.publish(topics.job(MESH, f"flooder~{i}", "request"),
                    raw("job_request", job=f"flooder~{i}", client="flooder", model="tiny_cnn"),
                    qos=0)
    wait_log(up, "over the job request rate limit")
    exact_job(client, 6)
    alive(up)


def test_pieces_for_unknown_plans_are_bounded(mesh):
    import numpy as np
    from meshdl.node import jobs as J
    from meshdl.wire.codec import encode_chunks
    up, client, bad = mesh
    term = up.watcher.snapshot().leader.term
    node = up.devices[0]
    arr = np.ones((2 << 20,), np.float32)                    # 8 MB each, 12 of them
    for i in range(12):
        piece = J.input_piece(f"ghostplan{i}")
        t = topics.route_topic(MESH, [node], f"ghost{i}", piece)
        for f in encode_chunks(f"ghost{i}", piece, arr, term=term):
            bad.publish(t, f, qos=1)
    wait_log(up, "for plans not adopted", timeout=60)
    exact_job(client, 7)
    alive(up)


def test_fuzzing_every_topic_without_crypto(mesh):
    import random
    up, client, bad = mesh
    rng = random.Random(5)
    node = up.devices[0]
    where = [topics.node_state(MESH, "fz"), topics.node_telemetry(MESH, node),
             topics.node_probe(MESH, node), topics.election(MESH), topics.leader(MESH),
             topics.plan(MESH, "fz"), topics.job(MESH, "fz~fz", "request"),
             topics.job(MESH, "fz~fz", "status"), topics.job(MESH, "fz~fz", "result"),
             topics.route_topic(MESH, [node], "fz", "fz.in"),
             topics.route_topic(MESH, [node, "ghost"], "fz", "fz.in"),
             f"meshdl/v1/{MESH}/node/evil\u2028FORGED/state"]   # (mosquitto refuses \n)
    kinds = ["state", "telemetry", "election", "leader", "plan", "job_request", "job_status",
             "job_result", "probe", "piece"]
    rss0 = {d: rss_kb(p.pid) for d, p in up.procs.items()}
    for i in range(400):
        t = rng.choice(where)
        k = rng.randrange(3)
        if k == 0:
            body = rng.randbytes(rng.randrange(1, 2048))
        elif k == 1:
            body = raw(rng.choice(kinds), node=rng.choice(["fz", node, "x" * 70]),
                       term=rng.choice([1, 2**63, -3]), session=rng.choice([1, 2**64 - 1]),
                       online=True, flops=rng.choice([math.nan, -1.0, 1e9]),
                       links={str(j): {"bps": rng.random()} for j in range(rng.randrange(300))},
                       plan={"stages": [{"tasks": [{}] * rng.randrange(10)}]},
                       job=rng.choice(["fz", "evil\nFORGED"]), client="fz", plan_id="fz",
                       state="failed", ok=True)
        else:
            body = raw(rng.choice(kinds))[:rng.randrange(1, 12)]
        bad.publish(t, body, qos=0)
        if i % 150 == 149:
            time.sleep(0.2)
    for t in where[:6]:
        bad.publish(t, b"", qos=1, retain=True)
    exact_job(client, 8)
    alive(up)
    assert "\nFORGED" not in logs(up) and "\u2028" not in logs(up)   # names sanitised
    growth = {d: rss_kb(p.pid) - rss0[d] for d, p in up.procs.items()}
    assert max(growth.values()) < 80_000, growth
