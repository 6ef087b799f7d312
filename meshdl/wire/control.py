"""Control-plane messages: msgpack maps ``{"v": 1, "type": ..., fields...}``.

Each message is a frozen dataclass; :func:`encode_control` packs it and
:func:`decode_control` checks version, type and every field's type before
building it. Unknown keys are ignored (a newer minor sender); missing required
keys, wrong types or oversize values raise :class:`WireError`; out-of-bounds
numbers (NaN, inf, term >= 2**53, huge maps) raise its subclass BoundsError
(``meshdl.security.bounds.check_message``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from meshdl.errors import WireError
from meshdl.security.bounds import check_message
from meshdl.wire.topics import MAX_ID_LEN

VERSION = 1
MAX_CONTROL_BYTES = 8 << 20


@dataclass(frozen=True)
class NodeState:
    """Birth (online) or will/offline state of a node; retained on node/{id}/state."""

    TYPE: ClassVar[str] = "state"
    node: str
    online: bool
    session: int
    profile: str = ""
    flops: float = 0.0
    memory_bytes: int = 0
    power: dict = field(default_factory=dict)
    version: str = ""
    ts: float = 0.0
    caps: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Telemetry:
    """Periodic load and per-neighbour link quality ({nbr: {"rtt_s", "bps"}})."""

    TYPE: ClassVar[str] = "telemetry"
    node: str
    ts: float
    load: float = 0.0
    links: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Campaign:
    """Election traffic: kind is "campaign", "vote" or "heartbeat". ``session`` (the
    sender's, as in its birth) and ``seq`` (counting its election messages in that
    session from 1; 0: not counted) let a receiver refuse one heard before: on a secure
    mesh a replayed heartbeat would keep a stalled node looking alive."""

    TYPE: ClassVar[str] = "election"
    node: str
    term: int
    kind: str = "campaign"
    priority: float = 0.0
    vote_for: str = ""
    ts: float = 0.0
    session: int = 0
    seq: int = 0


@dataclass(frozen=True)
class LeaderInfo:
    """Retained on leader: who leads, for which term."""

    TYPE: ClassVar[str] = "leader"
    node: str
    term: int
    ts: float = 0.0
    votes: dict = field(default_factory=dict)   # secure mesh: voter -> signed vote frame


@dataclass(frozen=True)
class PlanMessage:
    """Retained on plan/{plan_id}: ``plan`` is ``Plan.to_dict()``; ``term`` fences."""

    TYPE: ClassVar[str] = "plan"
    plan_id: str
    term: int
    plan: dict
    ts: float = 0.0


@dataclass(frozen=True)
class JobRequest:
    TYPE: ClassVar[str] = "job_request"
    job: str
    client: str
    model: str = ""
    strategy: str = ""
    deadline_s: float = 0.0
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobStatus:
    TYPE: ClassVar[str] = "job_status"
    job: str
    state: str
    detail: str = ""
    term: int = 0
    ts: float = 0.0


@dataclass(frozen=True)
class JobResult:
    TYPE: ClassVar[str] = "job_result"
    job: str
    ok: bool
    error: str = ""
    result: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


CONTROL_TYPES: tuple[type, ...] = (NodeState, Telemetry, Campaign, LeaderInfo, PlanMessage,
                                   JobRequest, JobStatus, JobResult)
_ID_FIELDS = frozenset({"node", "job", "client", "plan_id"})


def control_class(type_name: str) -> type:
    for cls in CONTROL_TYPES:
        if cls.TYPE == type_name:
            return cls
    raise WireError(f"unknown control message type {type_name!r}")


def _check(name: str, kind: str, value: Any, cls: type) -> Any:
    where = f"{cls.TYPE}.{name}"
    if kind == "str":
        if not isinstance(value, str):
            raise WireError(f"{where} must be a string, got {type(value).__name__}")
        if name in _ID_FIELDS and not (0 < len(value) <= MAX_ID_LEN and value.isprintable()):
            raise WireError(f"{where} must be 1..{MAX_ID_LEN} printable characters")
        return value
    if kind == "bool":
        if type(value) is not bool:
            raise WireError(f"{where} must be a bool")
        return value
    if kind == "int":
        if type(value) is not int or value < 0:
            raise WireError(f"{where} must be a non-negative integer, got {value!r}")
        return value
    if kind == "float":
        if type(value) not in (int, float):
            raise WireError(f"{where} must be a number, got {type(value).__name__}")
        return float(value)
    if kind == "dict":
        if not isinstance(value, dict):
            raise WireError(f"{where} must be a map")
        return value
    raise WireError(f"{where}: unsupported field kind {kind}")  # programming error


def encode_control(msg: Any) -> bytes:
    """Pack a control dataclass; validates it the same way the receiver will."""
    cls = type(msg)
    if cls not in CONTROL_TYPES:
        raise WireError(f"{cls.__name__} is not a control message")
    body = {"v": VERSION, "type": cls.TYPE}
    for f in dataclasses.fields(cls):
        body[f.name] = _check(f.name, str(f.type), getattr(msg, f.name), cls)
    try:
        out = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"{cls.TYPE} message is not plain msgpack data: {exc}") from exc
    if len(out) > MAX_CONTROL_BYTES:
        raise WireError(f"{cls.TYPE} message is {len(out)} bytes (max {MAX_CONTROL_BYTES})")
    return out


def decode_control(payload: Any, expected_type: str | type | tuple | None = None) -> Any:
    """Decode and validate a control message; raise WireError for anything off-contract.

    ``expected_type`` is a TYPE string, a dataclass, or a tuple of them; None accepts any.
    """
    try:
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if size > MAX_CONTROL_BYTES:
            raise WireError(f"control message of {size} bytes exceeds {MAX_CONTROL_BYTES}")
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False, max_ext_len=0,
                               max_str_len=size, max_bin_len=size, max_array_len=size,
                               max_map_len=size)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise WireError(f"undecodable control message: {exc}") from None
    if not isinstance(body, dict):
        raise WireError("control message is not a map")
    if body.get("v") != VERSION:
        raise WireError(f"control message version {body.get('v')!r}; this node speaks "
                        f"v{VERSION}: upgrade the older side")
    type_name = body.get("type")
    if not isinstance(type_name, str):
        raise WireError("control message has no type")
    cls = control_class(type_name)
    if expected_type is not None:
        wanted = expected_type if isinstance(expected_type, tuple) else (expected_type,)
        names = {w if isinstance(w, str) else w.TYPE for w in wanted}
        if type_name not in names:
            raise WireError(f"expected a {'/'.join(sorted(names))} message, got {type_name!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in body:
            kwargs[f.name] = _check(f.name, str(f.type), body[f.name], cls)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise WireError(f"{type_name} message lacks required field {f.name!r}")
    return check_message(cls(**kwargs))
