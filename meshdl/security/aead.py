"""AES-256-GCM for sealed pieces, with the GIL released while it runs.

``Aead(key)`` offers ``encrypt_into(nonce, data, aad, out)`` (ciphertext + 16-byte
tag written into ``out``) and ``decrypt_into(nonce, ct, aad, out)``. It calls
libsodium's ``crypto_aead_aes256gcm`` (through PyNaCl's cffi binding, which releases
the GIL for the call, so paho's network thread keeps moving bytes while a megabyte
is sealed) when the CPU has AES-NI; otherwise ``cryptography``'s AESGCM (which
holds the GIL; ``MESHDL_AEAD=openssl`` picks it always: OpenSSL's AES is ~2.5x faster
per byte here, which can win on an idle machine). Both are standard AES-256-GCM
(12-byte nonce, tag appended): a frame sealed by one opens with the other.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)


class InvalidTag(Exception):
    """The ciphertext does not open with this key, nonce and associated data."""


@lru_cache(maxsize=1)
def _sodium() -> tuple[Any, Any] | None:
    try:
        from nacl._sodium import ffi, lib      # PyNaCl's cffi binding of libsodium
        if lib.sodium_init() < 0 or not lib.crypto_aead_aes256gcm_is_available():
            return None
        return ffi, lib
    except (ImportError, AttributeError):
        return None


@lru_cache(maxsize=1)
def _bytearray_uninit() -> Any:
    import ctypes
    f = ctypes.pythonapi.PyByteArray_FromStringAndSize     # holds the GIL (PyDLL)
    f.restype = ctypes.py_object
    f.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    return f


def out_buffer(n: int) -> bytearray:
    """A ``bytearray`` of ``n`` bytes that is not zeroed first, for a buffer the cipher
    (and the caller) overwrite entirely: ``bytearray(n)`` clears a reused megabyte of
    heap before AES-GCM writes it again, a whole extra pass per sealed or opened
    piece. Callers size it exactly and discard it if the cipher fails."""
    if n < 0:
        raise ValueError("negative buffer size")
    return _bytearray_uninit()(None, n)


class Aead:
    """AES-256-GCM with one key (see the module doc)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._key = bytes(key)
        self._sodium = None if os.environ.get("MESHDL_AEAD") == "openssl" else _sodium()
        if self._sodium is None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            self._gcm = AESGCM(self._key)

    @property
    def releases_gil(self) -> bool:
        return self._sodium is not None

    def encrypt_into(self, nonce: bytes, data: Any, aad: bytes, out: Any) -> None:
        if self._sodium is None:
            self._gcm.encrypt_into(nonce, data, aad, out)
            return
        ffi, lib = self._sodium
        n = memoryview(data).nbytes
        if memoryview(out).nbytes < n + 16:
            raise ValueError("output buffer too small for the ciphertext and tag")
        rc = lib.crypto_aead_aes256gcm_encrypt(
            ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.from_buffer(data), n,
            aad, len(aad), ffi.NULL, nonce, self._key)
        if rc != 0:
            raise ValueError("AES-256-GCM encryption failed")

    def decrypt_into(self, nonce: bytes, ct: Any, aad: bytes, out: Any) -> None:
        if self._sodium is None:
            from cryptography.exceptions import InvalidTag as CryptoInvalidTag
            try:
                self._gcm.decrypt_into(nonce, ct, aad, out)
            except CryptoInvalidTag:
                raise InvalidTag() from None
            return
        ffi, lib = self._sodium
        n = memoryview(ct).nbytes
        if n < 16 or memoryview(out).nbytes < n - 16:
            raise InvalidTag()
        rc = lib.crypto_aead_aes256gcm_decrypt(
            ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.NULL,
            ffi.from_buffer(ct), n, aad, len(aad), nonce, self._key)
        if rc != 0:
            raise InvalidTag()
