"""The sealing cipher: libsodium's AES-256-GCM (GIL released) and cryptography's
AESGCM are the same cipher, so either side opens what the other sealed; a flipped
bit, a wrong key or other associated data does not open."""
from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshdl.security.aead import Aead, InvalidTag, _sodium, out_buffer


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 3])
def test_interoperates_with_cryptography_both_ways(size):
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


def test_tampering_does_not_open():
    key, nonce, aad = os.urandom(32), os.urandom(12), b"aad"
    a = Aead(key)
    out = bytearray(1000 + 16)
    a.encrypt_into(nonce, os.urandom(1000), aad, out)
    for ct, k, ad in ((bytes([out[0] ^ 1]) + bytes(out[1:]), key, aad),
                      (bytes(out), os.urandom(32), aad), (bytes(out), key, b"other"),
                      (bytes(out[:10]), key, aad)):
        with pytest.raises(InvalidTag):
            Aead(k).decrypt_into(nonce, ct, ad, bytearray(max(0, len(ct) - 16)))


def test_the_fast_path_is_used_when_the_cpu_has_aes():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " aes" not in flags:
        pytest.skip("no AES-NI: the cryptography fallback is used")
    assert _sodium() is not None and Aead(os.urandom(32)).releases_gil


def test_unzeroed_buffers_round_trip_every_size():
    """Sealing and opening write into unzeroed buffers: every byte must come from the
    cipher (a stale heap byte would corrupt the piece or fail the tag)."""
    a = Aead(os.urandom(32))
    for size in (0, 1, 15, 16, 4095, 1 << 20):
        data = os.urandom(size)
        nonce = os.urandom(12)
        ct = out_buffer(size + 16)
        assert isinstance(ct, bytearray) and len(ct) == size + 16
        a.encrypt_into(nonce, data, b"aad", ct)
        assert bytes(ct) == AESGCM(a._key).encrypt(nonce, data, b"aad")
        pt = out_buffer(size)
        a.decrypt_into(nonce, ct, b"aad", pt)
        assert bytes(pt) == data
    with pytest.raises(ValueError):
        out_buffer(-1)
