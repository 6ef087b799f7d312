"""The sealing ciphers and sealed frames.

AEGIS-128L (MDE2 frames) is the default where the CPU has AES instructions,
AES-256-GCM (MDE1) the fallback; libsodium's AES-256-GCM and cryptography's AESGCM
are the same cipher, so either side opens what the other sealed. Each cipher has its
own key per (pair, job); every receiver opens both kinds; a flipped bit, a
truncation, a wrong key, a relabelled frame or other associated data does not open.
"""
from __future__ import annotations

import os
import threading
import time

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshdl.security import aead as A
from meshdl.security import frames as F
from meshdl.security.aead import Aead, InvalidTag, out_buffer, pick_cipher
from meshdl.security.identity import Entry, SecurityError, sign_entry

needs_aegis = pytest.mark.skipif(not A.has_aegis(), reason="libsodium without AEGIS-128L")
CIPHERS = [pytest.param("aegis128l", marks=needs_aegis), "aes256gcm"]


def _key(cipher: str) -> bytes:
    return os.urandom(A.CIPHERS[cipher].key_bytes)


def _nonce(cipher: str) -> bytes:
    return os.urandom(A.CIPHERS[cipher].nonce_bytes)


# ------------------------------------------------------------------ the ciphers
@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 3])
def test_aes_interoperates_with_cryptography_both_ways(size):
    key, nonce, aad = os.urandom(32), os.urandom(12), b"mesh\0d2\0job\0piece"
    data = os.urandom(size)
    a = Aead(key)
    out = bytearray(size + 16)
    a.encrypt_into(nonce, memoryview(data), aad, out)
    assert AESGCM(key).decrypt(nonce, bytes(out), aad) == data
    ct = AESGCM(key).encrypt(nonce, data, aad)
    back = bytearray(size)
    a.decrypt_into(nonce, memoryview(ct), aad, back)
    assert back == data


@pytest.mark.parametrize("cipher", CIPHERS)
def test_unzeroed_buffers_round_trip_every_size(cipher):
    """Sealing and opening write into unzeroed buffers: every byte must come from the
    cipher (a stale heap byte would corrupt the piece or fail the tag)."""
    a, tag = Aead(_key(cipher), cipher), A.CIPHERS[cipher].tag_bytes
    for size in (0, 1, 15, 16, 31, 32, 4095, 1 << 20):
        data, nonce = os.urandom(size), _nonce(cipher)
        ct = out_buffer(size + tag)
        assert isinstance(ct, bytearray) and len(ct) == size + tag
        a.encrypt_into(nonce, data, b"aad", ct)
        assert data[:64] not in bytes(ct) or size < 8
        ref = bytearray(size + tag)                       # a zeroed buffer: same bytes
        a.encrypt_into(nonce, data, b"aad", ref)
        assert ct == ref
        pt = out_buffer(size)
        a.decrypt_into(nonce, ct, b"aad", pt)
        assert bytes(pt) == data
    with pytest.raises(ValueError):
        out_buffer(-1)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_tampering_does_not_open(cipher):
    key, nonce, aad, tag = _key(cipher), _nonce(cipher), b"aad", A.CIPHERS[cipher].tag_bytes
    out = bytearray(1000 + tag)
    Aead(key, cipher).encrypt_into(nonce, os.urandom(1000), aad, out)
    flipped_nonce = bytes([nonce[0] ^ 1]) + nonce[1:]
    for ct, k, n, ad in ((bytes([out[0] ^ 1]) + bytes(out[1:]), key, nonce, aad),
                         (bytes(out[:-1]) + bytes([out[-1] ^ 0x80]), key, nonce, aad),
                         (bytes(out), _key(cipher), nonce, aad),
                         (bytes(out), key, flipped_nonce, aad),
                         (bytes(out), key, nonce[:-1], aad),        # short nonce: no read
                         (bytes(out), key, nonce, b"other"),
                         (bytes(out[:tag - 1]), key, nonce, aad)):
        with pytest.raises(InvalidTag):
            Aead(k, cipher).decrypt_into(n, ct, ad, bytearray(max(0, len(ct) - tag)))
    with pytest.raises(ValueError):
        Aead(key, cipher).encrypt_into(nonce + b"x", b"data", aad, bytearray(4 + tag))
    with pytest.raises(ValueError, match="key"):
        Aead(key + b"x", cipher)


