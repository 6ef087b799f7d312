"""mosquitto password files, hashed here (never via ``mosquitto_passwd -b``, which
would put the password on a command line any local user can read in ``ps``).

mosquitto 2.0's format is ``user:$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``;
mosquitto reads the iteration count from each hash, so meshdl uses a real one
(mosquitto_passwd's default is 101). Files are 0600 from their first byte.
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Mapping

from meshdl.errors import TransportError

PBKDF2_ITERATIONS = 20_000     # ~10-20 ms per check on a small board; mosquitto's default: 101


def hash_password(password: str, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def make_password_file(path: str | os.PathLike, users: Mapping[str, str],
                       use_tool: bool = True) -> Path:
    """Write a mosquitto password file for ``users`` (name -> password)."""
    path = Path(path)
    if not users:
        raise TransportError("an auth broker needs at least one user; pass users={'name': "
                             "'password'}")
    for name in users:
        if not name or ":" in name:
            raise TransportError(f"user name {name!r} must be non-empty and contain no ':'")
    text = "".join(f"{n}:{hash_password(p)}\n" for n, p in users.items()).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text)
    finally:
        os.close(fd)
    return path
