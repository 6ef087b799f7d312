"""User name + password check for the amqtt fallback broker (imported only with amqtt).

The users map holds PBKDF2 hashes (``meshdl.transport.passwords.hash_password``), never
plain passwords; comparison is constant-time.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field

from amqtt.plugins.base import BaseAuthPlugin


def verify_password(password: str, stored: str) -> bool:
    """Check ``password`` against a ``$7$iterations$salt$digest`` PBKDF2-SHA512 hash."""
    try:
        _, kind, iterations, salt, digest = stored.split("$")
        if kind != "7":
            return False
        want = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt),
                                  int(iterations), len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


class PasswordAuth(BaseAuthPlugin):
    """Accepts a connection only with a known user name and its password."""

    @dataclass
    class Config:
        users: dict[str, str] = field(default_factory=dict)

    async def authenticate(self, *, session) -> bool:
        name = getattr(session, "username", None)
        password = getattr(session, "password", None)
        stored = self.config.users.get(name or "")
        if stored is None or password is None:
            return False
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        return verify_password(password, stored)