@pytest.mark.parametrize("setting, have_aegis, hw, want", [
    (None, True, True, "aegis128l"), ("auto", True, True, "aegis128l"),
    (None, True, False, "aes256gcm"),          # AEGIS would run in software
    (None, False, True, "aes256gcm"),          # libsodium without AEGIS
    ("aes256gcm", True, True, "aes256gcm"), ("openssl", True, True, "aes256gcm"),
    (" AEGIS128L ", True, False, "aegis128l"), ("aegis128l", True, True, "aegis128l")])
def test_the_sender_picks_aegis_where_it_is_fast(setting, have_aegis, hw, want):
    assert pick_cipher(setting, have_aegis, hw) == want


def test_a_bad_or_impossible_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="MESHDL_AEAD='chacha'"):
        pick_cipher("chacha", True, True)
    with pytest.raises(A.UnsupportedCipher, match="PyNaCl >= 1.6"):
        pick_cipher("aegis128l", False, True)


def test_the_fast_path_is_used_when_the_cpu_has_aes(monkeypatch):
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " aes" not in flags:
        pytest.skip("no AES-NI: the cryptography fallback is used")
    monkeypatch.delenv("MESHDL_AEAD", raising=False)
    assert A.hardware_aes() and Aead(os.urandom(32)).releases_gil
    if A.has_aegis():
        assert A.default_cipher() == "aegis128l"
        assert Aead(os.urandom(16), "aegis128l").releases_gil
    monkeypatch.setenv("MESHDL_AEAD", "openssl")
    assert A.default_cipher() == "aes256gcm" and not Aead(os.urandom(32)).releases_gil


def _python_runs_during_one_call(a: Aead, data: bytes, tries: int = 20) -> list[int]:
    """Per try: how far another thread counted during one encrypt call. The switch
    interval is 1 s meanwhile, so the GIL changes hands only where a thread gives
    it up (the counter's ``sleep(0)``, or a call that releases it), never after a
    call that held it."""
    import sys
    out = bytearray(len(data) + a.cipher.tag_bytes)
    nonce, count, stop = _nonce(a.cipher.name), [0], threading.Event()

    def counter() -> None:
        while not stop.is_set():
            count[0] += 1
            if count[0] % 100 == 0:
                time.sleep(0)                     # let the main thread in
    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    th = threading.Thread(target=counter, daemon=True)
    th.start()
    seen = []
    try:
        for _ in range(tries):
            time.sleep(0.001)
            c0 = count[0]
            a.encrypt_into(nonce, data, b"aad", out)
            seen.append(count[0] - c0)
            if seen[-1] > 0:
                break
    finally:
        stop.set()
        th.join(5)
        sys.setswitchinterval(old)
    return seen


@pytest.mark.parametrize("cipher", CIPHERS)
def test_sealing_releases_the_gil(cipher, monkeypatch):
    """Another Python thread (paho's network loop) runs while a piece is sealed; the
    control (cryptography's AESGCM, which holds the GIL) lets it run not at all."""
    if not A.hardware_aes():
        pytest.skip("no AES-NI")
    data = os.urandom(8 << 20)
    seen = _python_runs_during_one_call(Aead(_key(cipher), cipher), data)
    assert max(seen) > 0, seen
    monkeypatch.setenv("MESHDL_AEAD", "openssl")
    assert _python_runs_during_one_call(Aead(os.urandom(32)), data, 5) == [0] * 5


# ------------------------------------------------------------------ sealed frames
def _ident(ident: str, mesh_key) -> tuple:
    sk, xk = ed25519.Ed25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    se = sign_entry(mesh_key, Entry("m", ident, "device", sk.public_key().public_bytes(*raw),
                                    xk.public_key().public_bytes(*raw)))
    return se, xk


