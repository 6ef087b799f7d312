"""NodeAgent's join (split from ``meshdl.node.agent``): the MQTT connection
(``keepalive_s``, ``_paho``), claiming the node id against a live duplicate, and the
probe handler (claims, link pings) that runs on the bus dispatcher.
``_AgentJoin`` is a mixin of ``NodeAgent``."""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from meshdl.security.bounds import sanitise
from meshdl.errors import MeshdlError, WireError
from meshdl.node.config import DuplicateNodeError, NodeError
from meshdl.node.membership import claim_verdict
from meshdl.node.probe import Probe, decode_probe, encode_probe
from meshdl.wire.topics import node_probe as probe_topic
from meshdl.transport.bus import Will
from meshdl.wire import topics
from meshdl.wire.control import NodeState, decode_control

log = logging.getLogger("meshdl.node.agent")

DEFAULT_KEEPALIVE = 10


def keepalive_s() -> int:
    """MQTT keepalive of node connections: MESHDL_KEEPALIVE (2-600 s), else 10 s. The
    broker fires a silent node's will after 1.5x this."""
    raw = os.environ.get("MESHDL_KEEPALIVE")
    if raw is None:
        return DEFAULT_KEEPALIVE
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if not 2 <= v <= 600:
        raise NodeError(f"MESHDL_KEEPALIVE={raw!r} must be a whole number of seconds in "
                        "[2, 600]; unset it for the default of 10")
    return v


class _AgentJoin:
    """Connection, id claim and probes of a ``NodeAgent`` (mixin)."""

    def _paho(self, client_id: str, will: Will | None):
        from meshdl.transport.paho_bus import PahoBus
        c = self.config
        if c.bundle:                                  # secure mesh: meshdl.security
            from meshdl.security.securebus import SecureBus, secure_paho
            first = getattr(self, "bus", None)
            return secure_paho(c.broker, c.bundle, mesh=self.mesh_name, client_id=client_id,
                               will=will, protocol=c.protocol, keepalive=keepalive_s(),
                               reconnect_delay=(0.1, 1.0),
                               share=first if isinstance(first, SecureBus) else None)
        from meshdl.security.securebus import warn_if_exposed
        warn_if_exposed(c.broker, "node")
        return PahoBus(c.broker, client_id=client_id, username=c.username,
                       password=c.password, tls_ca=c.tls_ca, will=will, protocol=c.protocol,
                       keepalive=keepalive_s(), reconnect_delay=(0.1, 1.0))

    def _check_duplicate(self) -> int:
        """Claim the id; raise DuplicateNodeError if a live process holds it.
        Returns a retained session that is not older than ours (0 if none)."""
        me = self.node_id
        self.bus.subscribe(topics.node_state(self.mesh_name, me), self._own_state, qos=1)
        self.bus.subscribe(probe_topic(self.mesh_name, me), self._on_probe, qos=1)
        self.bus.publish(probe_topic(self.mesh_name, me),
                         encode_probe(Probe("claim", me, self.session, self._nonce,
                                            time.time())), qos=1)
        time.sleep(self.config.timing.dup_window)
        with self._lock:
            here = list(self._here)
            rivals = [c for c in self._claims
                      if not claim_verdict((self.session, self._nonce), (c.session, c.nonce))]
            self._owner = not here and not rivals
        if here or rivals:
            other = (here or rivals)[0]
            self.bus.close()
            raise DuplicateNodeError(
                f"node id {me!r} is already {'online' if here else 'starting'} in mesh "
                f"{self.mesh_name!r} (session {other.session}); stop that process or pick "
                "another --id")
        own = self._retained_self
        if own is not None and own.session >= self.session:
            return own.session
        return 0

    def _own_state(self, topic: str, payload: Any, retained: bool) -> None:
        try:
            st = decode_control(payload, NodeState) if len(payload) else None
        except WireError as exc:
            log.warning("dropped a malformed state on %s: %s", sanitise(topic, 160), exc)
            return
        if st is None or st.node != self.node_id:
            return
        if not self._owner:
            self._retained_self = st
        elif not st.online and st.session == self.session and not self._closed:
            # our will fired (the broker lost us: a stall past keepalive, a restart):
            # we are alive, so say so again
            self._q.put(("reconnected", "", b"", False))
        elif st.online and st.session > self.session:
            log.error("node id %s was taken over by a newer process (session %d); leaving "
                      "without publishing", self.node_id, st.session)
            self.exit_reason = "superseded"
            self._stopped.set()

    def _on_probe(self, topic: str, payload: Any, retained: bool) -> None:
        """Runs on the dispatcher: probes are answered at once (RTT accuracy)."""
        try:
            p = decode_probe(payload)
        except WireError as exc:
            log.warning("dropped a malformed probe on %s: %s", sanitise(topic, 160), exc)
            return
        if p.kind == "claim" and not (p.session == self.session and p.nonce == self._nonce):
            with self._lock:
                owner = self._owner
                if not owner:
                    self._claims.append(p)
            if not owner and claim_verdict((self.session, self._nonce), (p.session, p.nonce)):
                # a rival that subscribed after our claim never saw it: claim again
                self._send_probe(self.node_id, Probe("claim", self.node_id, self.session,
                                                     self._nonce, time.time()))
            elif owner and not self._stopped.is_set():
                self._send_probe(self.node_id, Probe("here", self.node_id, self.session,
                                                     p.nonce, time.time()))
        elif p.kind == "here" and p.session != self.session:
            with self._lock:
                self._here.append(p)
        elif p.kind == "ping" and self._owner:
            self._send_probe(p.sender, Probe("pong", self.node_id, self.session, p.nonce,
                                             time.time(), p.pad))
        elif p.kind == "pong" and self._prober is not None:
            self._prober.on_pong(p)
        elif p.kind == "set_link":
            self._q.put(("set_link", topic, p, False))

    def _send_probe(self, node: str, p: Probe) -> None:
        try:
            self.bus.publish(probe_topic(self.mesh_name, node), encode_probe(p))
        except MeshdlError as exc:
            log.debug("probe %s to %s not sent: %s", p.kind, node, exc)
