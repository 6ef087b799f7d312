"""Broker URLs: ``mqtt://[user[:pass]@]host[:port]`` and ``mqtts://`` (TLS)."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from meshdl.errors import TransportError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerURL:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def redacted(self) -> str:
        """The URL without the password, fit for messages and logs."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_url(url: str) -> BrokerURL:
    if not isinstance(url, str) or not url:
        raise TransportError("broker URL is empty; pass e.g. mqtt://127.0.0.1:1883")
    if "://" not in url:
        url = "mqtt://" + url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TransportError(f"bad broker URL {url!r}: {exc}; use "
                             "mqtt://[user:pass@]host:port") from exc
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise TransportError(f"broker URL scheme {scheme!r} not supported; use mqtt:// or "
                             "mqtts://")
    if not parts.hostname:
        raise TransportError(f"broker URL {url!r} has no host; use mqtt://host:port")
    if parts.path not in ("", "/"):
        raise TransportError(f"broker URL {url!r} has a path; use mqtt://host:port")
    return BrokerURL(scheme, parts.hostname, port or DEFAULT_PORTS[scheme],
                     unquote(parts.username) if parts.username is not None else None,
                     unquote(parts.password) if parts.password is not None else None)
