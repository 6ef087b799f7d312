"""Node-to-node probe messages on ``meshdl/v1/{mesh}/node/{id}/probe``.

One small topic per node carries four kinds of message (msgpack maps, bounded and
validated like every control message):

- ``claim``: a starting process announces it wants to be node ``id`` (with its
  session); ``here``: the live owner of ``id`` answers a claim. Together they
  detect duplicate node ids before a birth is published (see ``membership``).
- ``ping`` / ``pong``: RTT and throughput probes between neighbours. A ping to
  node B is published on B's probe topic, B answers on the sender's.
- ``set_link``: debug/test control of an *emulated* node's link figures
  (``{"peer", "bandwidth_bps", "latency_s"}``); real nodes ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from meshdl.errors import WireError
from meshdl.wire.topics import validate_id

KINDS = ("claim", "here", "ping", "pong", "set_link")
MAX_PROBE_BYTES = 1 << 20
MAX_PAD = MAX_PROBE_BYTES - 4096


@dataclass(frozen=True)
class Probe:
    kind: str
    sender: str
    session: int = 0
    nonce: str = ""
    ts: float = 0.0
    pad: bytes = b""
    link: dict = field(default_factory=dict)


def encode_probe(p: Probe) -> bytes:
    if p.kind not in KINDS:
        raise WireError(f"probe kind {p.kind!r} is not one of {KINDS}")
    if len(p.pad) > MAX_PAD:
        raise WireError(f"probe padding of {len(p.pad)} bytes exceeds {MAX_PAD}")
    return msgpack.packb({"v": 1, "type": "probe", "kind": p.kind,
                          "from": validate_id(p.sender, "probe sender"), "session": p.session,
                          "nonce": p.nonce, "ts": p.ts, "pad": bytes(p.pad),
                          "link": dict(p.link)}, use_bin_type=True)


def decode_probe(payload: Any) -> Probe:
    """Decode and validate; raise WireError for anything off-contract."""
    size = len(payload)
    if size > MAX_PROBE_BYTES:
        raise WireError(f"probe of {size} bytes exceeds {MAX_PROBE_BYTES}")
    try:
        body = msgpack.unpackb(bytes(payload), raw=False, max_ext_len=0, max_str_len=size,
                               max_bin_len=size, max_array_len=64, max_map_len=64,
                               strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise WireError(f"undecodable probe: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != 1 or body.get("type") != "probe":
        raise WireError("not a v1 probe message")
    kind = body.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown probe kind {kind!r}")
    session, nonce, ts = body.get("session", 0), body.get("nonce", ""), body.get("ts", 0.0)
    pad, link = body.get("pad", b""), body.get("link", {})
    if type(session) is not int or session < 0 or not isinstance(nonce, str) \
            or len(nonce) > 64 or type(ts) not in (int, float) \
            or not isinstance(pad, bytes) or not isinstance(link, dict):
        raise WireError("probe fields have the wrong types")
    if kind == "set_link":
        peer, bw, lat = link.get("peer"), link.get("bandwidth_bps"), link.get("latency_s")
        validate_id(peer, "set_link peer")
        for v in (bw, lat):
            if v is not None and (type(v) not in (int, float) or v < 0):
                raise WireError("set_link figures must be non-negative numbers")
        if bw is not None and bw <= 0:
            raise WireError("set_link bandwidth_bps must be positive")
    return Probe(kind, validate_id(body.get("from"), "probe sender"), session, nonce,
                 float(ts), pad, link)
