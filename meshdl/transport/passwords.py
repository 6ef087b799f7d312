"""mosquitto password files: via ``mosquitto_passwd`` when installed, else hashed here.

mosquitto 2.0's format is ``user:$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping

from meshdl.errors import TransportError

PBKDF2_ITERATIONS = 101


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
    tool = shutil.which("mosquitto_passwd") if use_tool else None
    if tool:
        path.write_text("")
        for name, password in users.items():
            try:
                subprocess.run([tool, "-b", str(path), name, password], check=True,
                               capture_output=True, timeout=10)
            except (subprocess.SubprocessError, OSError) as exc:
                raise TransportError(f"mosquitto_passwd failed for {name!r}: {exc}") from exc
    else:
        path.write_text("".join(f"{n}:{hash_password(p)}\n" for n, p in users.items()))
    os.chmod(path, 0o644)
    return path
