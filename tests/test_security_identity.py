"""Mesh authority, bundles, ACL, signed and sealed frames (pure or file-level)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from meshdl.security import frames as F
from meshdl.security.acl import acl_text
from meshdl.security.authority import Authority, init_authority, write_bundle
from meshdl.security.bundle import Bundle
from meshdl.security.identity import SecurityError
from meshdl.security.policy import Admission, admit
from meshdl.wire import topics
from meshdl.wire.control import JobResult, JobStatus, LeaderInfo, NodeState, encode_control


@pytest.fixture(scope="module")
def auth(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth")
    a = init_authority("sec", d / "ca")
    paths = {}
    for ident, role, prof in (("d1", "device", "rpi4"), ("d2", "device", "rpi3bplus"),
                              ("d3", "device", "rpi3bplus"), ("c1", "client", None)):
        paths[ident] = write_bundle(a.issue(ident, role, prof), d / f"{ident}.bundle")
    return a, {k: Bundle.load(p) for k, p in paths.items()}, d


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_authority_and_bundles_are_private(auth):
    a, b, d = auth
    assert mode(a.dir) == 0o700
    for f in ("ca.key", "mesh.key", "ca.crt", "roster.json", "mesh.json"):
        assert mode(a.dir / f) == 0o600
    assert mode(d / "d1.bundle") == 0o600
    assert b["d1"].role == "device" and b["c1"].role == "client"
    assert b["d1"].entry_info.caps["flops"] > 0 and b["d1"].entry_info.profile == "rpi4"
    files = b["d1"].tls_files()
    assert all(mode(p) == 0o600 for p in files.values())
    assert mode(os.path.dirname(files["tls_key"])) == 0o700


def test_reenrolment_and_damaged_bundles_are_refused(auth, tmp_path):
    a, b, d = auth
    with pytest.raises(SecurityError, match="already enrolled"):
        a.issue("d1", "device")
    data = json.loads((d / "d1.bundle").read_text())
    other = init_authority("evil", tmp_path / "evil")
    data["entry_sig"] = other.mesh_key.sign(bytes.fromhex(data["entry"])).hex()
    bad = tmp_path / "bad.bundle"
    bad.write_text(json.dumps(data))
    with pytest.raises(SecurityError, match="not signed by this mesh"):
        Bundle.load(bad)
    with pytest.raises(SecurityError, match="not a mesh authority"):
        Authority(tmp_path)


def test_acl_is_least_privilege(auth):
    a, _, _ = auth
    text = acl_text("sec", a.roster())
    p = "meshdl/v1/sec"
    assert "readwrite meshdl/v1/#" not in text and "allow_anonymous" not in text
    # no pattern lines: they would hold for any identity, a revoked one still connected too
    assert "pattern" not in text.replace("# ", "")
    d1 = text.split("user d1\n")[1].split("\n\n")[0]
    c1 = text.split("user c1\n")[1].split("\n\n")[0]
    assert f"topic readwrite {p}/route/d1/#" in d1 and f"{p}/job/+/+/status" not in c1
    assert f"topic read {p}/job/c1/+/status" in c1 and f"topic read {p}/job/c1/+/result" in c1
    assert f"topic write {p}/node/d1/state" in d1 and "node/d2" not in d1
    assert f"topic write {p}/leader" in d1 and f"topic write {p}/plan/+" in d1
    writes = [ln for ln in c1.splitlines() if ln.startswith("topic write")
              or ln.startswith("topic readwrite")]
    assert sorted(writes) == sorted([f"topic readwrite {p}/route/c1/#",
                                     f"topic write {p}/route/#",
                                     f"topic readwrite {p}/client/c1/key",
                                     f"topic readwrite {p}/model/#",
                                     f"topic write {p}/job/c1/+/request",
                                     f"topic readwrite {p}/route/c1-ctl/#"])
    assert not [ln for ln in c1.splitlines() if "leader" in ln and "write" in ln]


def test_signed_frames_verify_and_bind_the_topic(auth):
    _, b, _ = auth
    d1 = b["d1"]
    cache = F.EntryCache(d1.mesh_pub, "sec")
    t = topics.node_state("sec", "d1")
    frame = F.sign(d1.sign_key, d1.entry.raw, d1.entry.sig, t, b"body")
    entry, body = F.verify(cache, t, frame)
    assert entry.id == "d1" and body == b"body"
    with pytest.raises(SecurityError, match="bad signature"):
        F.verify(cache, topics.node_state("sec", "d2"), frame)        # replayed elsewhere
    tampered = frame[:-1] + bytes([frame[-1] ^ 1])
    with pytest.raises(SecurityError):
        F.verify(cache, t, tampered)
    with pytest.raises(SecurityError, match="unsigned"):
        F.verify(cache, t, b"\x81\xa1v\x01")


def test_sealed_pieces_open_only_at_their_destination(auth):
    _, b, _ = auth
    d1, d2, c1 = b["d1"], b["d2"], b["c1"]
    rings = {k: F.KeyRing("sec", k, v.seal_key) for k, v in b.items()}
    cache = F.EntryCache(d1.mesh_pub, "sec")
    data = os.urandom(5000)
    sealed = F.seal(rings["c1"], c1.entry.raw, c1.entry.sig, d1.entry_info, "job1", "p.in",
                    data, F.Peek("piece", 3, 7, 1, 4))
    assert data not in sealed
    assert F.peek(sealed) == F.Peek("piece", 3, 7, 1, 4)
    sender, pt = F.open_sealed(rings["d1"], cache, "job1", "p.in", sealed)
    assert pt == data and sender.id == "c1"
    with pytest.raises(SecurityError, match="does not open"):        # a bystander/relay
        F.open_sealed(rings["d2"], cache, "job1", "p.in", sealed)
    with pytest.raises(SecurityError, match="does not open"):        # moved to another job
        F.open_sealed(rings["d1"], cache, "job2", "p.in", sealed)
    assert d2.id == "d2"


def _signed_admit(adm, b, topic, msg):
    cache = F.EntryCache(b.mesh_pub, "sec")
    body = encode_control(msg)
    e, body = F.verify(cache, topic, F.sign(b.sign_key, b.entry.raw, b.entry.sig, topic, body))
    return admit(adm, topics.parse(topic), e, body, 0.0)


def test_policy_caps_flops_and_checks_roles(auth):
    _, b, _ = auth
    adm = Admission("c1", "client")
    t = topics.node_state("sec", "d2")
    v = _signed_admit(adm, b["d2"], t, NodeState("d2", True, 1, flops=1e15))
    from meshdl.wire.control import decode_control
    assert v.ok and decode_control(v.body).flops == b["d2"].entry_info.caps["flops"]
    v = _signed_admit(adm, b["d2"], topics.node_state("sec", "d1"),
                      NodeState("d1", False, 9))
    assert not v.ok and "d1's state topic" in v.reason
    v = _signed_admit(adm, b["c1"], topics.leader("sec"), LeaderInfo("c1", 5))
    assert not v.ok and "devices only" in v.reason


def test_client_takes_results_only_from_the_plans_sink(auth):
    _, b, _ = auth
    adm = Admission("c1", "client")
    assert _signed_admit(adm, b["d1"], topics.leader("sec"), LeaderInfo("d1", 4)).ok
    plan = {"sink": "d1", "source": "d1", "stages": [{"tasks": [{"device": "d1"}]}],
            "meta": {"leader": "d1"}}
    from meshdl.wire.control import PlanMessage
    v = _signed_admit(adm, b["d2"], topics.plan("sec", "p1"), PlanMessage("p1", 4, plan))
    assert not v.ok and "issued by d1" in v.reason
    mine = {**plan, "meta": {"leader": "d2"}}
    v = _signed_admit(adm, b["d2"], topics.plan("sec", "p1"), PlanMessage("p1", 4, mine))
    assert not v.ok and "d1 leads" in v.reason
    v = _signed_admit(adm, b["d2"], topics.plan("sec", "p1"), PlanMessage("p1", 5, mine))
    assert not v.ok and v.hold_term == 5           # held until term 5 has a verified leader
    assert _signed_admit(adm, b["d1"], topics.plan("sec", "p1"), PlanMessage("p1", 4, plan)).ok
    job = "c1~abc"
    forged = _signed_admit(adm, b["d2"], topics.job("sec", job, "status"),
                           JobStatus(job, "failed", "forged"))
    assert not forged.ok
    assert _signed_admit(adm, b["d1"], topics.job("sec", job, "status"),
                         JobStatus(job, "planned", "p1")).ok
    v = _signed_admit(adm, b["d2"], topics.job("sec", job, "result"), JobResult(job, True))
    assert not v.ok and "not the sink d1" in v.reason
    assert _signed_admit(adm, b["d1"], topics.job("sec", job, "result"),
                         JobResult(job, True)).ok


def test_password_files_are_private_with_real_iterations(tmp_path):
    from meshdl.transport.passwords import PBKDF2_ITERATIONS, make_password_file
    pw = make_password_file(tmp_path / "pw", {"carol": "x y z"})
    assert mode(pw) == 0o600
    assert pw.read_text().startswith(f"carol:$7${PBKDF2_ITERATIONS}$")
    assert PBKDF2_ITERATIONS >= 10_000


def _frame(b, topic, msg):
    return F.sign(b.sign_key, b.entry.raw, b.entry.sig, topic, encode_control(msg))


def _admit_with_votes(adm, b, msg):
    t = topics.leader("sec")
    cache = F.EntryCache(b.mesh_pub, "sec")
    e, body = F.verify(cache, t, _frame(b, t, msg))
    return admit(adm, topics.parse(t), e, body, 0.0,
                 verify_vote=lambda fr: F.verify(cache, topics.election("sec"), fr))


@pytest.mark.parametrize("role", ["client", "device"])
def test_a_leader_needs_signed_votes_from_a_majority_of_live_devices(auth, role):
    from meshdl.security.policy import current_leader, leader_of
    from meshdl.wire.control import Campaign, decode_control
    _, b, _ = auth
    adm = Admission("c1" if role == "client" else "d3", role)
    for d in ("d1", "d2", "d3"):                              # three live devices
        assert _signed_admit(adm, b[d], topics.node_state("sec", d), NodeState(d, True, 1)).ok
    te = topics.election("sec")
    # d2 (a stolen bundle) jumps to term 40: its own signature is 1 vote of 3
    v = _admit_with_votes(adm, b["d2"], LeaderInfo("d2", 40))
    assert v.ok is (role == "device")          # a node's election machine judges it too
    if role == "client":
        assert "votes of 1 of 3 live devices (no majority)" in v.reason
    # a vote it signed itself in d3's name, and d1's real vote for someone else: not counted
    forged = {"d3": _frame(b["d2"], te, Campaign("d3", 40, "vote", 1.0, "d2")),
              "d1": _frame(b["d1"], te, Campaign("d1", 39, "vote", 1.0, "d2"))}
    v = _admit_with_votes(adm, b["d2"], LeaderInfo("d2", 40, votes=forged))
    assert leader_of(adm, 40) is None and current_leader(adm) is None
    # d1 with d3's signed vote for (d1, 4): a majority
    vote = {"d3": _frame(b["d3"], te, Campaign("d3", 4, "vote", 1.0, "d1"))}
    v = _admit_with_votes(adm, b["d1"], LeaderInfo("d1", 4, votes=vote))
    assert v.ok and decode_control(v.body).votes == {"d1": b"", "d3": b""}
    assert leader_of(adm, 4) == "d1" and current_leader(adm) == "d1"
    # d3 goes offline: its signed vote still counts (2 of the 3 devices d1, d2 + voters)
    assert _signed_admit(adm, b["d3"], topics.node_state("sec", "d3"), NodeState("d3", False, 1)).ok
    assert current_leader(adm) == "d1"


def test_votes_for_this_side_are_kept_for_its_leader_record(auth):
    from meshdl.wire.control import Campaign
    _, b, _ = auth
    adm = Admission("d1", "device")
    v = _signed_admit(adm, b["d3"], topics.election("sec"), Campaign("d3", 4, "vote", 1.0, "d1"))
    assert v.ok and v.vote_term == 4
    v = _signed_admit(adm, b["d3"], topics.election("sec"), Campaign("d3", 4, "vote", 1.0, "d2"))
    assert v.ok and v.vote_term is None
    v = _signed_admit(adm, b["d2"], topics.election("sec"), Campaign("d3", 4, "vote", 1.0, "d1"))
    assert not v.ok and "in the name of d3" in v.reason


def test_no_bundle_on_a_remote_broker_warns_loudly(caplog):
    from meshdl.security.securebus import warn_if_exposed
    with caplog.at_level("WARNING"):
        assert not warn_if_exposed("mqtt://127.0.0.1:1883", "node")
        assert not warn_if_exposed("mqtt://localhost:1883", "client")
        assert warn_if_exposed("mqtt://hub.local:1883", "node")
    assert "INSECURE" in caplog.text and "hub.local" in caplog.text


def test_a_revoked_bundle_is_refused_by_the_broker(tmp_path):
    from meshdl.errors import TransportError
    from meshdl.security.broker import SecureBroker
    from meshdl.transport.broker import mosquitto_binary
    from meshdl.transport.paho_bus import PahoBus
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    a = init_authority("rv", tmp_path / "ca")
    keep = Bundle.load(write_bundle(a.issue("keep", "device"), tmp_path / "keep"))
    lost = Bundle.load(write_bundle(a.issue("lost", "device"), tmp_path / "lost"))
    a.revoke("lost")
    assert "user lost" not in acl_text("rv", a.active_roster())
    with SecureBroker(a) as br:
        with PahoBus(br.url, **keep.tls_files(), connect_timeout=5) as bus:
            assert bus.connected
        with pytest.raises(TransportError):
            PahoBus(br.url, **lost.tls_files(), connect_timeout=3)
    with pytest.raises(SecurityError, match="already revoked"):
        a.revoke("lost")
