"""Attack suite on a real mosquitto set up by meshdl's own secure path (`mesh init`,
`add-device`, `add-client`, `meshdl broker`): as an outsider, as a local user and
with one stolen device bundle. Each attack is blocked and logged, and a legitimate
job stays exact during it. Fuzzing every writable topic crashes nothing and keeps
node memory bounded."""
from __future__ import annotations

import os
import random
import stat
import threading
import time

import msgpack
import pytest
import torch

import meshdl
from meshdl.errors import MeshdlError, TransportError
from meshdl.security import frames as F
from meshdl.security.authority import init_authority, write_bundle
from meshdl.security.broker import SecureBroker
from meshdl.security.bundle import Bundle
from meshdl.security.identity import SecurityError
from meshdl.transport.broker import mosquitto_binary
from meshdl.transport.paho_bus import PahoBus
from meshdl.wire import topics
from meshdl.wire.control import (JobRequest, JobResult, JobStatus, LeaderInfo, NodeState,
                                 PlanMessage, decode_control, encode_control)
from proc_util import rss_kb

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

MESH = "sec"
THIEF = "pi3"                 # the device whose bundle is stolen


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    from meshdl.mesh.loader import load_topology
    from meshdl.node.launcher import MeshUp
    from meshdl.client import MeshClient
    d = tmp_path_factory.mktemp("secure")
    a = init_authority(MESH, d / "authority")
    mesh = load_topology("home-4")
    bundles = {dev: write_bundle(a.issue(dev, "device", mesh.devices[dev].profile),
                                 d / f"{dev}.bundle") for dev in sorted(mesh.devices)}
    for c in ("watch", "alice", "bob"):
        write_bundle(a.issue(c, "client"), d / f"{c}.bundle")
    with SecureBroker(a) as br:
        with MeshUp("home-4", broker=br.url, mesh=MESH, model="tiny_cnn", log_dir=d / "logs",
                    verbose=False, bundles=bundles, watch_bundle=d / "watch.bundle") as up:
            up.wait_ready(150)
            with MeshClient(br.url, MESH, bundle=str(d / "alice.bundle")) as c:
                stolen = Bundle.load(bundles[THIEF])
                with PahoBus(br.url, **stolen.tls_files()) as thief:
                    yield dict(a=a, br=br, up=up, c=c, d=d, stolen=stolen, thief=thief)


