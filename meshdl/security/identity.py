"""Identities: roster entries signed by the mesh key, and what a bundle holds.

A roster entry says who an identity is: ``{mesh, id, role, sign_pub, seal_pub,
profile, caps}`` (role ``device`` or ``client``; ``caps`` the enrolled ceiling of
FLOP/s and link bit/s). The mesh authority signs its msgpack bytes with the mesh
Ed25519 key; anyone holding the mesh's public key can check an entry without a
network round trip, so every signed frame carries its sender's entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack

from meshdl.errors import MeshdlError

ROLES = ("device", "client")


class SecurityError(MeshdlError):
    """A bundle, key, certificate or signature is missing, malformed or does not verify."""


@dataclass(frozen=True)
class Entry:
    """One enrolled identity (the signed part of the roster)."""

    mesh: str
    id: str
    role: str
    sign_pub: bytes           # Ed25519 public key (32 bytes)
    seal_pub: bytes           # X25519 public key (32 bytes)
    profile: str = ""
    caps: Mapping[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return msgpack.packb({"mesh": self.mesh, "id": self.id, "role": self.role,
                              "sign_pub": self.sign_pub, "seal_pub": self.seal_pub,
                              "profile": self.profile, "caps": dict(self.caps)},
                             use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Entry":
        try:
            d = msgpack.unpackb(data, raw=False, max_bin_len=64, max_str_len=256,
                                max_array_len=16, max_map_len=16, max_ext_len=0)
            e = cls(str(d["mesh"]), str(d["id"]), str(d["role"]), bytes(d["sign_pub"]),
                    bytes(d["seal_pub"]), str(d.get("profile", "")),
                    {str(k): float(v) for k, v in dict(d.get("caps") or {}).items()})
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise SecurityError(f"malformed roster entry: {exc}") from None
        if e.role not in ROLES or len(e.sign_pub) != 32 or len(e.seal_pub) != 32:
            raise SecurityError(f"roster entry of {e.id!r} has a bad role or key size")
        return e


@dataclass(frozen=True)
class SignedEntry:
    entry: Entry
    raw: bytes                # the exact signed bytes
    sig: bytes                # mesh-key signature over raw

    def pack(self) -> list[Any]:
        return [self.raw, self.sig]


def sign_entry(mesh_key: Any, entry: Entry) -> SignedEntry:
    raw = entry.to_bytes()
    return SignedEntry(entry, raw, mesh_key.sign(raw))


def verify_entry(mesh_pub: Any, raw: bytes, sig: bytes, mesh: str | None = None) -> Entry:
    """The entry in ``raw`` if the mesh key signed it (and it is of ``mesh``)."""
    from cryptography.exceptions import InvalidSignature
    try:
        mesh_pub.verify(bytes(sig), bytes(raw))
    except (InvalidSignature, TypeError, ValueError):
        raise SecurityError("roster entry is not signed by this mesh's key") from None
    e = Entry.from_bytes(bytes(raw))
    if mesh is not None and e.mesh != mesh:
        raise SecurityError(f"roster entry of {e.id!r} is for mesh {e.mesh!r}, not {mesh!r}")
    return e
