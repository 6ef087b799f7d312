"""Wire contract: topics, piece/ack/credit frames, control messages, reassembly."""
from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from meshdl.errors import WireError
from meshdl.wire import codec, control, topics
from meshdl.wire.codec import AckFrame, CreditFrame, PieceFrame, decode_frame, encode_chunks
from meshdl.wire.reassembly import Reassembler

# ------------------------------------------------------------------ topics
def test_topic_builders_and_parse_roundtrip():
    cases = {
        topics.node_state("m", "n1"): dict(kind="state", node="n1"),
        topics.node_telemetry("m", "n1"): dict(kind="telemetry", node="n1"),
        topics.election("m"): dict(kind="election"),
        topics.leader("m"): dict(kind="leader"),
        topics.plan("m", "p-7"): dict(kind="plan", plan_id="p-7"),
        topics.job("m", "c1~j1", "result"): dict(kind="job", job="c1~j1", job_kind="result",
                                                 client="c1"),
        topics.route_topic("m", ["a", "b", "c"], "j1", "s1.t0>s2.t1"):
            dict(kind="route", hops=("a", "b", "c"), job="j1", piece="s1.t0>s2.t1"),
    }
    for topic, want in cases.items():
        assert topic.startswith("meshdl/v1/m/")
        parsed = topics.parse(topic)
        assert parsed.mesh == "m"
        for k, v in want.items():
            assert getattr(parsed, k) == v, (topic, k)
    assert topics.node_state("m", "n1") == "meshdl/v1/m/node/n1/state"
    assert topics.route_topic("m", ["b"], "j", "p") == "meshdl/v1/m/route/b/j/p"


def test_job_topics_have_a_client_level():
    j = topics.job_name("cam-client", "ab12-1")
    assert j == "cam-client~ab12-1" and topics.job_owner(j) == "cam-client"
    assert topics.job("m", j, "status") == "meshdl/v1/m/job/cam-client/cam-client~ab12-1/status"
    assert topics.job_all("m", "result", client="cam-client") == \
        "meshdl/v1/m/job/cam-client/+/result"
    assert topics.job_all("m", "request") == "meshdl/v1/m/job/+/+/request"
    assert topics.topic_matches(topics.job_all("m", "status", "cam-client"),
                                topics.job("m", j, "status"))
    assert not topics.topic_matches(topics.job_all("m", "status", "other"),
                                    topics.job("m", j, "status"))
    for bad in ("j1", "~x", "c~", "a/b~c"):
        with pytest.raises(WireError):
            topics.job("m", bad, "status")
    with pytest.raises(WireError, match="contains '~'"):
        topics.job_name("a~b", "x")
    with pytest.raises(WireError, match="not the client its id names"):
        topics.parse("meshdl/v1/m/job/eve/alice~x/status")


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x\x00", "x" * 65, 7, None])
def test_ids_are_validated(bad):
    with pytest.raises(WireError):
        topics.node_state("m", bad)
    with pytest.raises(WireError):
        topics.route_topic("m", ["a", bad], "j", "p")


@pytest.mark.parametrize("topic", [
    "other/v1/m/leader", "meshdl/v1/m", "meshdl/v1/m/node/x", "meshdl/v1/m/node/x/bogus",
    "meshdl/v1/m/job/j/cancel", "meshdl/v1/m/route/j/p", "meshdl/v1//leader",
    "meshdl/v1/m/job/c~j/status", "meshdl/v1/m/job/c/j/status", "meshdl/v1/m/job/c/c~j/x",
    "meshdl/v1/m/plan/a/b", "meshdl/v1/m/leader/x",
])
def test_parse_rejects(topic):
    with pytest.raises(WireError):
        topics.parse(topic)


def test_route_limits():
    with pytest.raises(WireError):
        topics.route_topic("m", [], "j", "p")
    with pytest.raises(WireError):
        topics.route_topic("m", "ab", "j", "p")
    with pytest.raises(WireError):
        topics.route_topic("m", [f"n{i}" for i in range(topics.MAX_HOPS + 1)], "j", "p")
    assert topics.parse_route(topics.route_topic("m", ["n"] * topics.MAX_HOPS, "j", "p"))[1] \
        == ("n",) * topics.MAX_HOPS


