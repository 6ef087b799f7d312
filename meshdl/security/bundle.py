"""Loading a device's or client's bundle file, and handing its TLS parts to paho.

``Bundle.load(path)`` checks the file (format, permissions, the entry's signature
by the mesh key, that the keys match the entry). ``tls_files()`` writes the
certificate, key and CA to a private 0700 temporary directory (paho and OpenSSL
take files) that is removed at exit.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshdl.security.authority import BUNDLE_FORMAT, write_private
from meshdl.security.identity import Entry, SecurityError, SignedEntry, verify_entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    path: Path
    mesh: str
    id: str
    role: str
    cert_pem: str
    key_pem: str
    ca_pem: str
    mesh_pub: Any              # Ed25519PublicKey
    sign_key: Any              # Ed25519PrivateKey
    seal_key: Any              # X25519PrivateKey
    entry: SignedEntry

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Bundle":
        from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
        p = Path(path)
        try:
            st = p.stat()
            d = json.loads(p.read_text())
        except OSError as exc:
            raise SecurityError(f"cannot read bundle {p}: {exc.strerror}; pass the file "
                                "`meshdl mesh add-device` wrote") from None
        except ValueError:
            raise SecurityError(f"{p} is not a meshdl bundle (not JSON)") from None
        if not isinstance(d, dict) or d.get("format") != BUNDLE_FORMAT:
            raise SecurityError(f"{p} is not a meshdl bundle ({BUNDLE_FORMAT})")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("bundle %s is readable by other users (mode %o); chmod 600 it: it "
                        "holds this device's private keys", p, stat.S_IMODE(st.st_mode))
        try:
            mesh_pub = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(d["mesh_pub"]))
            sign_key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(d["sign_key"]))
            seal_key = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(d["seal_key"]))
            raw, sig = bytes.fromhex(d["entry"]), bytes.fromhex(d["entry_sig"])
        except (KeyError, ValueError, TypeError) as exc:
            raise SecurityError(f"bundle {p} is damaged ({exc}); issue a new one") from None
        entry = verify_entry(mesh_pub, raw, sig)
        b = cls(p, entry.mesh, entry.id, entry.role, d["cert"], d["key"], d["ca"], mesh_pub,
                sign_key, seal_key, SignedEntry(entry, raw, sig))
        if pub_bytes(sign_key) != entry.sign_pub or pub_bytes(seal_key) != entry.seal_pub:
            raise SecurityError(f"bundle {p}: keys do not match its roster entry")
        return b

    def tls_files(self) -> dict[str, str]:
        """{"tls_ca", "tls_cert", "tls_key"} paths in a private temp dir (removed at exit)."""
        d = Path(tempfile.mkdtemp(prefix="meshdl-tls-"))
        os.chmod(d, 0o700)
        atexit.register(shutil.rmtree, d, True)
        return {"tls_ca": str(write_private(d / "ca.crt", self.ca_pem)),
                "tls_cert": str(write_private(d / "cert.pem", self.cert_pem)),
                "tls_key": str(write_private(d / "key.pem", self.key_pem))}

    @property
    def entry_info(self) -> Entry:
        return self.entry.entry


def pub_bytes(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser
    return key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
