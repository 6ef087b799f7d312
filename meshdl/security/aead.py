"""The ciphers of sealed pieces, with the GIL released while they run.

Two AEADs, both standard and both through libsodium (PyNaCl's cffi binding: cffi
releases the GIL around every call, so paho's network thread keeps moving bytes
while a megabyte is sealed):

- **AEGIS-128L** (16-byte key, 16-byte nonce, 32-byte tag), the default where the
  CPU has AES instructions: 0.07 ms per MB here vs 0.17 for AES-256-GCM (0.11 for
  AEGIS-256). A 128-bit key is not the weak link: every sealing key is derived from an
  X25519 exchange, itself a ~128-bit-security primitive, so AEGIS-256's longer key
  would add cost, not strength.
- **AES-256-GCM** (32-byte key, 12-byte nonce, 16-byte tag), the fallback: libsodium
  without AEGIS, or a CPU without AES instructions (where AEGIS would run in
  software). libsodium's when the CPU has AES-NI; else ``cryptography``'s AESGCM
  (OpenSSL, which holds the GIL); ``MESHDL_AEAD=openssl`` picks that one always.

``Aead(key, cipher)`` offers ``encrypt_into(nonce, data, aad, out)`` (ciphertext +
tag written into ``out``) and ``decrypt_into(nonce, ct, aad, out)``. Which cipher a
node seals with is ``pick_cipher`` (pure) of ``MESHDL_AEAD`` and what this machine
has; every node opens both.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)


class InvalidTag(Exception):
    """The ciphertext does not open with this key, nonce and associated data."""


class UnsupportedCipher(ValueError):
    """This machine's libsodium lacks the cipher (PyNaCl >= 1.6 has AEGIS-128L)."""


@dataclass(frozen=True)
class Cipher:
    name: str
    key_bytes: int
    nonce_bytes: int
    tag_bytes: int


AEGIS128L = Cipher("aegis128l", 16, 16, 32)
AES256GCM = Cipher("aes256gcm", 32, 12, 16)
CIPHERS = {c.name: c for c in (AEGIS128L, AES256GCM)}
SETTINGS = ("auto", "aegis128l", "aes256gcm", "openssl")


def pick_cipher(setting: str | None, have_aegis: bool, hardware_aes: bool) -> str:
    """The cipher a node seals with, from ``MESHDL_AEAD`` (``setting``) and the machine.

    ``auto`` (or unset): AEGIS-128L when libsodium has it and the CPU has AES
    instructions, else AES-256-GCM. ``aes256gcm``/``openssl`` force AES-256-GCM
    (``openssl`` also picks cryptography's backend); ``aegis128l`` forces AEGIS.
    """
    s = (setting or "auto").strip().lower()
    if s not in SETTINGS:
        raise ValueError(f"MESHDL_AEAD={setting!r} is not one of {', '.join(SETTINGS)}")
    if s in ("aes256gcm", "openssl"):
        return AES256GCM.name
    if s == "aegis128l":
        if not have_aegis:
            raise UnsupportedCipher("MESHDL_AEAD=aegis128l, but this libsodium has no "
                                    "AEGIS-128L: install PyNaCl >= 1.6 or unset it")
        return AEGIS128L.name
    return AEGIS128L.name if have_aegis and hardware_aes else AES256GCM.name


def default_cipher() -> str:
    """``pick_cipher`` for this process (read when a node's key ring is made)."""
    return pick_cipher(os.environ.get("MESHDL_AEAD"), has_aegis(), hardware_aes())


@lru_cache(maxsize=1)
def _sodium() -> tuple[Any, Any] | None:
    try:
        from nacl._sodium import ffi, lib      # PyNaCl's cffi binding of libsodium
        if lib.sodium_init() < 0:
            return None
        return ffi, lib
    except (ImportError, AttributeError):
        return None