def test_next_hop_strips_self():
    t = topics.route_topic("m", ["a", "b", "c"], "j", "p")
    step = topics.next_hop(t, "a")
    assert (step.consume, step.next_hop) == (False, "b")
    assert step.topic == topics.route_topic("m", ["b", "c"], "j", "p")
    step = topics.next_hop(step.topic, "b")
    assert step.topic == "meshdl/v1/m/route/c/j/p"
    last = topics.next_hop(step.topic, "c")
    assert last.consume and last.topic is None and (last.job, last.piece) == ("j", "p")
    assert topics.topic_matches(topics.route_inbox("m", "c"), step.topic)
    with pytest.raises(WireError):
        topics.next_hop(t, "b")
    assert topics.return_route(["a", "b", "c"]) == ["b", "a"]


@pytest.mark.parametrize("pattern,topic,want", [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "a/b", True), ("+/+", "a/b", True),
    ("a/+/c", "a/x/c", True), ("a/+/c", "a/x/d", False), ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False), ("+", "", True), ("#", "$SYS/x", False), ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True), ("a//b", "a//b", True), ("a/+/b", "a//b", True),
])
def test_topic_matches(pattern, topic, want):
    assert topics.topic_matches(pattern, topic) is want


@pytest.mark.parametrize("bad", ["a/#/b", "a#", "a/b+", ""])
def test_validate_filter(bad):
    with pytest.raises(WireError):
        topics.validate_filter(bad)


# ------------------------------------------------------------------ piece frames
DTYPES = ["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]


@st.composite
def tensors(draw, max_elems=4096):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=5)))
    if int(np.prod(shape)) > max_elems:
        shape = shape[:1]
    raw = draw(st.binary(min_size=int(np.prod(shape)) * np.dtype(dtype).itemsize,
                         max_size=int(np.prod(shape)) * np.dtype(dtype).itemsize))
    arr = np.frombuffer(raw, dtype=np.uint8).view(dtype) if raw else np.zeros(0, dtype)
    if dtype == "bool":
        arr = arr.view(np.uint8) & 1
        arr = arr.astype(bool)
    return arr.reshape(shape)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arr=tensors(), chunk=st.sampled_from([1, 7, 64, 1000, codec.CHUNK_BYTES]),
       seed=st.integers(0, 2**16))
def test_roundtrip_any_tensor_any_chunking(arr, chunk, seed):
    frames = list(encode_chunks("job-1", "s0.t1>s1.t0", arr, region=(1, 3, 0, 4, 2, 9),
                                src_task="s0.t1", dst_task="s1.t0", term=3, seq=9,
                                chunk_bytes=chunk))
    decoded = [decode_frame(f) for f in frames]
    assert all(isinstance(f, PieceFrame) for f in decoded)
    f0 = decoded[0]
    assert (f0.job, f0.piece, f0.src_task, f0.dst_task, f0.term, f0.seq) == \
        ("job-1", "s0.t1>s1.t0", "s0.t1", "s1.t0", 3, 9)
    assert f0.region == (1, 3, 0, 4, 2, 9) and f0.shape == arr.shape
    rnd = random.Random(seed)
    order = decoded + rnd.sample(decoded, k=min(3, len(decoded)))
    rnd.shuffle(order)
    r = Reassembler()
    results = [x for x in (r.add(f) for f in order) if x is not None]
    assert len(results) == 1 and _same(results[0], arr)
    assert r.pending_bytes == 0 and not r.pending()


def test_single_frame_decode_is_zero_copy_and_aligned():
    arr = np.random.default_rng(0).standard_normal((1, 64, 56, 56)).astype(np.float32)
    payload = codec.encode_piece("j", "p", arr)
    frame = decode_frame(payload)
    out = frame.tensor()
    assert np.shares_memory(out, np.frombuffer(payload, np.uint8))
    assert out.flags.aligned and not out.flags.writeable
    assert _same(out, arr)
    assert _same(decode_frame(memoryview(payload)).tensor(), arr)
    # non-contiguous and big-endian inputs travel as C-order little-endian
    t = np.arange(12, dtype=">i4").reshape(3, 4).T
    assert np.array_equal(decode_frame(codec.encode_piece("j", "p", t)).tensor(), t)


