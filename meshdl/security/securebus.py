"""SecureBus: a ``Bus`` that signs and verifies control messages and seals pieces.

It wraps the bus a node or client already uses (one narrow hook where the bus is
made), so the runtime code stays as it is. On publish: control topics are signed
(``frames.sign``), route topics are sealed to the route's destination
(``frames.seal``), job results also sealed to the requesting client. On receive,
before any handler runs: the frame must verify, and ``policy.admit`` must accept
the sender for that topic; otherwise it is dropped and logged (with a count per
reason in ``rejected``). Sealed pieces must come from the producer the verified plan
names (``policy.piece_problem``).

Empty payloads are unsigned, and the ACL lets every device write the leader, plan and
job topics, so on those an empty payload proves nothing: an empty leader record goes
to the election (which keeps following a live leader), a plan is retired only by its
leader's signed retirement (``RETIRE`` + its term), which ``publish`` sends before
clearing the retained copy, and empty statuses or results are dropped. A plan record
we published and someone else cleared is put back. Node records may be cleared (only
their owner may write them).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Any

from meshdl.errors import MeshdlError, WireError
from meshdl.security import frames as F
from meshdl.security.bounds import sanitise
from meshdl.security.bundle import Bundle
from meshdl.security.identity import Entry, SecurityError
from meshdl.security.loggate import LogGate, Refusals, kind_of
from meshdl.security.policy import Admission, admit, leader_of, note_state, piece_problem
from meshdl.transport.bus import Will
from meshdl.transport.urls import is_loopback
from meshdl.wire import topics
from meshdl.wire.codec import OutFrame, frame_type

log = logging.getLogger(__name__)

JOB_OWNER_SEP = topics.JOB_SEP   # every client names its jobs "{client}~{random}"
RETIRE = b"retire "              # a plan's signed retirement: RETIRE + its record's term


class SecureBus:
    """``share``: another SecureBus of the same identity (a node's or client's second
    connection) whose verified knowledge (peers, leaders, plans) this one shares."""

    def __init__(self, inner: Any, bundle: Bundle, share: "SecureBus | None" = None) -> None:
        self.inner = inner
        self.bundle = bundle
        self.me = bundle.id
        self.mesh = bundle.mesh
        self._raw, self._sig = bundle.entry.raw, bundle.entry.sig
        self._refusals, self._gate, self._gate_lock = Refusals(), LogGate(), threading.Lock()
        self.rejected: Counter = self._refusals.counts      # refused messages by reason
        self._mine: OrderedDict[str, bytes] = OrderedDict()   # plan records we retain
        self._short: OrderedDict = OrderedDict()   # leader records short of a majority
        self.sealed_out = self.sealed_in = 0
        if share is not None:
            self.cache, self.ring, self._lock = share.cache, share.ring, share._lock
            self.peers, self.adm, self._held = share.peers, share.adm, share._held
            return
        self.cache = F.EntryCache(bundle.mesh_pub, bundle.mesh)
        self.ring = F.KeyRing(bundle.mesh, bundle.id, bundle.seal_key)
        self._lock = threading.Lock()
        self.peers: OrderedDict[str, Entry] = OrderedDict()     # id -> latest verified entry
        self.adm = Admission(me=bundle.id, role=bundle.role)
        self._held: deque = deque(maxlen=64)      # plans waiting for their leader record
        self._learn(bundle.entry_info)
        if bundle.role == "device":
            self.inner.subscribe(_client_keys(self.mesh), self._on_client_key, qos=1)
        else:         # clients learn claims and leaders to check plans against them
            self.inner.subscribe(topics.election(self.mesh), self._on_leader, qos=1)
            self.inner.subscribe(topics.leader(self.mesh), self._on_leader, qos=1)
            self.inner.publish(_client_key(self.mesh, self.me),
                               self.signed(_client_key(self.mesh, self.me), b"key"),
                               qos=1, retain=True)

    # ------------------------------------------------------------ Bus protocol
    @property
    def connected(self) -> bool:
        return self.inner.connected

    def wait_connected(self, timeout: float) -> bool:
        return self.inner.wait_connected(timeout)

    def __getattr__(self, name: str) -> Any:          # dropped, max_payload, url, ...
        return getattr(self.inner, name)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Any:
        if "/plan/" in topic and retain:
            if not len(payload):      # a retirement: signed, then the retained copy cleared
                with self._lock:
                    self._mine.pop(topic, None)
                with self.adm.lock:
                    info = self.adm.plans.get(topics.parse(topic).plan_id)
                body = RETIRE + str(info.term if info is not None else 0).encode()
                self.inner.publish(topic, self.signed(topic, body), qos=qos, retain=False)
            else:
                out = self.wrap(topic, payload)
                with self._lock:
                    _put_last(self._mine, topic, out, 256)
                self.inner.publish(topic, out, qos=qos, retain=retain)
                return
        # the inner bus's handle (paho: the broker's ack), for senders that wait on it
        return self.inner.publish(topic, self.wrap(topic, payload), qos=qos, retain=retain)

    def subscribe(self, pattern: str, handler: Any, qos: int = 0) -> None:
        def checked(topic: str, payload: Any, retained: bool) -> None:
            out = self.unwrap(topic, payload, handler, retained)
            if out is not None:
                handler(topic, out, retained)
        self.inner.subscribe(pattern, checked, qos=qos)

    def unsubscribe(self, pattern: str) -> None:
        self.inner.unsubscribe(pattern)

    def close(self, final: Will | None = None, timeout: float = 5.0) -> None:
        self.inner.close(final=self.sign_will(final), timeout=timeout)

    def __enter__(self) -> "SecureBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ outgoing
    def signed(self, topic: str, body: bytes) -> bytes:
        return F.sign(self.bundle.sign_key, self._raw, self._sig, topic, bytes(body))

    def sign_will(self, will: Will | None) -> Will | None:
        if will is None or not will.payload:
            return will
        return dataclasses.replace(will, payload=self.signed(will.topic, will.payload))

    def wrap(self, topic: str, payload: Any) -> Any:
        if not len(payload):
            return payload                                # a clear of a retained record
        p = topics.parse(topic)
        if p.kind == "route" and p.job != "probe" and isinstance(payload, OutFrame):
            return self._seal_route(p, payload)   # a codec OutFrame: sealed from its parts
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            payload = bytes(payload)
        if p.kind == "probe_dir":
            return payload                        # padding: only its size is read
        if p.kind == "route":
            if p.job == "probe" or F.is_sealed(payload):
                return payload                    # a probe, or a sealed piece we relay
            return self._seal_route(p, payload)
        body = bytes(payload)
        if p.kind == "job" and p.job_kind == "result":
            body = self._seal_result(p.job, body)
        elif p.kind == "leader":
            body = self._with_votes(body)
        return self.signed(topic, body)

    def _with_votes(self, body: bytes) -> bytes:
        """Our leader record with the signed votes we won for its term attached."""
        from meshdl.wire.control import LeaderInfo, decode_control, encode_control
        try:
            info = decode_control(body, LeaderInfo)
        except MeshdlError:
            return body
        if info.node != self.me:
            return body
        with self.adm.lock:
            votes = dict(self.adm.my_votes.get(info.term, {}))
        return encode_control(dataclasses.replace(info, votes=votes)) if votes else body

    def _peer(self, ident: str) -> Entry | None:
        with self._lock:
            return self.peers.get(ident)

    def _seal_route(self, p: topics.ParsedTopic, payload: Any) -> bytearray:
        from meshdl.wire.codec import _read_header      # the header only: no decompression
        dst = p.hops[-1]
        peer = self._peer(dst)
        if peer is None:
            raise SecurityError(f"cannot seal a piece for {dst!r}: no verified key of it yet "
                                "(it has not announced itself on this mesh)")
        # a codec OutFrame is sealed from its header and tensor views, never joined first
        head = _read_header(payload.head if isinstance(payload, OutFrame) else payload)[0]
        chunk = head.get("chunk")
        i, n = chunk if isinstance(chunk, list) and len(chunk) == 2 else (0, 1)
        pk = F.Peek(str(head.get("type", "")), int(head.get("term") or 0),
                    int(head.get("seq") or 0), int(i), int(n))
        self.sealed_out += 1
        return F.seal(self.ring, self._raw, self._sig, peer, p.job, p.piece, payload, pk)

    def _seal_result(self, job: str, body: bytes) -> bytes:
        owner = job.split(JOB_OWNER_SEP, 1)[0] if JOB_OWNER_SEP in job else None
        peer = self._peer(owner) if owner else None
        if peer is None or peer.role != "client":
            return body
        return F.seal_bytes(self.ring, self._raw, self._sig, peer, job, "result", body)

    # ------------------------------------------------------------ incoming
    def _reject(self, topic: str, why: str) -> None:
        """Counted always (bounded by reason); logged within the gate's rate."""
        with self._gate_lock:
            self._refusals.add(why.split(":")[0][:60])
            more = self._gate.admit(kind_of(why), time.monotonic())
        if more is not None:
            log.warning("rejected a message on %s: %s%s", sanitise(topic, 120), why, more,
                        extra={"gated": True})

    def _learn(self, e: Entry) -> None:
        with self._lock:
            self.peers[e.id] = e
            self.peers.move_to_end(e.id)
            while len(self.peers) > 2048:
                self.peers.popitem(last=False)

    def _on_leader(self, topic: str, payload: Any, retained: bool) -> None:
        self.unwrap(topic, payload, None, retained)

    def _on_client_key(self, topic: str, payload: Any, retained: bool) -> None:
        if not len(payload):
            return
        try:
            entry, _ = F.verify(self.cache, topic, payload)
            p = topic.split("/")
            if entry.role != "client" or p[-2] != entry.id:
                raise SecurityError(f"key record of {p[-2]!r} signed by {entry.id!r}")
        except (SecurityError, IndexError) as exc:
            self._reject(topic, str(exc))
            return
        self._learn(entry)

    def _verify_vote(self, frame: bytes) -> tuple[Entry, bytes]:
        return F.verify(self.cache, topics.election(self.mesh), frame)

    def _keep_vote(self, term: int, voter: str, frame: Any) -> None:
        """A verified vote for us: kept (bounded) to go with our leader record."""
        with self.adm.lock:
            votes = self.adm.my_votes.setdefault(term, {})
            if voter in votes or len(votes) < 256:
                votes[voter] = bytes(frame)
            while len(self.adm.my_votes) > 8:
                self.adm.my_votes.popitem(last=False)

    def _hold(self, term: int, signer: Entry, topic: str, body: bytes, retained: bool,
              handler: Any) -> None:
        with self._lock:
            self._held.append((term, signer, topic, body, retained, handler))

    def _release(self, term: int, leader: str) -> None:
        with self._lock:
            go = [h for h in self._held if h[0] == term and h[1].id == leader]
            keep = [h for h in self._held if h[0] != term]
            self._held.clear()
            self._held.extend(keep)
        for _, entry, topic, body, retained, handler in go:
            # admitted again, now that its leader is known (so the plan is recorded)
            verdict = admit(self.adm, topics.parse(topic), entry, body, time.monotonic(),
                            retained, self._verify_vote)
            if not verdict.ok:
                self._reject(topic, verdict.reason)
            elif handler is not None:
                log.info("released plan on %s: %s leads term %d", sanitise(topic, 120),
                         sanitise(leader), term)
                handler(topic, body, retained)

    def _empty(self, topic: str, payload: Any) -> Any:
        """An empty (unsigned) payload: what the handler gets, or None (dropped)."""
        try:
            p = topics.parse(topic)
        except MeshdlError:
            return None
        if p.kind == "state":
            note_state(self.adm, p.node, False)       # cleared (only its owner may)
        elif p.kind == "plan":
            with self._lock:
                mine = self._mine.get(topic)
            if mine is not None:                      # ours, still current: put it back
                log.warning("the retained record of our plan %s was cleared by someone "
                            "else: published again", sanitise(p.plan_id))
                self.inner.publish(topic, mine, qos=1, retain=True)
            else:
                log.info("ignored an unsigned clear of plan %s (a plan ends with its "
                         "leader's signed retirement)", sanitise(p.plan_id))
            self.rejected["unsigned clear of a plan"] += 1
            return None
        elif p.kind == "job" and p.job_kind in ("status", "result"):
            self._reject(topic, "an empty job status or result (unsigned)")
            return None
        return payload

    def _retired(self, topic: str, p: topics.ParsedTopic, e: Entry, body: bytes) -> Any:
        """A signed retirement of a plan (``RETIRE`` + the term of the record it ends):
        from its issuer or the current leader only, and not of an older record than the
        current one (a replayed retirement cannot end a plan re-issued since)."""
        from meshdl.security.policy import current_leader
        with self.adm.lock:
            info = self.adm.plans.get(p.plan_id)
        if e.role != "device" or e.id not in ((info.leader if info else None),
                                              current_leader(self.adm)):
            raise SecurityError(f"{e.role} {sanitise(e.id)} retired plan "
                                f"{sanitise(p.plan_id)}, which it neither issued nor leads")
        term = body[len(RETIRE):]
        if not term.isdigit() or (info is not None and int(term) < info.term):
            raise SecurityError(f"a retirement of plan {sanitise(p.plan_id)} for term "
                                f"{sanitise(term.decode(errors='replace'))}, older than its "
                                f"record's term {info.term if info else '?'} (replayed?)")
        with self._lock:
            self._mine.pop(topic, None)          # retired by a newer leader: not ours now
        return b""

    def _look_again(self) -> None:
        """Leader records refused for want of a majority, judged again (a device that
        went silent, e.g. revoked, no longer counts): delivered once they hold one."""
        from meshdl.wire.control import decode_control
        with self._lock:
            short = list(self._short.items())
        for key, (topic, entry, body, retained, handler) in short:
            term = decode_control(body).term
            if leader_of(self.adm, term) != entry.id:
                continue
            with self._lock:
                self._short.pop(key, None)
            verdict = admit(self.adm, topics.parse(topic), entry, body, time.monotonic(),
                            retained, self._verify_vote)
            if verdict.ok:
                log.info("%s leads term %d with a majority of the live devices now",
                         sanitise(entry.id), term)
                self._release(term, entry.id)
                if handler is not None:
                    handler(topic, verdict.body if verdict.body is not None else body,
                            retained)

    def unwrap(self, topic: str, payload: Any, handler: Any = None,
               retained: bool = False) -> Any:
        """The inner payload for the handler, or None (dropped and logged)."""
        if not len(payload):
            return self._empty(topic, payload)
        try:
            p = topics.parse(topic)
            if p.kind == "probe_dir":            # our own padding back (the ACL: only its
                return payload if p.node == self.me else None    # owner writes or reads it)
            if p.kind == "route":
                if p.job == "probe":
                    return payload
                if not F.is_sealed(payload):
                    raise SecurityError("unsealed piece on a secure mesh")
                if len(p.hops) > 1:
                    return payload              # we relay it: it stays sealed
                entry, pt = F.open_sealed(self.ring, self.cache, p.job, p.piece, payload)
                try:        # the type inside (authenticated under either cipher), not the
                    kind = frame_type(pt)        # clear header's (MDE1 does not cover it)
                except WireError as exc:
                    raise SecurityError(f"sealed frame from {entry.id!r}: {exc}") from None
                why = piece_problem(self.adm, p.job, p.piece, kind, entry)
                if why is not None:
                    raise SecurityError(why)
                self.sealed_in += 1
                if entry.id != p.hops[0]:
                    self._learn(entry)
                return pt
            entry, body = F.verify(self.cache, topic, payload)
            if p.kind == "plan" and body.startswith(RETIRE):
                return self._retired(topic, p, entry, body)
            if p.kind == "job" and p.job_kind == "result" and F.is_sealed(body):
                if self.adm.role != "client":
                    return None                   # sealed to a client: not for us
                _, body = F.open_sealed(self.ring, self.cache, p.job, "result", body)
            verdict = admit(self.adm, p, entry, body, time.monotonic(), retained,
                            self._verify_vote)
            if verdict.hold_term is not None:
                log.info("%s", verdict.reason)
                self._hold(verdict.hold_term, entry, topic, body, retained, handler)
                return None
            if not verdict.ok:
                if verdict.waits:
                    with self._lock:
                        _put_last(self._short, (entry.id, id(handler)),
                                  (topic, entry, body, retained, handler), 16)
                raise SecurityError(verdict.reason)
            self._learn(entry)
            if verdict.vote_term is not None:
                self._keep_vote(verdict.vote_term, entry.id, payload)
            if p.kind == "election" and self._short:
                self._look_again()
            if p.kind == "leader":
                from meshdl.wire.control import decode_control
                term = decode_control(body).term
                if leader_of(self.adm, term) == entry.id:
                    self._release(term, entry.id)
                with self._lock:          # a record that holds: older short ones are moot
                    for k in [k for k, v in self._short.items()
                              if decode_control(v[2]).term <= term]:
                        del self._short[k]
            return verdict.body if verdict.body is not None else body
        except (SecurityError, MeshdlError) as exc:
            self._reject(topic, str(exc))
            return None