def exact_job(c, seed: int):
    model = meshdl.models.build("tiny_cnn")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    r = c.infer(x, model="tiny_cnn", timeout=90)
    ref = model(x)
    assert (r.output - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    return x, r


def node_logs(up) -> str:
    return "".join(up.log_path(d).read_text(errors="replace") for d in up.devices)


def wait_true(pred, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def wait_log(up, needle: str, timeout: float = 30.0) -> None:
    wait_true(lambda: needle in node_logs(up), f"{needle!r} logged by a node", timeout)


def best_leads(up) -> tuple[str, int]:
    """(the best enrolled device, its term) once it leads the secure mesh."""
    from meshdl.mesh.loader import load_topology
    from meshdl.node import election as el
    enrolled = {d: dev.flops for d, dev in load_topology("home-4").devices.items()}
    best = el.order(enrolled)[0]
    wait_true(lambda: (s := up.watcher.snapshot()).leader is not None
              and s.leader.node == best, "the best enrolled device leads")
    return best, up.watcher.snapshot().leader.term


def alive(up) -> None:
    dead = {d: p.returncode for d, p in up.procs.items() if p.poll() is not None}
    assert not dead, f"nodes exited: {dead}"


def signed(b: Bundle, topic: str, msg) -> bytes:
    body = msg if isinstance(msg, bytes) else encode_control(msg)
    return F.sign(b.sign_key, b.entry.raw, b.entry.sig, topic, body)


def rejected(c) -> int:
    return sum(c.bus.rejected.values()) + sum(c.data_bus.rejected.values())


# ------------------------------------------------------------------ outsider
def test_outsider_cannot_connect(secure, tmp_path):
    br, c = secure["br"], secure["c"]
    with pytest.raises(TransportError):                     # no client certificate
        PahoBus(br.url, tls_ca=str(secure["d"] / "authority" / "ca.crt"),
                connect_timeout=3)
    other = init_authority("evil", tmp_path / "evil")      # a certificate of another CA
    forged = tmp_path / "forged.bundle"
    write_bundle(other.issue("nano", "device"), forged)
    with pytest.raises(TransportError):
        PahoBus(br.url, **Bundle.load(forged).tls_files(), connect_timeout=3)
    with pytest.raises(TransportError):                     # plain MQTT on the TLS port
        PahoBus(br.url.replace("mqtts://", "mqtt://"), connect_timeout=3)
    assert "certificate" in br.log_text() or "OpenSSL Error" in br.log_text()
    exact_job(c, 1)


# ------------------------------------------------------------------ local user
def test_local_files_private_and_broker_not_root(secure):
    a, br, up, d = secure["a"], secure["br"], secure["up"], secure["d"]
    assert stat.S_IMODE(os.stat(a.dir).st_mode) == 0o700
    for f in a.dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for f in [br.dir, *br.dir.iterdir()]:
        assert not f.stat().st_mode & 0o077, f               # nothing for group/others
    assert stat.S_IMODE(os.stat(d / f"{THIEF}.bundle").st_mode) == 0o600
    uid = [line for line in open(f"/proc/{br.proc.pid}/status") if line.startswith("Uid:")][0]
    assert uid.split()[1] != "0", "mosquitto runs as root"
    for p in up.procs.values():                              # no secret on any command line
        cmd = open(f"/proc/{p.pid}/cmdline", "rb").read().split(b"\0")
        assert b"--password" not in cmd and b"--bundle" in cmd


def test_port_squatter_gets_no_image(secure, tmp_path):
    evil = init_authority(MESH, tmp_path / "squat")          # same mesh name, its own CA
    from meshdl.client import MeshClient
    with SecureBroker(evil) as fake:
        with pytest.raises(MeshdlError):
            MeshClient(fake.url, MESH, bundle=str(secure["d"] / "alice.bundle"),
                       connect_timeout=3)
        assert "New client connected" not in fake.log_text()     # the handshake failed


# ------------------------------------------------------------------ stolen bundle
def test_stolen_bundle_cannot_read_others_pieces_or_results(secure):
    thief, c, stolen = secure["thief"], secure["c"], secure["stolen"]
    got: list[tuple[str, bytes]] = []
    thief.subscribe(f"meshdl/v1/{MESH}/#", lambda t, p, r: got.append((t, bytes(p))), qos=1)
    time.sleep(1.0)
    x, r = exact_job(c, 2)
    time.sleep(1.0)
    raw_input = x.numpy().tobytes()
    assert not any(raw_input[:64] in p for _, p in got), "the input travelled in clear"
    routes = [t for t, _ in got if "/route/" in t]
    assert all(topics.parse_route(t)[1][0] == THIEF for t in routes), routes
    # job topics carry their client's id (job/{client}/...): the ACL gives a client's
    # statuses and results to that client only, so a device reads none of them
    theirs = [t for t, _ in got if "/job/" in t and not t.endswith("/request")]
    assert not theirs, theirs
    assert any(f"/job/{r.job.split('~')[0]}/" in t for t, _ in got)     # it saw the request
    thief.unsubscribe(f"meshdl/v1/{MESH}/#")


def test_a_client_reads_only_its_own_jobs(secure):
    """Two clients of one mesh: B sees none of A's statuses or results (nor can it ask
    in A's name), and A's jobs stay exact while B watches and runs its own."""
    from meshdl.client import MeshClient
    br, d, alice, thief = secure["br"], secure["d"], secure["c"], secure["thief"]
    bob_b = Bundle.load(d / "bob.bundle")
    seen: list[str] = []
    requests: list[str] = []
    thief.subscribe(topics.job_all(MESH, "request"), lambda t, p, r: requests.append(t), qos=1)
    with PahoBus(br.url, **bob_b.tls_files()) as spy:
        spy.subscribe(f"meshdl/v1/{MESH}/job/#", lambda t, p, r: seen.append(t), qos=1)
        try:        # mosquitto may refuse the subscription outright or deliver nothing
            spy.subscribe(topics.job_all(MESH, "status", "alice"),
                          lambda t, p, r: seen.append(t), qos=1)
        except TransportError:
            pass
        forged = topics.job(MESH, "alice~forged-1", "request")    # in A's name: denied
        spy.publish(forged, signed(bob_b, forged, JobRequest("alice~forged-1", "alice",
                                                             "tiny_cnn")), qos=1)
        with MeshClient(br.url, MESH, bundle=str(d / "bob.bundle")) as bob:
            assert bob.client_id == "bob"
            jobs = []
            for seed in (21, 22):
                jobs.append(exact_job(alice, seed)[1].job)
                jobs.append(exact_job(bob, seed + 10)[1].job)
            spy.flush()
            wait_true(lambda: any("/job/bob/" in t and t.endswith("/result") for t in seen),
                      "bob's own results reach his spy connection")
    thief.unsubscribe(topics.job_all(MESH, "request"))
    assert jobs[0].startswith("alice~") and jobs[1].startswith("bob~")
    assert not [t for t in seen if "/job/alice/" in t], seen       # nothing of A's
    assert {topics.parse(t).client for t in seen} == {"bob"}
    assert not [t for t in requests if "forged" in t], "a request in A's name got through"
    assert any("/job/alice/" in t for t in requests) and any("/job/bob/" in t for t in requests)


def test_stolen_bundle_cannot_impersonate_other_nodes(secure):
    thief, up, c, stolen = secure["thief"], secure["up"], secure["c"], secure["stolen"]
    watcher = up.watcher
    for node in ("nano", "pi4-a"):                       # forged offline / newer-session birth
        t = topics.node_state(MESH, node)
        thief.publish(t, signed(stolen, t, NodeState(node, False, 2**50)), qos=1, retain=True)
        thief.publish(t, signed(stolen, t, NodeState(node, True, 2**50, flops=1e9)), qos=1,
                      retain=True)
    t = topics.node_probe(MESH, "nano")                  # answer nano's id claims
    from meshdl.node.probe import Probe, encode_probe
    thief.publish(t, signed(stolen, t, encode_probe(Probe("here", THIEF, 1, "x"))), qos=1)
    t = topics.leader(MESH)                              # a leader record naming nano
    thief.publish(t, signed(stolen, t, LeaderInfo("nano", 10**6)), qos=1, retain=False)
    wait_log(up, f"{THIEF} sent a here for node id nano")
    wait_log(up, f"claimed leadership for nano")
    time.sleep(1.0)
    assert {"nano", "pi4-a"} <= set(watcher.snapshot().online)
    exact_job(c, 3)
    alive(up)


def test_stolen_bundle_cannot_claim_more_flops_than_enrolled(secure):
    thief, up, c, stolen = secure["thief"], secure["up"], secure["c"], secure["stolen"]
    snap = up.watcher.snapshot()
    mine = snap.states[THIEF]
    t = topics.node_state(MESH, THIEF)
    thief.publish(t, signed(stolen, t, NodeState(THIEF, True, mine.session, mine.profile,
                                                 1e15, mine.memory_bytes, mine.power)),
                  qos=1, retain=True)
    wait_log(up, f"capped the 1e+15 FLOP/s claimed by {THIEF}")
    cap = stolen.entry_info.caps["flops"]
    wait_true(lambda: up.watcher.snapshot().states[THIEF].flops <= cap,
              "the watcher sees the capped figure")
    x, r = exact_job(c, 4)
    assert r.plan.devices() != [THIEF]
    alive(up)


def test_stolen_bundle_cannot_overwrite_plans(secure):
    thief, up, c, stolen = secure["thief"], secure["up"], secure["c"], secure["stolen"]
    snap = up.watcher.snapshot()
    pid, pm = next(iter(snap.plans.items()))
    evil = dict(pm.plan, source=THIEF, sink=THIEF, meta={**pm.plan.get("meta", {}),
                                                          "leader": THIEF})
    t = topics.plan(MESH, pid)
    thief.publish(t, signed(stolen, t, PlanMessage(pid, pm.term, evil)), qos=1, retain=True)
    wait_log(up, f"published plan {pid} of term {pm.term}, which")
    thief.publish(t, signed(stolen, t, PlanMessage(pid, pm.term + 1, evil)), qos=1,
                  retain=True)
    x, r = exact_job(c, 5)
    assert THIEF not in (r.plan.source, r.plan.sink)
    alive(up)


def test_stolen_bundle_cannot_inject_results_or_kill_jobs(secure):
    thief, up, c, stolen = secure["thief"], secure["up"], secure["c"], secure["stolen"]
    before = rejected(c)

    def answer(topic: str, payload, retained: bool) -> None:
        job = topics.parse(topic).job
        fake = JobResult(job, True, result={"dtype": "float32", "shape": [1, 10],
                                            "data": bytes(40)})
        for kind, msg in (("result", fake), ("status", JobStatus(job, "failed", "forged"))):
            tt = topics.job(MESH, job, kind)
            thief.publish(tt, signed(stolen, tt, msg), qos=1)
    thief.subscribe(topics.job_all(MESH, "request"), answer, qos=1)
    try:
        for seed in (6, 7):
            exact_job(c, seed)
    finally:
        thief.unsubscribe(topics.job_all(MESH, "request"))
    assert rejected(c) >= before + 2
    alive(up)


def test_stolen_bundle_cannot_take_leadership(secure):
    """A stolen weaker device acts as a leader: it claims ever higher terms, publishes
    retained leader records (bare, and with a forged vote in another device's name)
    and answers every job request with a "planned" status. Leadership needs signed
    votes from a majority of the live devices, so no node follows it, the client
    takes no answer from it, the legitimate (best enrolled) leader stays elected,
    jobs stay exact, and every attempt is logged."""
    from meshdl.wire.control import Campaign
    thief, up, c, stolen = secure["thief"], secure["up"], secure["c"], secure["stolen"]
    best, term = best_leads(up)
    before = rejected(c)
    t, te = topics.leader(MESH), topics.election(MESH)
    thief.publish(t, signed(stolen, t, LeaderInfo(THIEF, term + 1)), qos=1, retain=True)
    wait_log(up, f"ignored {THIEF}'s leadership of term {term + 1}")
    jumped = term + 40
    forged_vote = signed(stolen, te, Campaign("nano", jumped, "vote", 1.0, THIEF))
    stop = threading.Event()

    def campaign() -> None:                       # claims and records, jumping terms
        n = jumped
        while not stop.is_set():
            thief.publish(te, signed(stolen, te, Campaign(THIEF, n, "campaign", 1e16)), qos=1)
            thief.publish(te, signed(stolen, te, Campaign(THIEF, n, "vote", 1e16, THIEF)),
                          qos=1)
            thief.publish(t, signed(stolen, t, LeaderInfo(THIEF, n, votes={
                "nano": forged_vote})), qos=1, retain=True)
            n += 3
            stop.wait(0.3)

    answered = []

    def answer(topic: str, payload, retained: bool) -> None:   # "planned" as the leader
        job = topics.parse(topic).job
        answered.append(job)
        ts = topics.job(MESH, job, "status")
        thief.publish(ts, signed(stolen, ts, JobStatus(job, "planned", "evil-plan", jumped)),
                      qos=1)
    thief.subscribe(topics.job_all(MESH, "request"), answer, qos=1)
    runner = threading.Thread(target=campaign, daemon=True)
    runner.start()
    try:
        for seed in (11, 12, 13):
            x, r = exact_job(c, seed)
            assert THIEF not in (r.plan.source, r.plan.sink)
            assert r.plan.term < jumped
    finally:
        stop.set()
        runner.join(5)
        thief.unsubscribe(topics.job_all(MESH, "request"))
    assert answered, "the thief saw the job requests it tried to answer"
    assert rejected(c) >= before + len(answered)          # its answers were dropped
    wait_log(up, f"leader record of {THIEF} carries a vote of nano that is not for it")
    wait_log(up, f"ignored {THIEF}'s leadership of term {jumped}")
    assert any(f"{THIEF} announced itself leader" in k for k in c.bus.rejected)
    # the legitimate leader is still the leader, never moved to the thief's terms, and
    # its record is the retained one again (it re-asserts over the thief's)
    wait_true(lambda: (s := up.watcher.snapshot()).leader is not None
              and s.leader.node == best and s.leader.term < jumped, "the legit leader")
    with PahoBus(secure["br"].url, **Bundle.load(secure["d"] / "watch.bundle").tls_files()
                 ) as fresh:
        got = []
        fresh.subscribe(t, lambda tt, p, r: got.append(p), qos=1)
        wait_true(lambda: got, "the retained leader record")
        _, body = F.verify(F.EntryCache(stolen.mesh_pub, MESH), t, got[-1])
        assert decode_control(body).node == best
    alive(up)


def test_unsigned_frames_are_rejected_everywhere(secure):
    thief, up, c = secure["thief"], secure["up"], secure["c"]
    for t in (topics.node_state(MESH, THIEF), topics.election(MESH), topics.leader(MESH),
              topics.plan(MESH, "x"), topics.job(MESH, "x~j", "status")):
        thief.publish(t, msgpack.packb({"v": 1, "type": "leader", "node": THIEF, "term": 9}),
                      qos=1)
    wait_log(up, "unsigned control message on a secure mesh")
    exact_job(c, 8)
    alive(up)


def fuzz(secure, n: int, seed: int = 0) -> None:
    thief, up, stolen = secure["thief"], secure["up"], secure["stolen"]
    rng = random.Random(seed)
    writable = [topics.node_state(MESH, THIEF), topics.node_telemetry(MESH, THIEF),
                topics.node_probe(MESH, "nano"), topics.election(MESH), topics.leader(MESH),
                topics.plan(MESH, "fz"), topics.job(MESH, "fz~fz", "status"),
                topics.job(MESH, "fz~fz", "result"), topics.job(MESH, "fz~fz", "request"),
                topics.route_topic(MESH, ["nano"], "fz", "p"),
                topics.route_topic(MESH, ["pi4-a", "nano", "pi4-a"], "fz", "p"),
                topics.route_topic(MESH, ["nano", "ghost"], "fz", "p")]
    for i in range(n):
        t = rng.choice(writable)
        k = rng.randrange(5)
        if k == 0:
            body = rng.randbytes(rng.randrange(1, 4096))
        elif k == 1:
            body = msgpack.packb({"v": 1, "type": rng.choice(["state", "leader", "plan",
                                                              "election", "job_result"]),
                                  "node": THIEF, "term": rng.choice([0, 2**63, -1, 2**53]),
                                  "flops": rng.choice([float("nan"), 1e300, -1.0])})
        elif k == 2:
            body = signed(stolen, t, rng.randbytes(rng.randrange(0, 512)))
        elif k == 3:
            body = F.SEALED + rng.randbytes(rng.randrange(0, 2048))
        else:
            body = signed(stolen, t, msgpack.packb({"v": 1, "type": "state", "node": THIEF,
                                                    "online": True, "session": 1,
                                                    "caps": {str(j): j for j in range(500)}}))
        thief.publish(t, body, qos=0)
        if i % 200 == 199:
            time.sleep(0.2)
    for t in writable[:9]:
        thief.publish(t, b"", qos=1, retain=True)          # clear what was retained


def test_fuzzing_every_writable_topic(secure):
    up, c = secure["up"], secure["c"]
    exact_job(c, 9)
    rss0 = {d: rss_kb(p.pid) for d, p in up.procs.items()}
    fuzz(secure, 600)
    time.sleep(2.0)
    exact_job(c, 10)
    alive(up)
    growth = {d: rss_kb(p.pid) - rss0[d] for d, p in up.procs.items()}
    assert max(growth.values()) < 80_000, growth             # kB
    wait_log(up, "rejected a message on")


@pytest.mark.slow
def test_fuzzing_long(secure):
    up, c = secure["up"], secure["c"]
    rss0 = {d: rss_kb(p.pid) for d, p in up.procs.items()}
    for s in range(25):
        fuzz(secure, 1000, seed=100 + s)
        exact_job(c, 100 + s)
    alive(up)
    growth = {d: rss_kb(p.pid) - rss0[d] for d, p in up.procs.items()}
    assert max(growth.values()) < 150_000, growth


def test_relays_cannot_read_the_pieces_they_carry(tmp_path):
    """a-b-c-d line, source a, sink d: b and c relay the answer, sealed to d; b's own
    keys (a relay's, or a thief's who stole b) do not open it, and the job is exact."""
    from meshdl.client import MeshClient
    from meshdl.mesh.loader import load_topology
    from meshdl.node.launcher import MeshUp
    from tests.test_dataplane import LINE_YAML
    topo = tmp_path / "line.yaml"
    topo.write_text(LINE_YAML)
    mesh = load_topology(topo)
    a = init_authority("line", tmp_path / "ca")
    bundles = {d: write_bundle(a.issue(d, "device", mesh.devices[d].profile),
                               tmp_path / f"{d}.bundle") for d in sorted(mesh.devices)}
    for cl in ("w", "u"):
        write_bundle(a.issue(cl, "client"), tmp_path / f"{cl}.bundle")
    relay = Bundle.load(bundles["b"])
    model = meshdl.models.build("tiny_cnn")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    got: list[tuple[str, bytes]] = []
    with SecureBroker(a) as br:
        with MeshUp(topo, broker=br.url, mesh="line", model="tiny_cnn", log_dir=tmp_path / "l",
                    verbose=False, bundles=bundles, watch_bundle=tmp_path / "w.bundle") as up:
            up.wait_ready(120)
            with PahoBus(br.url, **relay.tls_files()) as spy, \
                    MeshClient(br.url, "line", bundle=str(tmp_path / "u.bundle")) as c:
                spy.subscribe("meshdl/v1/line/route/b/#",
                              lambda t, p, r: got.append((t, bytes(p))), qos=1)
                time.sleep(1.0)
                r = c.infer(x, model="tiny_cnn", strategy="local", source="a", sink="d",
                            timeout=90)
    ref = model(x)
    assert (r.output - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert r.plan.route(r.plan.stages[-1].tasks[0].device, "d") == ["a", "b", "c", "d"]
    carried = [(t, p) for t, p in got if len(topics.parse_route(t)[1]) > 1 and p
               and F.is_sealed(p) and F.peek(p).type == "piece"]
    assert carried, f"b relayed no piece: {[t for t, _ in got]}"
    cache = F.EntryCache(relay.mesh_pub, "line")
    ring = F.KeyRing("line", "b", relay.seal_key)
    for t, p in carried:
        assert F.is_sealed(p)
        _, hops, job, piece = topics.parse_route(t)
        with pytest.raises(SecurityError, match="does not open"):
            F.open_sealed(ring, cache, job, piece, p)


def test_secure_failover_elects_the_best_survivor_by_votes(secure):
    """Last in this module (it kills the leader): on the secure mesh the best surviving
    device wins votes from a majority and leads, the client follows it, jobs stay exact."""
    from meshdl.mesh.loader import load_topology
    from meshdl.node import election as el
    up, c = secure["up"], secure["c"]
    dead = up.watcher.snapshot().leader.node
    enrolled = {d: dev.flops for d, dev in load_topology("home-4").devices.items()
                if d != dead}
    t0 = time.monotonic()
    up.kill(dead)
    wait_true(lambda: (s := up.watcher.snapshot()).leader is not None
              and s.leader.node == el.order(enrolled)[0], "the best survivor leads", 60)
    took = time.monotonic() - t0
    x, r = exact_job(c, 21)
    assert dead not in r.plan.devices()
    voters = set(up.watcher.snapshot().leader.votes)     # verified by the watcher's bus
    assert len(voters) >= 2 and dead not in voters, voters       # a majority of the 3 left
    assert took < 30, f"fail-over took {took:.1f} s"