def test_chunk_sizes_near_one_mib():
    arr = np.zeros((1, 64, 112, 112), np.float32)             # 3.06 MiB
    frames = list(encode_chunks("j", "p", arr))
    assert len(frames) == 4
    assert all(len(f) <= codec.CHUNK_BYTES + 256 for f in frames)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_truncation_and_corruption_raise_wireerror_only(data):
    arr = np.arange(40, dtype=np.float32).reshape(2, 20)
    payload = list(encode_chunks("j", "p", arr, region=(1, 2, 0, 2, 0, 20), chunk_bytes=64))[1]
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(WireError):
        decode_frame(payload[:cut])
    pos = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(payload)
    bad[pos] ^= flip
    try:
        frame = decode_frame(bytes(bad))
    except WireError:
        return
    assert pos < len(payload) - 64, "a flipped data byte must fail the crc"
    assert isinstance(frame, PieceFrame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_wireerror_only(blob):
    with pytest.raises(WireError):
        decode_frame(blob)
    with pytest.raises(WireError):
        control.decode_control(blob)


def _forge(payload: bytes, **changes) -> bytes:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(payload)
    head = unpacker.unpack()
    rest = payload[unpacker.tell() + head["pad"]:]
    head.update(changes)
    head["pad"] = 0
    return msgpack.packb(head) + rest


@pytest.mark.parametrize("changes,reason", [
    (dict(v=2), "version"), (dict(type="bogus"), "unknown frame type"),
    (dict(dtype="complex128"), "dtype"), (dict(dtype="object"), "dtype"),
    (dict(shape=[3, 4]), "carries"), (dict(shape=[-1, 16]), "dimension"),
    (dict(shape=[1 << 40, 1 << 40]), "dimension"), (dict(shape=[1] * 9), "shape"),
    (dict(crc=0), "crc"), (dict(chunk=[1, 1]), "out of range"),
    (dict(chunk=[0, 3]), "tile"), (dict(off=4), "tile"), (dict(job=""), "job"),
    (dict(job="x" * 65), "job"), (dict(term=-1), "term"), (dict(seq=1.5), "seq"),
    (dict(region=[0, 1, 5, 2, 0, 1]), "region"), (dict(region=[1, 2]), "region"),
    (dict(src=7), "src"), (dict(dtype="int64"), "carries"),
])
def test_each_field_is_bounded(changes, reason):
    arr = np.ones((2, 8), np.float32)
    good = codec.encode_piece("j", "p", arr, region=(1, 2, 0, 2, 0, 8))
    assert isinstance(decode_frame(_forge(good)), PieceFrame)   # forging alone is harmless
    with pytest.raises(WireError, match=reason):
        decode_frame(_forge(good, **changes))


def test_oversize_frame_and_unsupported_dtype():
    payload = codec.encode_piece("j", "p", np.zeros(1024, np.uint8))
    with pytest.raises(WireError, match="exceeds"):
        decode_frame(payload, max_frame=512)
    with pytest.raises(WireError, match="dtype"):
        codec.encode_piece("j", "p", np.zeros(3, np.complex64))
    with pytest.raises(WireError):
        codec.encode_piece("j/x", "p", np.zeros(3, np.float32))


def test_ack_and_credit_roundtrip():
    ack = AckFrame("j", "p", node="n4", term=2, seq=5, ok=False, chunks=(0, 2))
    assert decode_frame(codec.encode_frame(ack)) == ack
    credit = CreditFrame("n4", credits=16, job="j", term=2)
    assert decode_frame(codec.encode_frame(credit)) == credit
    with pytest.raises(WireError):
        decode_frame(codec.encode_frame(ack) + b"x")
    with pytest.raises(WireError):
        codec.encode_frame(CreditFrame("n4", credits=-1))


# ------------------------------------------------------------------ reassembly
def _chunks(arr, **kw):
    return [decode_frame(f) for f in encode_chunks("j", "p", arr, chunk_bytes=16, **kw)]


def test_reassembler_bounds_and_expiry():
    now = [0.0]
    r = Reassembler(max_pending_bytes=100, ttl_s=5, clock=lambda: now[0])
    a = np.arange(20, dtype=np.float32)                # 80 bytes
    fa = _chunks(a)
    assert r.add(fa[0]) is None and r.pending_bytes == 80
    assert r.missing("j", "p") == [1, 2, 3, 4]
    with pytest.raises(WireError, match="buffer full"):
        r.add(decode_frame(list(encode_chunks("j", "q", a, chunk_bytes=16))[0]))
    now[0] = 10.0
    assert r.expire() == [("j", "p")] and r.pending_bytes == 0
    for f in fa:
        out = r.add(f)
    assert np.array_equal(out, a)
    assert all(r.add(f) is None for f in fa)           # late duplicates ignored


def test_reassembler_newer_attempt_replaces_older():
    r = Reassembler()
    a, b = np.zeros(12, np.float32), np.ones(12, np.float32)
    old, new = _chunks(a, seq=1), _chunks(b, seq=2)
    r.add(old[0])
    r.add(new[0])
    with pytest.raises(WireError, match="disagrees"):
        r.add(old[1])
    out = [r.add(f) for f in new[1:]][-1]
    assert np.array_equal(out, b)


# ------------------------------------------------------------------ control messages
CONTROL_SAMPLES = [
    control.NodeState("n1", True, 3, profile="rpi4", flops=1.5e10, memory_bytes=4 << 30,
                      power={"compute_w": 5.0}, version="0.1.0", ts=1.0),
    control.Telemetry("n1", 2.0, load=0.5, links={"n2": {"rtt_s": 0.01, "bps": 1e8}}),
    control.Campaign("n1", 4, priority=2.0),
    control.LeaderInfo("n1", 4),
    control.PlanMessage("p1", 4, {"stages": [], "term": 4}),
    control.JobRequest("j1", "client-1", model="vgg16", options={"alpha": 0.5}),
    control.JobStatus("j1", "running", detail="stage 1/3"),
    control.JobResult("j1", True, result={"top5": [[1, 0.9]]}, timings={"total_s": 0.2}),
]


@pytest.mark.parametrize("msg", CONTROL_SAMPLES, ids=lambda m: m.TYPE)
def test_control_roundtrip(msg):
    payload = control.encode_control(msg)
    assert codec.decode_control(payload, type(msg)) == msg
    assert control.decode_control(payload, msg.TYPE) == msg
    other = "leader" if msg.TYPE != "leader" else "plan"
    with pytest.raises(WireError, match="expected"):
        control.decode_control(payload, other)


@pytest.mark.parametrize("body,reason", [
    ({"v": 2, "type": "leader", "node": "a", "term": 1}, "version"),
    ({"v": 1, "type": "nope"}, "unknown"),
    ({"v": 1, "type": "leader", "term": 1}, "lacks required field 'node'"),
    ({"v": 1, "type": "leader", "node": "a", "term": "1"}, "term"),
    ({"v": 1, "type": "leader", "node": "a", "term": -1}, "term"),
    ({"v": 1, "type": "leader", "node": "", "term": 1}, "node"),
    ({"v": 1, "type": "state", "node": "a", "online": 1, "session": 0}, "online"),
    ({"v": 1, "type": "plan", "plan_id": "p", "term": 1, "plan": []}, "plan"),
    ([1, 2], "not a map"),
])
def test_control_validation(body, reason):
    with pytest.raises(WireError, match=reason):
        control.decode_control(msgpack.packb(body))


def test_control_ignores_unknown_keys():
    payload = msgpack.packb({"v": 1, "type": "leader", "node": "a", "term": 1, "new": 5})
    assert control.decode_control(payload) == control.LeaderInfo("a", 1)


def test_frame_type_reads_the_header_only_and_refuses_unknown_types():
    piece = codec.encode_piece("j", "p", np.zeros((2, 3), np.float32))
    assert codec.frame_type(piece) == "piece"
    assert codec.frame_type(codec.encode_ack(AckFrame("j", "p", "n"))) == "ack"
    assert codec.frame_type(codec.encode_credit(CreditFrame("n", 4, job="j"))) == "credit"
    assert codec.frame_type(memoryview(piece)[:-4]) == "piece"     # the body is not read
    forged = msgpack.packb({"v": codec.VERSION, "type": "plan"})
    with pytest.raises(codec.WireError, match="unknown frame type"):
        codec.frame_type(forged)
    with pytest.raises(codec.WireError):
        codec.frame_type(b"\xc1garbage")
