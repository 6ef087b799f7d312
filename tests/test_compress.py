"""Lossless compression of tensor pieces: bit-exact round trips, per-link choice, bombs."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from meshdl.errors import WireError
from meshdl.wire import compress as C
from meshdl.wire.codec import decode_frame, encode_frames
from meshdl.wire.reassembly import Reassembler


def _relu_like(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    return np.maximum(x, 0).astype(dtype)


def _specials(dtype):
    a = _relu_like((3, 5, 7, 11), dtype)
    flat = a.reshape(-1)
    flat[:4] = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=dtype)
    # a NaN with a payload: only a bitwise comparison notices it changed
    bits = flat.view(np.uint16 if dtype == np.float16 else np.uint32)
    bits[5] = 0x7E01 if dtype == np.float16 else 0x7FC00123
    return a


def _arrays():
    rng = np.random.default_rng(1)
    bf16 = torch.relu(torch.randn(2, 8, 13, 17)).to(torch.bfloat16)
    bf16.view(-1)[:3] = torch.tensor([float("nan"), float("-inf"), -0.0],
                                     dtype=torch.bfloat16)
    return {
        "float32": _specials(np.float32),
        "float16": _specials(np.float16),
        # numpy has no bfloat16: its bits travel as int16 (as the runtime would send them)
        "bfloat16": bf16.view(torch.int16).numpy(),
        "int8": rng.integers(-128, 128, (1, 3, 31, 29), dtype=np.int8),
        "uint8": rng.integers(0, 256, (1, 3, 33, 35), dtype=np.uint8),
        "int64": rng.integers(-2**62, 2**62, (5, 7, 9), dtype=np.int64),
        "bool": rng.random((1, 1, 101, 37)) > 0.7,
        "empty": np.zeros((1, 64, 0, 7), dtype=np.float32),
        "odd": _relu_like((1, 1, 1, 4099), np.float32),
        "zeros": np.zeros((1, 64, 56, 56), dtype=np.float32),
    }


def _roundtrip(arr, codec, chunk_bytes):
    frames = encode_frames("j1", "p1", arr, codec=codec, chunk_bytes=chunk_bytes)
    re = Reassembler()
    out = None
    for f in frames:
        got = re.add(decode_frame(bytes(f))) if len(frames) > 1 else decode_frame(bytes(f))
        if len(frames) == 1:
            out = got.tensor()
        elif got is not None:
            out = got
    return frames, out


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
@pytest.mark.parametrize("name", list(_arrays()))
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1000])
def test_round_trip_is_bit_exact(codec, name, chunk_bytes):
    arr = _arrays()[name]
    frames, out = _roundtrip(arr, codec, chunk_bytes)
    assert out is not None
    out = np.asarray(out)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()          # bits, NaN payloads and -0.0 included
    if name == "zeros" and chunk_bytes > 1000:     # compressible data did shrink
        assert sum(len(f) for f in frames) * 20 < arr.nbytes


def _reassembled(frames):
    re = Reassembler()
    for f in frames:
        got = re.add(decode_frame(bytes(f)))
        if got is not None:
            return got


def test_relu_activations_shrink_and_random_bytes_travel_raw():
    act = _relu_like((1, 64, 56, 56), np.float32)
    for codec in ("zstd", "lz4"):
        frames = encode_frames("j", "p", act, codec=codec)
        assert sum(f.raw for f in frames) == act.nbytes
        assert sum(len(f.data) for f in frames) < act.nbytes / 1.2
    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    frames = encode_frames("j", "p", noise, codec="zstd")
    head = msgpack.Unpacker(raw=False)
    head.feed(bytes(frames[0])[:4096])
    assert "z" not in head.unpack()                # did not shrink: sent raw
    assert bytes(frames[0].data) == noise.tobytes()


def _forged(arr, codec, packed):
    """A frame whose header claims ``arr`` but carries ``packed`` as codec data."""
    f = encode_frames("j", "p", arr, codec=codec)[0]
    head = msgpack.Unpacker(raw=False)
    head.feed(bytes(f))
    fields = head.unpack()
    import zlib
    fields["crc"] = zlib.crc32(packed)
    fields["pad"] = 0
    return msgpack.packb(fields, use_bin_type=True) + packed


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_decompression_bomb_is_refused(codec):
    small = _relu_like((1, 1, 16, 16), np.float32)          # header says 1 KiB
    bomb = C.compress(np.zeros(64 << 20, np.uint8), 1, codec)   # 64 MiB of zeros
    assert len(bomb) < 1 << 20
    with pytest.raises(WireError, match="refused|does not decompress|bytes"):
        decode_frame(_forged(small, codec, bomb))
    with pytest.raises(WireError):
        C.decompress(bomb, codec, 1024)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_garbage_and_truncated_streams_are_wire_errors(codec):
    act = _relu_like((1, 8, 32, 32), np.float32)
    packed = C.compress(memoryview(act).cast("B"), 4, codec)
    for bad in (packed[: len(packed) // 2], bytes(len(packed)), b"\xff" * 40):
        with pytest.raises(WireError):
            decode_frame(_forged(act, codec, bad))
    with pytest.raises(WireError, match="unknown compression codec"):
        C.decompress(packed, "gzip", act.nbytes)


def test_codec_is_chosen_only_for_slow_links():
    assert C.choose_codec(2e9) is None                          # loopback: raw
    assert C.choose_codec(10e9) is None
    assert C.choose_codec(20e6) == "zstd"                       # 20 Mbit/s
    assert C.choose_codec(20e6, {"zstd": 1.0, "lz4": 1.0}) is None   # incompressible
    assert C.choose_codec(20e6, nbytes=100) is None             # tiny piece
    # the choice minimises the modelled time, and compression never slows a slow link
    for bw in (1e6, 10e6, 50e6, 500e6, 5e9):
        c = C.choose_codec(bw)
        raw = C.transfer_s(1 << 20, bw, None)
        assert C.transfer_s(1 << 20, bw, c) <= raw
        for other in C.codec_names():
            assert C.transfer_s(1 << 20, bw, c) <= C.transfer_s(1 << 20, bw, other) + 1e-12


def test_ratio_log_is_bounded_and_averages():
    log = C.RatioLog(limit=3)
    log.record("a", "zstd", 200, 100)
    log.record("a", "zstd", 100, 100)
    assert 1.0 < log.ratios("a")["zstd"] < 2.0
    for k in "bcde":
        log.record(k, "lz4", 10, 5)
    assert log.ratios("a") == {} and log.ratios("e") == {"lz4": 2.0}


# ----------------------------------------------------------------- in the data plane
SLOW_YAML = """
name: slow-z
defaults: {source: a, sink: a}
devices: {a: rpi4, b: rpi4}
links:
  - {a: a, b: b, bandwidth_mbps: 20, latency_ms: 2}
