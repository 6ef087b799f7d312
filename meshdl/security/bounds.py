"""Bounds on everything a peer can send: pure checks of decoded control messages.

``check_message(msg)`` is called by :func:`meshdl.wire.control.decode_control` on
every decoded message, so a birth with NaN FLOP/s, a leader record with term
2**64-1 or a telemetry map of a million neighbours never reaches the fold. Each
check raises :class:`BoundsError` (a WireError) naming the field and the limit.

Terms: absolute values stay below ``MAX_TERM`` (2**53: exact in a float, far from
msgpack's 64-bit edge) and, once a node knows a term, it only accepts terms up to
``known + MAX_TERM_STEP`` (:func:`term_step_ok`): one forged record can neither
overflow a counter nor push the mesh to a term nobody can exceed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from meshdl.errors import WireError

MAX_TERM = 1 << 53
MAX_TERM_STEP = 1024
MAX_SESSION = 1 << 53
MAX_FLOPS = 1e17              # 100 PFLOP/s: no edge device comes close
MAX_MEMORY_BYTES = 1 << 44    # 16 TiB
MAX_WATTS = 1e5
MAX_BPS = 1e12                # 1 Tbit/s
MAX_RTT_S = 3600.0
MAX_LOAD = 1e6
MAX_MAP_ENTRIES = 64          # caps, extra, options, power, timings
MAX_LINKS = 256               # neighbours in one telemetry
MAX_STR = 4096                # any free-text field (detail, error, version)
MAX_TS = 1e11                 # seconds since the epoch (year ~5100)
MAX_INPUT_ELEMENTS = 3 * 1024 * 1024   # N*C*H*W of a requested input (12 MB of float32)
MAX_PLAN_TASKS = 4096
MAX_VOTES = 256              # signed votes carried by a leader record
POWER_KEYS = ("compute_w", "tx_w", "rx_w", "idle_w")


class BoundsError(WireError):
    """A control field is non-finite, negative, too large, or a map is too big."""


def finite(where: str, v: Any, lo: float = 0.0, hi: float = math.inf, *,
           positive: bool = False) -> float:
    """``v`` as a float if it is a finite number in [lo, hi] (> 0 when ``positive``)."""
    if type(v) not in (int, float):
        raise BoundsError(f"{where} must be a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise BoundsError(f"{where} is {f!r}; it must be finite")
    if f < lo or f > hi or (positive and f <= 0):
        rel = "> 0 and " if positive else ""
        raise BoundsError(f"{where} is {f!r}; it must be {rel}within [{lo:g}, {hi:g}]")
    return f


def small_map(where: str, d: Any, limit: int = MAX_MAP_ENTRIES) -> Mapping:
    if not isinstance(d, Mapping):
        raise BoundsError(f"{where} must be a map")
    if len(d) > limit:
        raise BoundsError(f"{where} has {len(d)} entries; at most {limit} are allowed")
    return d


def short(where: str, s: Any, limit: int = MAX_STR) -> str:
    if isinstance(s, str) and len(s) > limit:
        raise BoundsError(f"{where} is {len(s)} characters; at most {limit} are allowed")
    return s


def term(where: str, t: Any) -> int:
    if type(t) is not int or not 0 <= t < MAX_TERM:
        raise BoundsError(f"{where} {sanitise(t)} is outside [0, 2**53)")
    return t


def term_step_ok(known: int, seen: int) -> bool:
    """True when a term ``seen`` may be adopted by a node that knows ``known``: below
    MAX_TERM and, once any term is known (> 0), at most MAX_TERM_STEP ahead."""
    if type(seen) is not int or not 0 <= seen < MAX_TERM:
        return False
    return known <= 0 or seen <= known + MAX_TERM_STEP


def check_power(where: str, p: Any) -> None:
    small_map(where, p, 8)
    for k, v in p.items():
        if k not in POWER_KEYS:
            raise BoundsError(f"{where} has unknown key {sanitise(k)}; use {', '.join(POWER_KEYS)}")
        finite(f"{where}.{k}", v, 0.0, MAX_WATTS)


def check_caps(where: str, caps: Any) -> None:
    small_map(where, caps)
    if caps.get("flops") is not None:
        finite(f"{where}.flops", caps["flops"], 0.0, MAX_FLOPS, positive=True)
    if caps.get("memory_bytes") is not None:
        finite(f"{where}.memory_bytes", caps["memory_bytes"], 0.0, MAX_MEMORY_BYTES,
               positive=True)
    if caps.get("power") is not None:
        check_power(f"{where}.power", caps["power"])


def check_links(where: str, links: Any) -> None:
    small_map(where, links, MAX_LINKS)
    for nb, fig in links.items():
        if not isinstance(nb, str) or not 0 < len(nb) <= 64:
            raise BoundsError(f"{where} has a neighbour key {sanitise(nb)} that is not an id")
        small_map(f"{where}[{sanitise(nb)}]", fig, 8)
        for k, v in fig.items():
            if v is None:
                continue
            if k == "rtt_s":
                finite(f"{where}[{sanitise(nb)}].rtt_s", v, 0.0, MAX_RTT_S)
            elif k in ("bps", "throughput_bps"):
                finite(f"{where}[{sanitise(nb)}].{k}", v, 0.0, MAX_BPS)
            elif type(v) in (int, float):
                finite(f"{where}[{sanitise(nb)}].{sanitise(k)}", v, -math.inf)


def input_elements(shape: Any) -> int:
    """Product of a requested input shape, checked against MAX_INPUT_ELEMENTS."""
    if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 8
            or not all(type(d) is int and d > 0 for d in shape)):
        raise BoundsError(f"input_shape {sanitise(shape)} must be positive ints")
    n = 1
    for d in shape:
        n *= d
        if n > MAX_INPUT_ELEMENTS:
            raise BoundsError(f"input_shape {sanitise(shape)} has more than "
                              f"{MAX_INPUT_ELEMENTS} elements; request a smaller input")
    return n


def check_plan_dict(where: str, plan: Any) -> None:
    small_map(where, plan, 64)
    stages = plan.get("stages")
    if stages is not None:
        if not isinstance(stages, (list, tuple)) or len(stages) > MAX_PLAN_TASKS:
            raise BoundsError(f"{where}.stages must be a list of at most {MAX_PLAN_TASKS}")
        n = sum(len(s.get("tasks") or ()) if isinstance(s, Mapping) else 0 for s in stages)
        if n > MAX_PLAN_TASKS:
            raise BoundsError(f"{where} has {n} tasks; at most {MAX_PLAN_TASKS} are allowed")
    shape = plan.get("input_shape")
    if shape is not None:
        input_elements(shape)


def check_message(msg: Any) -> Any:
    """Raise BoundsError if any field of a decoded control message is out of bounds;
    return ``msg`` unchanged otherwise."""
    t = getattr(msg, "TYPE", "")
    ts = getattr(msg, "ts", None)
    if ts is not None:
        finite(f"{t}.ts", ts, 0.0, MAX_TS)
    if t == "state":
        if msg.session >= MAX_SESSION:
            raise BoundsError(f"state.session {msg.session} is not below 2**53")
        finite("state.flops", msg.flops, 0.0, MAX_FLOPS)
        finite("state.memory_bytes", msg.memory_bytes, 0.0, MAX_MEMORY_BYTES)
        check_power("state.power", msg.power)
        check_caps("state.caps", msg.caps)
        short("state.profile", msg.profile, 256)
        short("state.version", msg.version, 256)
    elif t == "telemetry":
        finite("telemetry.load", msg.load, 0.0, MAX_LOAD)
        check_links("telemetry.links", msg.links)
        small_map("telemetry.extra", msg.extra)
        sess = msg.extra.get("session")
        if sess is not None and (type(sess) is not int or not 0 <= sess < MAX_SESSION):
            raise BoundsError("telemetry.extra.session must be an int below 2**53")
        for k, v in msg.extra.items():
            if isinstance(v, (list, tuple, Mapping)) and len(v) > MAX_PLAN_TASKS:
                raise BoundsError(f"telemetry.extra.{sanitise(k)} is too long")
            short(f"telemetry.extra.{sanitise(k)}", v, 256)
    elif t == "election":
        term("election.term", msg.term)
        finite("election.priority", msg.priority, 0.0, MAX_FLOPS)
        if msg.kind not in ("campaign", "vote", "heartbeat"):
            raise BoundsError(f"election.kind {sanitise(msg.kind)} is not campaign/vote/heartbeat")
        short("election.vote_for", msg.vote_for, 64)
        for name in ("session", "seq"):
            v = getattr(msg, name)
            if type(v) is not int or not 0 <= v < MAX_SESSION:
                raise BoundsError(f"election.{name} must be an int in [0, 2**53)")
    elif t == "leader":
        term("leader.term", msg.term)
        if len(msg.votes) > MAX_VOTES:
            raise BoundsError(f"leader.votes has {len(msg.votes)} entries; at most "
                              f"{MAX_VOTES} are allowed")
        for k, v in msg.votes.items():
            short("leader.votes key", k, 64)
            if not isinstance(v, (bytes, str)) or len(v) > 4096:
                raise BoundsError("leader.votes values must be signed frames of <= 4096 bytes")
    elif t == "plan":
        term("plan.term", msg.term)
        check_plan_dict("plan.plan", msg.plan)
    elif t == "job_request":
        short("job_request.model", msg.model, 256)
        short("job_request.strategy", msg.strategy, 64)
        finite("job_request.deadline_s", msg.deadline_s, 0.0, 86400.0)
        small_map("job_request.options", msg.options)
        if msg.options.get("input_shape") is not None:
            input_elements(msg.options["input_shape"])
    elif t == "job_status":
        term("job_status.term", msg.term)
        short("job_status.state", msg.state, 64)
        short("job_status.detail", msg.detail)
    elif t == "job_result":
        short("job_result.error", msg.error)
        small_map("job_result.timings", msg.timings)
        small_map("job_result.result", msg.result)
    return msg


_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@/~+#")


def sanitise(value: Any, limit: int = 48) -> str:
    """A peer-supplied name fit for one log line: printable ASCII only (others as
    \\xNN escapes), at most ``limit`` characters, quoted when it is not a plain id."""
    s = value if isinstance(value, str) else repr(value)
    cut = len(s) > limit
    s = s[:limit]
    if all(c in _SAFE for c in s) and s and not cut:
        return s
    out = "".join(c if (c in _SAFE or c == " ") else f"\\x{ord(c) & 0xff:02x}"
                  if ord(c) < 256 else f"\\u{ord(c):04x}" for c in s)
    return f"'{out}{'...' if cut else ''}'"