def _put_last(d: OrderedDict, k: Any, v: Any, keep: int) -> None:
    d[k] = v
    d.move_to_end(k)
    while len(d) > keep:
        d.popitem(last=False)


def _client_key(mesh: str, client: str) -> str:
    from meshdl.security.acl import client_key_topic
    return client_key_topic(mesh, client)


def _client_keys(mesh: str) -> str:
    from meshdl.security.acl import client_key_all
    return client_key_all(mesh)


def secure_paho(url: str, bundle_path: str, *, mesh: str | None = None,
                client_id: str | None = None, will: Will | None = None,
                share: SecureBus | None = None, **options: Any) -> SecureBus:
    """A PahoBus authenticated by the bundle's certificate, wrapped in a SecureBus."""
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.transport.urls import parse_url
    b = load_bundle_cached(bundle_path)
    if mesh is not None and mesh != b.mesh:
        raise SecurityError(f"bundle {bundle_path} belongs to mesh {b.mesh!r}, not {mesh!r}; "
                            f"pass --mesh {b.mesh}")
    if not parse_url(url).tls:
        raise SecurityError(f"a bundle needs a TLS broker (mqtts://), not {url!r}; run "
                            "`meshdl broker` and use the URL it prints")
    signer = _WillSigner(b)
    options.pop("username", None)
    options.pop("password", None)
    options.pop("tls_ca", None)
    files = b.tls_files()
    try:
        inner = PahoBus(url, client_id=client_id, will=signer.sign(will), **files, **options)
    finally:
        # paho read them into its SSL context on connect (reconnects reuse it): remove
        # the key now, so no copy outlives this process even if it is SIGKILLed
        import shutil
        from pathlib import Path
        shutil.rmtree(Path(files["tls_key"]).parent, ignore_errors=True)
    return SecureBus(inner, b, share)


class _WillSigner:
    def __init__(self, b: Bundle) -> None:
        self.b = b

    def sign(self, will: Will | None) -> Will | None:
        if will is None or not will.payload:
            return will
        return dataclasses.replace(will, payload=F.sign(self.b.sign_key, self.b.entry.raw,
                                                        self.b.entry.sig, will.topic,
                                                        will.payload))


def load_bundle_cached(path: str) -> Bundle:
    return Bundle.load(path)



def warn_if_exposed(url: str, what: str) -> bool:
    """Warn loudly when a node or client talks to a non-loopback broker without a
    bundle: anyone on the network with broker access can read and forge its traffic."""
    from meshdl.transport.urls import parse_url
    try:
        host = parse_url(url).host
    except MeshdlError:
        return False
    if is_loopback(host):
        return False
    log.warning("!!! INSECURE: this %s talks to %s without a bundle: whoever reaches the "
                "broker can read the images and results and forge plans and results. Set "
                "up a secure mesh: `meshdl mesh init`, `meshdl mesh add-device/add-client`, "
                "`meshdl broker`, then pass --bundle FILE", what, sanitise(host))
    return True
