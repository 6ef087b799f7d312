"""Model delivery over a real mosquitto: chunked, CRC'd, hash-checked, resumable.
A provider that corrupts a chunk or lies about a tensor meets a fetcher that re-asks
and refuses; nothing wrong reaches the cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import meshdl
from meshdl.errors import ModelError
from meshdl.models.store import ModelStore, canonical_id, package, parse_manifest
from meshdl.node import model_store as MS
from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
from meshdl.transport.paho_bus import PahoBus

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    from tests.test_dataplane import broker_template
    d = tmp_path_factory.mktemp("deliv")
    with EmbeddedBroker(broker_template(d), backend="mosquitto", workdir=d / "b") as b:
        yield b.url


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    """A model with a 1.2 MB tensor (5 chunks) and small ones."""
    from model_zoo_user import export_onnx
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 14 * 14, 190)).eval()
    path = tmp_path_factory.mktemp("m") / "wide.onnx"
    export_onnx(model, torch.zeros(1, 3, 16, 16), path)
    return package(meshdl.models.load(path))


def bus(url, name):
    b = PahoBus(url, client_id=name)
    b.connect(10)
    return b


class Corrupting(MS.Provider):
    """Flips one data byte of the first ``n`` frames it sends (CRC stays the old one)."""
    n = 1

    def _mutate(self, frame: bytes) -> bytes:
        if self.n <= 0:
            return frame
        self.n -= 1
        b = bytearray(frame)
        b[-1] ^= 0xFF
        return bytes(b)


def test_corrupt_chunk_is_asked_again(broker, pkg, tmp_path):
    big = max(pkg.manifest["tensors"], key=lambda k: pkg.manifest["tensors"][k]["bytes"])
    assert pkg.manifest["tensors"][big]["bytes"] > 4 * MS.CHUNK_BYTES
    pb, nb = bus(broker, "prov-c"), bus(broker, "node-c")
    try:
        prov = Corrupting(pb, "md", "prov-c", ModelStore(tmp_path / "p")).start()
        prov.offer(pkg.id, pkg.manifest, pkg.blobs)
        store = ModelStore(tmp_path / "n")
        f = MS.Fetcher(nb, "md", "node-c", store)
        manifest = f.manifest(pkg.id, 10)
        got = f.fetch(pkg.id, manifest, [big], timeout=60)
        info = manifest["tensors"][big]
        assert got == info["bytes"] and f.corrupt_chunks >= 1
        assert store.read_tensor(info["sha256"]) == pkg.blobs[info["sha256"]]
        assert store.bytes_held() == info["bytes"]            # only what was asked for
        assert f.fetch(pkg.id, manifest, [big], timeout=5) == 0   # cached: no traffic
        prov.stop()
    finally:
        pb.close()
        nb.close()


def test_wrong_tensor_and_wrong_manifest_are_refused(broker, pkg, tmp_path):
    name = next(iter(pkg.manifest["tensors"]))
    info = pkg.manifest["tensors"][name]
    liar_blobs = dict(pkg.blobs)
    good = liar_blobs[info["sha256"]]
    liar_blobs[info["sha256"]] = bytes(len(good))       # right size, right CRCs, wrong data
    pb, nb = bus(broker, "prov-l"), bus(broker, "node-l")
    try:
        prov = MS.Provider(pb, "md2", "prov-l", ModelStore(tmp_path / "p")).start()
        prov.offer(pkg.id, pkg.manifest, liar_blobs)
        store = ModelStore(tmp_path / "n")
        f = MS.Fetcher(nb, "md2", "node-l", store)
        manifest = f.manifest(pkg.id, 10)
        with pytest.raises(ModelError, match="wrong sha256"):
            f.fetch(pkg.id, manifest, [name], timeout=60)
        assert f.refused >= MS.MAX_REFUSALS and not store.has_tensor(info["sha256"])
        # a manifest offered under an id it does not hash to
        bad_id = ("0" if pkg.id[0] != "0" else "1") + pkg.id[1:]
        prov.offer(bad_id, pkg.manifest, {})
        with pytest.raises(ModelError, match="refused"):
            MS.Fetcher(nb, "md2", "node-l2", ModelStore(tmp_path / "n2")).manifest(bad_id, 10)
        assert not ModelStore(tmp_path / "n2").has_manifest(bad_id)
        prov.stop()
    finally:
        pb.close()
        nb.close()


def test_store_roundtrip_listing_and_rm(pkg, tmp_path):
    store = ModelStore(tmp_path)
    store.put_package(pkg)
    m = store.manifest(pkg.id)
    assert canonical_id(parse_manifest(json.dumps(m).encode())) == pkg.id
    gm = meshdl.models.store.build_module(m, store.load_tensors(m, m["tensors"]))
    stand_in = meshdl.models.store.build_module(m, {})
    held = sum(b.untyped_storage().nbytes() for b in stand_in.buffers())
    assert held <= 8 * len(m["tensors"])              # stand-ins hold one element each
    x = torch.randn(tuple(m["input_shape"]))
    assert gm(x).shape == stand_in(x).shape
    (e,) = store.entries()
    assert e.id == pkg.id and e.present == e.tensors and e.bytes_held == e.bytes_total
    with pytest.raises(ModelError, match="no cached model"):
        store.remove("ffff")
    assert store.remove(pkg.id[:10]) == [pkg.id]
    assert store.entries() == [] and store.bytes_held() == 0
    flipped = bytearray(np.frombuffer(next(iter(pkg.blobs.values())), np.uint8).tobytes())
    flipped[0] ^= 1
    with pytest.raises(ModelError, match="refused"):
        store.put_tensor(next(iter(pkg.blobs)), bytes(flipped))
