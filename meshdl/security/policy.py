"""Who may say what: the admission rules a SecureBus applies to verified frames.

``admit(adm, topic, sender, body, now) -> Verdict`` decides for one verified
control message (its signature already checked): the sender's role and id must
fit the topic and the message's own ids, claimed figures are capped by the
sender's enrolled profile, plans must come from the leader of their term, and a
client takes a result only from the sink of the verified plan of its job.
``Admission`` remembers (bounded) the leaders, plans and job plans it has seen.

Leadership: a leader record carries the signed votes it won (``LeaderInfo.votes``:
voter -> signed frame); each is verified here (an enrolled device's vote for that
leader and term) and the record is rewritten to carry only the verified voters. A
record counts (``leader_of``, ``current_leader``) only while its voters, the leader
included, are a majority of the live devices this side knows (verified online
births), looked at when used, so a record that arrived before the births is judged
against them. A client drops a record without that majority; a node hands it to its
election machine, which judges it against its own live members.

Liveness here is signed: a device counts as live while its verified online birth or
its last verified election message (heartbeats every 0.5 s) is younger than
``SILENT_S``, so a device that went silent (frozen, or revoked: the broker's ACL then
refuses its heartbeats) stops counting against a majority even though its retained
birth still says "online".

Pieces (``piece_problem``): a sealed piece opened at its destination must come from
the device (or, for the input, the client) that the verified plan names as its
producer, and an ack from its consumer; a piece of a plan not verified here is
refused (its sender resends it). So a stolen device cannot slip a forged tensor into a
job it does not compute, nor answer a client in the sink's place.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from meshdl.errors import MeshdlError
from meshdl.security.bounds import sanitise
from meshdl.security.identity import Entry
from meshdl.wire.topics import ParsedTopic

log = logging.getLogger(__name__)
_KEEP = 512
SILENT_S = 6.0        # a device unheard this long (no birth, no heartbeat) is not live
AGAIN_S = 1.0         # an election message read again this soon: this process's 2nd reader


class PlanInfo(NamedTuple):
    """What a verified plan tells about who may send what for it."""
    sink: str
    devices: frozenset
    leader: str
    source: str = ""
    tasks: Mapping[str, str] = MappingProxyType({})    # task id -> device
    term: int = 0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    body: bytes | None = None          # a rewritten body (capped figures), if any
    hold_term: int | None = None       # a plan to hold until this term's leader is known
    vote_term: int | None = None       # a vote for this side in that term: keep its frame
    waits: bool = False                # a leader record short of its majority: look again


def _put(d: OrderedDict, k: Any, v: Any) -> None:
    d[k] = v
    d.move_to_end(k)
    while len(d) > _KEEP:
        d.popitem(last=False)


@dataclass
class Admission:
    me: str
    role: str
    claims: OrderedDict = field(default_factory=OrderedDict)       # term -> best (node, flops)
    plans: OrderedDict = field(default_factory=OrderedDict)        # plan id -> PlanInfo
    job_plan: OrderedDict = field(default_factory=OrderedDict)     # job -> plan id
    records: OrderedDict = field(default_factory=OrderedDict)      # (term, node) -> voters
    live: OrderedDict = field(default_factory=OrderedDict)         # born online -> when
    heard: OrderedDict = field(default_factory=OrderedDict)        # device -> last heard
    said: OrderedDict = field(default_factory=OrderedDict)   # device -> ((session, seq), when)
    my_votes: OrderedDict = field(default_factory=OrderedDict)     # term -> {voter: frame}
    lock: threading.Lock = field(default_factory=threading.Lock)


def note_state(adm: Admission, node: str, online: bool, now: float | None = None) -> None:
    """A verified birth (online) or offline/cleared record of a device."""
    with adm.lock:
        if online:
            _put(adm.live, node, time.monotonic() if now is None else now)
        else:
            adm.live.pop(node, None)


def note_heard(adm: Admission, node: str, now: float) -> None:
    """A verified election message (heartbeat, campaign, vote) of a device."""
    with adm.lock:
        _put(adm.heard, node, now)


def _said(adm: Admission, node: str, session: int, seq: int, now: float) -> tuple | None:
    """None for a device's election message newer than any heard from it (its session,
    then its number in that session), recorded; else the newest heard. Signatures
    cannot tell a replayed frame from the original, this can: without it, a member
    replaying a stalled node's last heartbeat kept it live. The newest one heard again
    within ``AGAIN_S`` passes (a second subscription of this process reading the same
    frame); unnumbered (seq 0) messages are not ordered."""
    if not seq:
        return None
    mark = (session, seq)
    with adm.lock:
        last = adm.said.get(node)
        if last is not None and mark <= last[0]:
            again = mark == last[0] and now - last[1] <= AGAIN_S
            return None if again else last[0]
        _put(adm.said, node, (mark, now))
    return None


def live_devices(adm: Admission, now: float | None = None) -> set:
    """Devices born online and heard (birth or election message) within ``SILENT_S``.
    Call with ``adm.lock`` held."""
    now = time.monotonic() if now is None else now
    return {n for n, born in adm.live.items()
            if now - max(born, adm.heard.get(n, born)) < SILENT_S}


def _majority(adm: Admission, voters: frozenset, live: set) -> bool:
    return 2 * len(voters) > len(live | voters)


def leader_of(adm: Admission, term: int) -> str | None:
    """The leader of ``term`` whose record holds a majority now, or None."""
    with adm.lock:
        live = live_devices(adm)
        cands = [(len(v), n) for (t, n), v in adm.records.items()
                 if t == term and _majority(adm, v, live)]
    return max(cands)[1] if cands else None


def current_leader(adm: Admission) -> str | None:
    """The leader of the newest term whose record holds a majority now."""
    with adm.lock:
        live = live_devices(adm)
        ok = [(t, len(v), n) for (t, n), v in adm.records.items()
              if _majority(adm, v, live)]
    return max(ok)[2] if ok else None


def no(reason: str) -> Verdict:
    return Verdict(False, reason)


YES = Verdict(True)


def _wins(a: tuple[str, float], b: tuple[str, float]) -> bool:
    from meshdl.node.election import rank_key
    return rank_key(*a) < rank_key(*b)


def admit(adm: Admission, p: ParsedTopic, e: Entry, body: bytes, now: float,
          retained: bool = False, verify_vote: Any = None) -> Verdict:
    """``verify_vote(frame) -> (entry, body)``: checks a signed vote frame carried by
    a leader record (``frames.verify`` on the election topic)."""
    from meshdl.wire.control import decode_control
    who = f"{e.role} {sanitise(e.id)}"
    if p.kind == "model":       # user models (issue 13): content-addressed, hash-checked
        from meshdl.node.model_store import sender_problem
        problem = sender_problem(p.job_kind, e.id, body)
        return no(f"{who}: {problem}") if problem else YES
    if p.kind == "job" and p.job_kind == "request":
        if e.role not in ("client", "device"):
            return no(f"{who} may not request jobs")
        try:
            req = decode_control(body)
        except MeshdlError as exc:
            return no(f"undecodable request from {who}: {exc}")
        if getattr(req, "client", None) != e.id:
            return no(f"{who} sent a request in the name of {sanitise(req.client)}")
        return YES
    if e.role != "device":
        return no(f"{who} may not publish {p.kind} messages (devices only)")
    if p.kind in ("state", "telemetry"):
        if p.node != e.id:
            return no(f"{who} published on {sanitise(p.node)}'s {p.kind} topic")
        verdict = _capped(p.kind, e, body)
        if verdict.ok and p.kind == "state":
            try:
                note_state(adm, e.id, bool(decode_control(body).online))
            except MeshdlError:
                pass
        return verdict
    if p.kind == "probe":
        return _probe(p, e, body)
    try:
        msg = decode_control(body)
    except MeshdlError as exc:
        return no(f"undecodable {p.kind} from {who}: {exc}")
    if p.kind == "election":
        if msg.node != e.id:
            return no(f"{who} campaigned in the name of {sanitise(msg.node)}")
        seen = _said(adm, e.id, msg.session, msg.seq, now)
        if seen is not None:
            return no(f"an election message of {who} heard before (#{msg.seq} of session "
                      f"{msg.session}; last #{seen[1]} of session {seen[0]}): a duplicate or a "
                      "replay")
        note_heard(adm, e.id, now)
        cap = e.caps.get("flops")
        prio = min(msg.priority, cap) if cap else msg.priority
        if msg.kind == "campaign":
            with adm.lock:
                best = adm.claims.get(msg.term)
                if best is None or _wins((e.id, prio), best):
                    _put(adm.claims, msg.term, (e.id, prio))
        vote = msg.term if msg.kind == "vote" and msg.vote_for == adm.me else None
        if cap and msg.priority > cap:
            return Verdict(True, "", _reencode(dataclasses.replace(msg, priority=float(cap))),
                           vote_term=vote)
        return Verdict(True, vote_term=vote)
    if p.kind == "leader":
        if msg.node != e.id:
            return no(f"{who} claimed leadership for {sanitise(msg.node)}")
        with adm.lock:
            known = frozenset(adm.live)
        voters = _verified_voters(msg, verify_vote, known)
        with adm.lock:
            key = (msg.term, e.id)
            _put(adm.records, key, adm.records.get(key, frozenset()) | voters)
            voters = adm.records[key]
            live = len(live_devices(adm, now) | voters)
        if adm.role == "client" and not 2 * len(voters) > live:
            # looked at again as devices fall silent (a revoked or frozen one)
            return Verdict(False, f"{who} announced itself leader of term {msg.term} with "
                           f"the votes of {len(voters)} of {live} live devices (no majority)",
                           waits=True)
        return Verdict(True, "", _reencode(dataclasses.replace(
            msg, votes={v: b"" for v in sorted(voters)})))
    if p.kind == "plan":
        plan = msg.plan if isinstance(msg.plan, dict) else {}
        meta = plan.get("meta") if isinstance(plan.get("meta"), dict) else {}
        issuer = meta.get("leader")
        if issuer not in (None, "", e.id):
            return no(f"{who} published a plan issued by {sanitise(issuer)}")
        leader = leader_of(adm, msg.term)
        if leader is None:
            return Verdict(False, f"held plan {sanitise(p.plan_id)} of term {msg.term} from "
                           f"{who} until a verified leader record of that term",
                           hold_term=msg.term)
        if leader is not None and leader != e.id:
            return no(f"{who} published plan {sanitise(p.plan_id)} of term {msg.term}, which "
                      f"{sanitise(leader)} leads")
        tasks = {}
        for st in plan.get("stages") or ():
            for t in (st.get("tasks") or ()) if isinstance(st, dict) else ():
                if isinstance(t, dict):
                    tasks[str(t.get("id"))] = str(t.get("device"))
        with adm.lock:
            _put(adm.plans, p.plan_id, PlanInfo(
                str(plan.get("sink", "")), frozenset(tasks.values()), e.id,
                str(plan.get("source", "")), MappingProxyType(tasks), int(msg.term)))
        return YES
    if p.kind == "job":
        return _job(adm, p, e, msg)
    return no(f"{who}: no rule admits {p.kind} messages")


def _job(adm: Admission, p: ParsedTopic, e: Entry, msg: Any) -> Verdict:
    who = f"device {sanitise(e.id)}"
    with adm.lock:
        pid = adm.job_plan.get(p.job)
        known = adm.plans.get(pid) if pid else None
    if p.job_kind == "status":
        if adm.role != "client":
            return YES
        leader = current_leader(adm)
        if msg.state == "planned":
            if e.id != leader:
                return no(f"{who} answered job {sanitise(p.job)} but {sanitise(leader)} leads")
            with adm.lock:
                _put(adm.job_plan, p.job, msg.detail)
            return YES
        if e.id == leader or (known is not None and e.id in (known[0], known[2], *known[1])):
            return YES
        return no(f"{who} sent a {sanitise(msg.state)} status for job {sanitise(p.job)} it "
                  "does not serve")
    if adm.role != "client":
        return YES
    if known is None:
        return no(f"result of {sanitise(p.job)} from {who} before a verified plan")
    if e.id != known[0]:
        return no(f"result of {sanitise(p.job)} from {who}, not the sink {sanitise(known[0])} "
                  f"of plan {sanitise(pid)}")
    return YES


MAX_CHECKED_VOTES = 64     # signature checks one leader record may cost


def _verified_voters(msg: Any, verify_vote: Any, live: frozenset = frozenset()) -> frozenset:
    """The leader plus every enrolled device whose signed vote for (leader, term) the
    record carries; forged, foreign or mismatched votes are left out (logged). Only
    votes of devices known to be live are checked (any, when none is known yet), at
    most ``MAX_CHECKED_VOTES``: a flood of records cannot buy many signature checks."""
    from meshdl.security.identity import SecurityError
    from meshdl.wire.control import Campaign, decode_control
    out = {msg.node}
    checked = 0
    for voter, frame in msg.votes.items():
        if not frame or verify_vote is None or (live and voter not in live):
            continue
        checked += 1
        if checked > MAX_CHECKED_VOTES:
            log.warning("leader record of %s carries more than %d votes; the rest are "
                        "ignored", sanitise(msg.node), MAX_CHECKED_VOTES)
            break
        try:
            ve, vbody = verify_vote(frame if isinstance(frame, bytes) else frame.encode())
            v = decode_control(vbody, Campaign)
        except (SecurityError, MeshdlError) as exc:
            log.warning("leader record of %s carries a bad vote of %s: %s", sanitise(msg.node),
                        sanitise(voter), exc)
            continue
        if ve.role == "device" and v.node == ve.id == voter and v.kind == "vote" \
                and v.vote_for == msg.node and v.term == msg.term:
            out.add(ve.id)
        else:
            log.warning("leader record of %s carries a vote of %s that is not for it in "
                        "term %d", sanitise(msg.node), sanitise(voter), msg.term)
    return frozenset(out)


def _reencode(msg: Any) -> bytes:
    from meshdl.wire.control import encode_control
    return encode_control(msg)


def _capped(kind: str, e: Entry, body: bytes) -> Verdict:
    """Births and telemetry of ``e`` with FLOP/s and link speeds capped by its profile."""
    from meshdl.wire.control import decode_control
    try:
        msg = decode_control(body)
    except MeshdlError as exc:
        return no(f"undecodable {kind} from {sanitise(e.id)}: {exc}")
    if msg.node != e.id:
        return no(f"{kind} names {sanitise(msg.node)} but is signed by {sanitise(e.id)}")
    flops, bps = e.caps.get("flops"), e.caps.get("bps")
    if kind == "state":
        caps, out = dict(msg.caps), {}
        for k, unit in (("flops", "FLOP/s"), ("memory_bytes", "bytes of memory")):
            cap, claim = e.caps.get(k), getattr(msg, k)
            inner = caps.get(k) if isinstance(caps.get(k), (int, float)) else 0
            if cap and (claim > cap or inner > cap):
                log.warning("capped the %.3g %s claimed by %s to its enrolled %.3g",
                            max(claim, inner), unit, sanitise(e.id), cap)
                if k in caps:
                    caps[k] = min(float(caps[k]), cap)
                out[k] = type(claim)(min(claim, cap))
        if out:
            return Verdict(True, "", _reencode(dataclasses.replace(msg, caps=caps, **out)))
    if kind == "telemetry" and bps:
        links, changed = {}, False
        for nb, fig in msg.links.items():
            fig = dict(fig)
            for k in ("bps", "throughput_bps", "up_bps", "down_bps"):
                if isinstance(fig.get(k), (int, float)) and fig[k] > bps:
                    fig[k], changed = bps, True
            links[nb] = fig
        if changed:
            log.info("capped link speeds claimed by %s to its enrolled %.3g bit/s",
                        sanitise(e.id), bps)
            return Verdict(True, "", _reencode(dataclasses.replace(msg, links=links)))
    return YES


def _probe(p: ParsedTopic, e: Entry, body: bytes) -> Verdict:
    from meshdl.node.probe import decode_probe
    try:
        pr = decode_probe(body)
    except MeshdlError as exc:
        return no(f"undecodable probe from {sanitise(e.id)}: {exc}")
    if pr.sender != e.id:
        return no(f"probe in the name of {sanitise(pr.sender)} signed by {sanitise(e.id)}")
    if pr.kind in ("claim", "here") and p.node != e.id:
        return no(f"{sanitise(e.id)} sent a {pr.kind} for node id {sanitise(p.node)}")
    return YES


def piece_ends(info: PlanInfo, job: str, piece: str) -> tuple[str, str] | None:
    """(producer, consumer) of a piece of a verified plan (ids of devices, or of the
    job's client), from the piece id (``meshdl.node.jobs``); None if it names none."""
    from meshdl.wire.topics import JOB_SEP
    owner = job.partition(JOB_SEP)[0] if JOB_SEP in job else ""
    parts = piece.split(".")[1:]
    t = info.tasks
    if parts == ["in"]:
        return owner, info.source
    if parts == ["res"]:
        return info.sink, owner
    if len(parts) == 2 and parts[0] == "src" and parts[1] in t:
        return info.source, t[parts[1]]
    if len(parts) == 2 and parts[1] == "out" and parts[0] in t:
        return t[parts[0]], info.sink
    if len(parts) in (2, 3) and parts[0] in t and parts[1] in t:     # halo, or partials
        return t[parts[0]], t[parts[1]]
    return None


def piece_problem(adm: Admission, job: str, piece: str, kind: str, e: Entry) -> str | None:
    """Why ``e`` may not have sent this sealed frame (``kind``: the codec frame type,
    "piece", "ack" or "credit"), or None. A piece must come from its producer, anything
    else (acks, credit) from its consumer, both as the verified plan names them."""
    pid = piece.partition(".")[0]
    with adm.lock:
        info = adm.plans.get(pid)
    who = f"{e.role} {sanitise(e.id)}"
    if info is None:
        return f"{who} sent {sanitise(piece)} of job {sanitise(job)}: its plan is not verified here"
    ends = piece_ends(info, job, piece)
    if ends is None:
        return f"{who} sent {sanitise(piece)}, which plan {sanitise(pid)} does not name"
    want = ends[0] if kind == "piece" else ends[1]
    if e.id != want:
        role = "producer" if kind == "piece" else "consumer"
        return (f"{who} sent a {sanitise(kind)} of {sanitise(piece)} of job {sanitise(job)}, "
                f"whose {role} is {sanitise(want)}")
    return None
