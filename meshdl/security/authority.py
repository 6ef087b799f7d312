"""The mesh authority: a CA for TLS and an Ed25519 mesh signing key in a 0700 dir.

``init_authority(name, dir)`` creates it; ``issue(dir, id, role, profile)`` makes a
device's or client's bundle (one JSON file, 0600): its client certificate and key
(CN = its id, which mosquitto takes as the username), the CA, the mesh public key,
its own Ed25519 signing key and X25519 sealing key, and its roster entry signed by
the mesh key. ``server_cert`` issues the broker's certificate. The roster of
issued ids (``roster.json``) drives the broker's ACL.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from meshdl.security.identity import ROLES, Entry, SecurityError, sign_entry
from meshdl.wire.topics import validate_id

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "meshdl-bundle/1"
CERT_DAYS = 3650
LINK_CAP_BPS = 1e9


def config_root() -> Path:
    """$XDG_CONFIG_HOME/meshdl (default ~/.config/meshdl)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meshdl"


def default_dir(name: str) -> Path:
    return config_root() / "meshes" / validate_id(name, "mesh name")


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) and force it to 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes | str) -> Path:
    """Write a file that only its owner can read (0600 from the first byte)."""
    data = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser
    return cert.public_bytes(ser.Encoding.PEM)


def _raw_pub(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser
    return key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def _raw_priv(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser
    return key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())


class Authority:
    """A loaded mesh authority directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization as ser
        self.dir = Path(directory)
        meta = self.dir / "mesh.json"
        if not meta.is_file():
            raise SecurityError(f"{self.dir} is not a mesh authority (no mesh.json); create "
                                "one with `meshdl mesh init NAME`")
        self.name = json.loads(meta.read_text())["name"]
        self.ca_cert = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())
        self.ca_key = ser.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        self.mesh_key = ser.load_pem_private_key((self.dir / "mesh.key").read_bytes(), None)

    @property
    def mesh_pub(self) -> bytes:
        return _raw_pub(self.mesh_key)

    def roster(self) -> dict[str, dict]:
        p = self.dir / "roster.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def _save_roster(self, roster: dict[str, dict]) -> None:
        write_private(self.dir / "roster.json", json.dumps(roster, indent=1, sort_keys=True))

    def _cert(self, cn: str, pub: Any, *, server_names: tuple[str, ...] = (),
              days: int = CERT_DAYS) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID
        b = (x509.CertificateBuilder().subject_name(_name(cn))
             .issuer_name(self.ca_cert.subject).public_key(pub)
             .serial_number(x509.random_serial_number())
             .not_valid_before(_now() - datetime.timedelta(minutes=5))
             .not_valid_after(_now() + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server_names:
            alt: list[Any] = []
            for n in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                critical=False)
        return b.sign(self.ca_key, hashes.SHA256())

    def issue(self, ident: str, role: str = "device", profile: str | None = None) -> dict:
        """A new bundle (a JSON-able dict) for ``ident``; records it in the roster."""
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
        validate_id(ident, f"{role} id")
        if role not in ROLES:
            raise SecurityError(f"role must be one of {ROLES}, not {role!r}")
        roster = self.roster()
        if ident in roster:
            raise SecurityError(f"{ident!r} is already enrolled in mesh {self.name} as a "
                                f"{roster[ident]['role']}; pick another id")
        caps: dict[str, float] = {}
        prof_name = ""
        if role == "device":
            from meshdl.mesh.profiles import load_profile
            prof = load_profile(profile or "generic")
            prof_name = prof.name
            caps = {"flops": float(prof.flops), "memory_bytes": float(prof.memory_bytes)}
            # links: the profile's figure is a typical one, not a ceiling; edge NICs top
            # out around 1 Gbit/s, so that (or a faster profile figure) is the cap
            caps["bps"] = max(LINK_CAP_BPS, float(prof.net.get("bandwidth_mbps") or 0) * 1e6)
        tls_key = ec.generate_private_key(ec.SECP256R1())
        cert = self._cert(ident, tls_key.public_key())
        sign_key = ed25519.Ed25519PrivateKey.generate()
        seal_key = x25519.X25519PrivateKey.generate()
        entry = Entry(self.name, ident, role, _raw_pub(sign_key), _raw_pub(seal_key),
                      prof_name, caps)
        se = sign_entry(self.mesh_key, entry)
        roster[ident] = {"role": role, "profile": prof_name, "issued": _now().isoformat(),
                         "serial": str(cert.serial_number)}
        self._save_roster(roster)
        return {"format": BUNDLE_FORMAT, "mesh": self.name, "id": ident, "role": role,
                "profile": prof_name, "caps": caps,
                "cert": _pem_cert(cert).decode(), "key": _pem_key(tls_key).decode(),
                "ca": _pem_cert(self.ca_cert).decode(), "mesh_pub": self.mesh_pub.hex(),
                "sign_key": _raw_priv(sign_key).hex(), "seal_key": _raw_priv(seal_key).hex(),
                "entry": se.raw.hex(), "entry_sig": se.sig.hex()}

    def revoke(self, ident: str) -> dict:
        """Revoke ``ident`` (a stolen or retired device or client): its certificate goes
        on the CRL and it leaves the ACL; the id stays taken."""
        roster = self.roster()
        if ident not in roster:
            raise SecurityError(f"{ident!r} is not enrolled in mesh {self.name}")
        if roster[ident].get("revoked"):
            raise SecurityError(f"{ident!r} is already revoked")
        roster[ident]["revoked"] = _now().isoformat()
        self._save_roster(roster)
        return roster[ident]

    def active_roster(self) -> dict[str, dict]:
        return {k: v for k, v in self.roster().items() if not v.get("revoked")}

    def crl_pem(self) -> bytes:
        """The CA's certificate revocation list (every revoked identity)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization as ser
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.ca_cert.subject)
             .last_update(_now() - datetime.timedelta(minutes=5))
             .next_update(_now() + datetime.timedelta(days=CERT_DAYS)))
        for v in self.roster().values():
            if v.get("revoked") and v.get("serial"):
                b = b.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(v["serial"]))
                    .revocation_date(datetime.datetime.fromisoformat(v["revoked"])).build())
        return b.sign(self.ca_key, hashes.SHA256()).public_bytes(ser.Encoding.PEM)

    def server_cert(self, names: tuple[str, ...]) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a broker reachable as ``names``."""
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._cert(names[0], key.public_key(), server_names=names, days=825)
        return _pem_cert(cert), _pem_key(key)


def init_authority(name: str, directory: str | os.PathLike | None = None) -> Authority:
    """Create a mesh authority (CA + mesh signing key) in a new 0700 directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    validate_id(name, "mesh name")
    d = Path(directory) if directory else default_dir(name)
    if (d / "mesh.json").exists():
        raise SecurityError(f"{d} already holds mesh authority "
                            f"{json.loads((d / 'mesh.json').read_text())['name']!r}; "
                            "use another --dir or remove it")
    private_dir(d)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(f"meshdl {name} CA")
    ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(_now() - datetime.timedelta(minutes=5))
          .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    write_private(d / "ca.key", _pem_key(ca_key))
    write_private(d / "ca.crt", _pem_cert(ca))
    write_private(d / "mesh.key", _pem_key(ed25519.Ed25519PrivateKey.generate()))
    write_private(d / "mesh.json", json.dumps({"name": name, "created": _now().isoformat(),
                                               "host": socket.gethostname()}))
    log.info("mesh authority %s created in %s", name, d)
    return Authority(d)


def find_authority(directory: str | os.PathLike | None, name: str | None = None) -> Authority:
    """The authority in ``directory``, else the named one, else the only one under the
    user config dir."""
    if directory:
        return Authority(directory)
    if name:
        return Authority(default_dir(name))
    root = config_root() / "meshes"
    found = sorted(p for p in root.glob("*") if (p / "mesh.json").is_file()) \
        if root.is_dir() else []
    if len(found) == 1:
        return Authority(found[0])
    if not found:
        raise SecurityError(f"no mesh authority under {root}; create one with "
                            "`meshdl mesh init NAME` or pass --dir")
    raise SecurityError(f"several mesh authorities under {root} "
                        f"({', '.join(p.name for p in found)}); pass --dir or --mesh")


def write_bundle(bundle: dict, path: str | os.PathLike) -> Path:
    return write_private(Path(path), json.dumps(bundle, indent=1))