@pytest.fixture(scope="module")
def mesh():
    mk = ed25519.Ed25519PrivateKey.generate()
    ids = {k: _ident(k, mk) for k in ("d1", "d2", "d3")}
    return mk.public_key(), ids


def _seal(mesh, cipher, data=b"piece bytes " * 9, job="j", piece="p"):
    pub, ids = mesh
    se, xk = ids["d1"]
    ring = F.KeyRing("m", "d1", xk, cipher=cipher)
    return F.seal(ring, se.raw, se.sig, ids["d2"][0].entry, job, piece, data,
                  F.Peek("piece", 3, 7, 1, 4))


def _open(mesh, payload, me="d2", job="j", piece="p", cipher=None):
    pub, ids = mesh
    ring = F.KeyRing("m", me, ids[me][1], cipher=cipher)
    return F.open_sealed(ring, F.EntryCache(pub, "m"), job, piece, payload)


@pytest.mark.parametrize("cipher, magic", [pytest.param("aegis128l", F.SEALED_AEGIS,
                                                         marks=needs_aegis),
                                            ("aes256gcm", F.SEALED)])
def test_sealed_frames_of_either_cipher_open_at_any_receiver(mesh, cipher, magic):
    data = os.urandom(70000)
    sealed = _seal(mesh, cipher, data)
    assert bytes(sealed[:4]) == magic and F.is_sealed(sealed) and data[:32] not in sealed
    assert F.peek(sealed) == F.Peek("piece", 3, 7, 1, 4)
    for own in ("aegis128l", "aes256gcm"):       # whatever the receiver itself seals with
        if own == "aegis128l" and not A.has_aegis():
            continue
        entry, pt = _open(mesh, bytes(sealed), cipher=own)
        assert entry.id == "d1" and pt == data
    with pytest.raises(SecurityError, match="does not open"):         # a bystander
        _open(mesh, sealed, me="d3")
    with pytest.raises(SecurityError, match="does not open"):         # another job
        _open(mesh, sealed, job="j2")
    with pytest.raises(SecurityError, match="does not open"):         # another piece
        _open(mesh, sealed, piece="q")


@needs_aegis
def test_every_flipped_bit_of_an_aegis_frame_is_rejected(mesh):
    """MDE2 authenticates its clear header too: no bit of the frame can change."""
    sealed = bytes(_seal(mesh, "aegis128l", b"x" * 40))
    for i in range(len(sealed)):
        for bit in (0, 3, 7):
            bad = sealed[:i] + bytes([sealed[i] ^ (1 << bit)]) + sealed[i + 1:]
            with pytest.raises(SecurityError):
                _open(mesh, bad)


def test_aes_frames_reject_flips_in_sender_nonce_ciphertext_and_tag(mesh):
    """MDE1 (round 3's format) authenticates all but the relay's clear peek fields."""
    sealed = bytes(_seal(mesh, "aes256gcm", b"x" * 40))
    at = 8 + int.from_bytes(sealed[4:8], "big")
    nonce_at = sealed.index(msgpack.unpackb(sealed[8:at])[2])
    for i in [*range(0, nonce_at + 12), *range(at, len(sealed))]:
        bad = sealed[:i] + bytes([sealed[i] ^ 0x10]) + sealed[i + 1:]
        with pytest.raises(SecurityError):
            _open(mesh, bad)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_truncated_frames_are_rejected(mesh, cipher):
    sealed = bytes(_seal(mesh, cipher))
    for n in range(len(sealed)):
        with pytest.raises(SecurityError):
            _open(mesh, sealed[:n])
    with pytest.raises(SecurityError):
        _open(mesh, sealed + b"\0")


@needs_aegis
def test_a_frame_relabelled_to_the_other_cipher_is_rejected(mesh):
    for cipher, other in (("aes256gcm", F.SEALED_AEGIS), ("aegis128l", F.SEALED)):
        sealed = bytes(_seal(mesh, cipher))
        with pytest.raises(SecurityError, match="nonce of the wrong size"):
            _open(mesh, other + sealed[4:])