"""


def test_data_plane_compresses_slow_links_and_answers_are_unchanged(tmp_path):
    import meshdl
    from meshdl.client import MeshClient
    from meshdl.node.harness import InProcessMesh, finish_plan
    from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
    from meshdl.wire.compress import CodecPolicy
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    path = tmp_path / "slow.yaml"
    path.write_text(SLOW_YAML)
    mesh = meshdl.load_topology(path)
    model = meshdl.models.build("tiny_cnn")
    g = meshdl.trace(model, (1, 3, 64, 64), name="tiny_cnn")
    plan = meshdl.manual_plan(g, cuts=[2], grids=[(2, 1), (1, 1)])
    for t in plan.tasks():
        t.device = ["a", "b"][int(t.device[1:]) % 2]
    plan.source = plan.sink = "a"
    finish_plan(plan, g, mesh, 1)
    x = torch.relu(torch.randn(1, 3, 64, 64))
    outs = {}
    with EmbeddedBroker(backend="mosquitto", workdir=tmp_path / "b") as broker:
        with InProcessMesh(broker.url, mesh, mesh_name="slowz", emulate=True,
                           fixed={"tiny_cnn": plan}) as m:
            with MeshClient(broker.url, "slowz") as c:
                for mode in ("off", "auto", "lz4"):
                    for p in m.planes.values():
                        p.codecs = CodecPolicy(mode)
                    outs[mode] = c.infer(x, model="tiny_cnn", timeout=60).output
                    raw = sum(p.codecs.raw_bytes for p in m.planes.values())
                    wire = sum(p.codecs.wire_bytes for p in m.planes.values())
                    assert raw > 0
                    if mode == "off":
                        assert wire == raw
                    else:                         # 20 Mbit/s: slower than every codec
                        assert wire < raw / 1.1, (mode, raw, wire)
    for mode in ("auto", "lz4"):                  # bit-identical answers
        assert outs[mode].numpy().tobytes() == outs["off"].numpy().tobytes()


def test_simulator_predicts_compressed_pieces():
    import meshdl
    from meshdl.planner import simulate
    from meshdl.planner.wiremodel import WireModel, measure_ratios
    model = meshdl.models.build("tiny_cnn")
    g = meshdl.trace(model, (1, 3, 64, 64), name="tiny_cnn")
    ratios = measure_ratios(g, torch.relu(torch.randn(1, 3, 64, 64)))
    assert set(ratios) <= set(g.positions) and all(r["zstd"] > 0 for r in ratios.values())
    mesh = meshdl.load_topology("home-4")
    plan = meshdl.manual_plan(g, cuts=[2], grids=[(2, 1), (1, 1)])
    for t in plan.tasks():
        t.device = ["pi4-a", "pi3"][int(t.device[1:]) % 2]
    plan.source = plan.sink = "pi4-a"
    for cap, faster in ((5, True), (None, None)):
        m = mesh if cap is None else mesh.with_bandwidth_cap(cap)
        raw = simulate(plan, g, m)
        off = simulate(plan, g, m, wire=WireModel("off", ratios))
        auto = simulate(plan, g, m, wire=WireModel("auto", ratios))
        assert off.latency_s == raw.latency_s
        assert auto.latency_s <= raw.latency_s
        if faster:
            assert auto.latency_s < raw.latency_s
    # a tensor measured incompressible is sent raw: the prediction does not change
    flat = {p: {"zstd": 1.0, "lz4": 1.0} for p in g.positions}
    m = mesh.with_bandwidth_cap(5)
    assert simulate(plan, g, m, wire=WireModel("auto", flat)).latency_s == \
        simulate(plan, g, m).latency_s


def test_planner_scores_with_the_wire_model():
    import meshdl
    from meshdl.planner import simulate
    from meshdl.planner.wiremodel import WireModel, measure_ratios, synthetic_input
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), (1, 3, 64, 64), name="tiny_cnn")
    x = synthetic_input((1, 3, 64, 64))
    assert x.shape == (1, 3, 64, 64) and bool((x == synthetic_input((1, 3, 64, 64))).all())
    wire = WireModel("auto", measure_ratios(g, x, sample_bytes=4096))
    mesh = meshdl.load_topology("home-4").with_bandwidth_cap(5)
    plan = meshdl.plan(g, mesh, alpha=1.0, wire=wire)
    assert plan.latency_s == pytest.approx(simulate(plan, g, mesh, wire=wire).latency_s)
    assert plan.latency_s <= simulate(plan, g, mesh).latency_s