def has_aegis() -> bool:
    s = _sodium()
    return s is not None and hasattr(s[1], "crypto_aead_aegis128l_encrypt")


def hardware_aes() -> bool:
    """The CPU has AES instructions (libsodium's own test for its AES-256-GCM)."""
    s = _sodium()
    return s is not None and bool(s[1].crypto_aead_aes256gcm_is_available())


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
    heap before the cipher writes it again, a whole extra pass per sealed or opened
    piece. Callers size it exactly and discard it if the cipher fails."""
    if n < 0:
        raise ValueError("negative buffer size")
    return _bytearray_uninit()(None, n)


class Aead:
    """One key under one cipher (see the module doc)."""

    def __init__(self, key: bytes, cipher: str = AES256GCM.name) -> None:
        if cipher not in CIPHERS:
            raise ValueError(f"unknown cipher {cipher!r}")
        self.cipher = CIPHERS[cipher]
        if len(key) != self.cipher.key_bytes:
            raise ValueError(f"{cipher} needs a {self.cipher.key_bytes}-byte key")
        self._key = bytes(key)
        self._gcm: Any = None
        s = _sodium()
        if cipher == AEGIS128L.name:
            if not has_aegis():
                raise UnsupportedCipher("this node's libsodium has no AEGIS-128L (a peer "
                                        "sealed with it): install PyNaCl >= 1.6")
            self._ffi, lib = s
            self._enc, self._dec = lib.crypto_aead_aegis128l_encrypt, \
                lib.crypto_aead_aegis128l_decrypt
        elif os.environ.get("MESHDL_AEAD") != "openssl" and hardware_aes():
            self._ffi, lib = s
            self._enc, self._dec = lib.crypto_aead_aes256gcm_encrypt, \
                lib.crypto_aead_aes256gcm_decrypt
        else:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            self._gcm = AESGCM(self._key)

    @property
    def releases_gil(self) -> bool:
        return self._gcm is None

    @property
    def in_place(self) -> bool:
        """``encrypt_into``/``decrypt_into`` may take ``out`` at the input's own address
        (libsodium's ciphers read each block before writing it; OpenSSL's through
        cryptography are not promised to)."""
        return self._gcm is None

    def encrypt_into(self, nonce: bytes, data: Any, aad: bytes, out: Any) -> None:
        c = self.cipher
        if len(nonce) != c.nonce_bytes:          # libsodium reads exactly nonce_bytes
            raise ValueError(f"{c.name} needs a {c.nonce_bytes}-byte nonce")
        if self._gcm is not None:
            self._gcm.encrypt_into(nonce, data, aad, out)
            return
        ffi = self._ffi
        n = memoryview(data).nbytes
        if memoryview(out).nbytes < n + c.tag_bytes:
            raise ValueError("output buffer too small for the ciphertext and tag")
        rc = self._enc(ffi.from_buffer(out, require_writable=True), ffi.NULL,
                       ffi.from_buffer(data), n, aad, len(aad), ffi.NULL, nonce, self._key)
        if rc != 0:
            raise ValueError(f"{c.name} encryption failed")

    def decrypt_into(self, nonce: bytes, ct: Any, aad: bytes, out: Any) -> None:
        c = self.cipher
        n = memoryview(ct).nbytes
        if len(nonce) != c.nonce_bytes or n < c.tag_bytes:
            raise InvalidTag()
        if self._gcm is not None:
            from cryptography.exceptions import InvalidTag as CryptoInvalidTag
            try:
                self._gcm.decrypt_into(nonce, ct, aad, out)
            except CryptoInvalidTag:
                raise InvalidTag() from None
            return
        ffi = self._ffi
        if memoryview(out).nbytes < n - c.tag_bytes:
            raise InvalidTag()
        rc = self._dec(ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.NULL,
                       ffi.from_buffer(ct), n, aad, len(aad), nonce, self._key)
        if rc != 0:
            raise InvalidTag()