@needs_aegis
def test_each_cipher_has_its_own_key_and_aes_keeps_round_3s(mesh):
    pub, ids = mesh
    (se1, xk1), (se2, _) = ids["d1"], ids["d2"]
    ring = F.KeyRing("m", "d1", xk1)
    k_aegis = ring.aead(se2.entry, "j", "aegis128l")._key
    k_aes = ring.aead(se2.entry, "j", "aes256gcm")._key
    shared = xk1.exchange(x25519.X25519PublicKey.from_public_bytes(se2.entry.seal_pub))
    old = HKDF(hashes.SHA256(), 32, None, b"meshdl-seal/1|m|d1|d2|j").derive(shared)
    assert k_aes == old and len(k_aegis) == 16 and k_aegis not in old
    assert F.seal_info("aegis128l", "m", "d2", "d1", "j") == \
        F.seal_info("aegis128l", "m", "d1", "d2", "j")            # both ends, one key


def test_the_setting_picks_what_a_node_seals_with(mesh, monkeypatch):
    pub, ids = mesh
    monkeypatch.setenv("MESHDL_AEAD", "aes256gcm")
    assert F.KeyRing("m", "d1", ids["d1"][1]).cipher == "aes256gcm"
    monkeypatch.setenv("MESHDL_AEAD", "openssl")                  # GIL-holding fallback
    sealed = _seal(mesh, None)
    assert bytes(sealed[:4]) == F.SEALED
    monkeypatch.delenv("MESHDL_AEAD")
    assert _open(mesh, sealed)[1] == b"piece bytes " * 9
    monkeypatch.setenv("MESHDL_AEAD", "rot13")
    with pytest.raises(ValueError, match="rot13"):
        F.KeyRing("m", "d1", ids["d1"][1])


@pytest.mark.parametrize("cipher, backend", [pytest.param("aegis128l", "auto", marks=needs_aegis),
                                             ("aes256gcm", "auto"), ("aes256gcm", "openssl")])
def test_a_nodes_unjoined_frame_seals_to_exactly_its_joined_bytes(mesh, cipher, backend,
                                                                  monkeypatch):
    """A node's piece (codec OutFrame: header + a view of the tensor) is joined straight
    into the sealed buffer; the receiver gets exactly the bytes a joined frame has, and
    the tensor is neither changed nor readable in the sealed frame."""
    import numpy as np
    from meshdl.wire.codec import encode_frames
    if backend == "openssl":
        monkeypatch.setenv("MESHDL_AEAD", "openssl")
    arr = np.random.default_rng(1).standard_normal((3, 70001)).astype(np.float32)
    before = arr.copy()
    outs = encode_frames("j", "p", arr, chunk_bytes=300000)
    assert len(outs) > 1 and all(hasattr(f, "head") for f in outs)
    for f in outs:
        sealed = _seal(mesh, cipher, f)
        assert bytes(f.data[:64]) not in sealed
        monkeypatch.delenv("MESHDL_AEAD", raising=False)
        entry, pt = _open(mesh, bytes(sealed))
        assert entry.id == "d1" and pt == bytes(f)
        if backend == "openssl":
            monkeypatch.setenv("MESHDL_AEAD", "openssl")
    assert np.array_equal(arr, before)


@pytest.mark.parametrize("cipher", CIPHERS)
def test_libsodium_ciphers_work_in_place(cipher):
    """What sealing an unjoined frame relies on: encrypting (and decrypting) at the
    input's own address gives what a separate output buffer gets."""
    a = Aead(_key(cipher), cipher)
    assert a.in_place
    tag = a.cipher.tag_bytes
    for n in (0, 1, 31, 32, 33, 4097, (1 << 20) + 5):
        data, nonce = os.urandom(n), _nonce(cipher)
        ref = bytearray(n + tag)
        a.encrypt_into(nonce, data, b"ad", ref)
        buf = bytearray(data) + bytearray(tag)
        view = memoryview(buf)
        a.encrypt_into(nonce, view[:n], b"ad", view)
        assert buf == ref
        a.decrypt_into(nonce, view, b"ad", view[:n])
        assert bytes(buf[:n]) == data
