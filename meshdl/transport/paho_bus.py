"""PahoBus: the ``Bus`` over paho-mqtt 2.x (CallbackAPIVersion.VERSION2).

paho runs every callback on its one network thread; here that thread only
moves messages into the dispatcher's bounded lanes and wakes waiters. Handlers,
publishes and waits happen on other threads. MQTT v5 is tried first; a broker
that refuses the protocol version (amqtt) gets MQTT 3.1.1. Subscriptions are
(re)made in ``on_connect``, so they survive reconnects. Payload sizes are capped
here, because paho ignores the broker's Maximum Packet Size.
"""
from __future__ import annotations

import socket

import collections
import logging
import os
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from meshdl.errors import TransportError, WireError
from meshdl.transport.bus import Dispatcher, Handler, Subscriptions, Will, private_client_id
from meshdl.transport.urls import BrokerURL, parse_url
from meshdl.wire.topics import validate_filter, validate_publish_topic

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 64 << 20
_PROTOCOL_REFUSED = {1, 132}                      # v3.1.1 rc 1, v5 0x84
_LOGIN_REFUSED = {2, 4, 5, 133, 134, 135, 138, 140}
V5_CONNACK_WAIT = 3.0


class _NoConnack(TimeoutError):
    """TCP (and TLS) connected but the broker never answered CONNECT."""


class PahoBus:
    """A ``Bus`` connected to an MQTT broker. Connects in the constructor
    (``connect=False`` to defer); raises TransportError if it cannot."""

    def __init__(self, url: str, *, client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 tls_ca: str | os.PathLike | None = None,
                 tls_cert: str | os.PathLike | None = None,
                 tls_key: str | os.PathLike | None = None, tls_insecure: bool = False,
                 will: Will | None = None, keepalive: int = 30,
                 connect_timeout: float = 10.0, protocol: str = "auto",
                 max_payload: int = DEFAULT_MAX_PAYLOAD, max_inflight: int = 1000,
                 max_outgoing_bytes: int = 256 << 20, dispatch_lanes: int = 1,
                 max_inbound: int = 10000, reconnect_delay: tuple[float, float] = (0.1, 5.0),
                 connect: bool = True) -> None:
        if protocol not in ("auto", "5", "3.1.1"):
            raise TransportError(f"protocol must be auto, 5 or 3.1.1, not {protocol!r}")
        self.url: BrokerURL = parse_url(url)
        self.client_id = client_id or private_client_id()
        self._username = username if username is not None else self.url.username
        self._password = password if password is not None else self.url.password
        self._tls = (tls_ca, tls_cert, tls_key, tls_insecure)
        self._will = will
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._protocol_pref = protocol
        self.protocol: str | None = None
        self.max_payload = max_payload
        self._broker_max_packet: int | None = None
        self._max_inflight = max_inflight
        self._max_outgoing = max_outgoing_bytes
        self._reconnect_delay = reconnect_delay
        self._subs = Subscriptions()
        self._dispatcher = Dispatcher(self._subs, f"paho-{self.client_id}", dispatch_lanes,
                                      max_inbound)
        self._connected = threading.Event()
        self._answered = threading.Event()          # a CONNACK (good or bad) arrived
        self._last_rc: Any = None
        self._out = threading.Condition()
        self._pending: collections.deque = collections.deque()   # (info, size, qos)
        self._pending_bytes = 0
        self._client: mqtt.Client | None = None
        self._closed = False
        self._connects = 0                          # successful CONNACKs so far
        self.session_present = False
        self._listeners: list = []                  # called (off paho's thread) per reconnect
        if connect:
            self.connect()

    # ----------------------------------------------------------- state
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connects(self) -> int:
        """How many times this bus got a CONNACK: a change means a reconnect happened
        (the broker may have lost our session, retained records and subscriptions)."""
        return self._connects

    def on_reconnect(self, callback) -> None:
        """Call ``callback()`` after every reconnect (not the first connect), on a
        short-lived thread of its own, never on paho's network thread."""
        self._listeners.append(callback)

    @property
    def dropped(self) -> int:
        """Inbound messages dropped because the handlers were too slow."""
        return self._dispatcher.dropped

    # ----------------------------------------------------------- connect
    def _make_client(self, v5: bool) -> mqtt.Client:
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kw = {} if v5 else {"clean_session": True}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=proto, reconnect_on_failure=True, **kw)
        if log.isEnabledFor(logging.DEBUG):
            c.enable_logger(log)
        if self._username is not None:
            c.username_pw_set(self._username, self._password)
        ca, cert, key, insecure = self._tls
        if self.url.tls or ca is not None:
            try:
                c.tls_set(ca_certs=None if ca is None else str(ca),
                          certfile=None if cert is None else str(cert),
                          keyfile=None if key is None else str(key),
                          cert_reqs=ssl.CERT_NONE if insecure else ssl.CERT_REQUIRED)
                c.tls_insecure_set(insecure)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise TransportError(f"cannot set up TLS for {self.url.redacted()}: {exc}; "
                                     "check --tls-ca (and client cert/key) paths") from exc
        if self._will is not None:
            w = self._will
            c.will_set(w.topic, bytes(w.payload), w.qos, w.retain)
        c.reconnect_delay_set(*self._reconnect_delay)
        c.max_inflight_messages_set(self._max_inflight)
        c.max_queued_messages_set(0)
        c.on_socket_open = _no_delay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        return c

    def connect(self, timeout: float | None = None) -> None:
        """Connect (MQTT v5, falling back to 3.1.1); raise TransportError on failure."""
        deadline = time.monotonic() + (self._connect_timeout if timeout is None else timeout)
        v5 = self._protocol_pref != "3.1.1"
        while True:
            # amqtt (with a will set) never answers a v5 CONNECT: give v5 a bounded try
            short = (deadline if not (v5 and self._protocol_pref == "auto") else
                     min(deadline, time.monotonic() + V5_CONNACK_WAIT))
            rc = self._attempt(v5, deadline, short)
            if rc is None:
                return
            if v5 and self._protocol_pref == "auto" and (
                    _value(rc) in _PROTOCOL_REFUSED
                    or isinstance(rc, (ConnectionAbortedError, _NoConnack))):
                log.info("%s refused MQTT v5; retrying with 3.1.1", self.url.redacted())
                v5 = False
                continue
            self._stop_client()
            if _value(rc) in _LOGIN_REFUSED:
                raise TransportError(f"broker {self.url.redacted()} refused the login ({rc}); "
                                     "check the username/password (--username/--password or "
                                     "mqtt://user:pass@host) and the broker's ACL")
            if isinstance(rc, BaseException):
                raise TransportError(f"cannot connect to {self.url.redacted()} within "
                                     f"{self._connect_timeout:g} s ({rc}); is a broker running "
                                     "there? Start one (meshdl mesh up, or mosquitto) or pass "
                                     "--broker with the right host:port") from rc
            raise TransportError(f"broker {self.url.redacted()} refused the connection ({rc}); "
                                 "check its configuration and protocol version")

    def _attempt(self, v5: bool, deadline: float, connack_deadline: float) -> Any:
        """One connect round; returns None on success, else the failure (rc or exception)."""
        self._stop_client()
        client = self._make_client(v5)
        self._client = client
        self._answered.clear()
        self._last_rc = None
        last_exc: BaseException | None = None
        client.connect_timeout = max(0.1, min(deadline - time.monotonic(), 5.0))
        while True:
            if deadline - time.monotonic() <= 0:
                return last_exc or TimeoutError("no CONNACK")
            try:
                client.connect(self.url.host, self.url.port, self._keepalive)
                break
            except (OSError, ssl.SSLError, ValueError) as exc:
                last_exc = exc
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        client.loop_start()
        if not self._answered.wait(max(0.0, connack_deadline - time.monotonic())):
            return _NoConnack(f"no CONNACK from the broker; is {self.url.port} an MQTT "
                                f"port{' with TLS' if self.url.tls else ''}?")
        if self._connected.is_set():
            self.protocol = "5" if v5 else "3.1.1"
            return None
        return self._last_rc

    def _stop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception:  # a half-open client may throw anything; we drop it
                log.debug("ignored error disconnecting a failed client", exc_info=True)
            client.loop_stop()
        self._connected.clear()

    # ----------------------------------------------------------- paho callbacks (network thread)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        # Runs on paho's network thread: an exception escaping here kills that thread
        # for good (paho re-raises), so nothing may escape.
        try:
            self._connected_cb(client, flags, rc, props)
        except Exception:
            log.exception("error handling CONNACK from %s (ignored)", self.url.redacted())
            self._answered.set()

    def _connected_cb(self, client: mqtt.Client, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._last_rc = rc
            self._answered.set()
            if _value(rc) in _LOGIN_REFUSED | _PROTOCOL_REFUSED:
                client.disconnect()      # stop paho's retry loop; connect() reports it
            level = logging.INFO if _value(rc) in _PROTOCOL_REFUSED else logging.WARNING
            log.log(level, "broker %s refused the connection: %s", self.url.redacted(), rc)
            return
        size = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self._broker_max_packet = size
        self.session_present = bool(getattr(flags, "session_present", False))
        subs = self._subs.items()
        if subs:
            client.subscribe([(p, q) for p, q in subs])
        with self._out:                 # qos 0 packets queued before a reconnect are gone
            self._reap(drop_qos0=True)
            self._out.notify_all()
        self._connects += 1
        self._connected.set()
        self._answered.set()
        log.info("connected to %s (%d subscriptions%s)", self.url.redacted(), len(subs),
                 ", reconnect" if self._connects > 1 else "")
        if self._connects > 1 and self._listeners:
            threading.Thread(target=self._notify_reconnect, daemon=True,
                             name=f"reconnect-{self.client_id[:24]}").start()

    def _notify_reconnect(self) -> None:
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:
                log.exception("reconnect listener %r failed", cb)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
        try:
            self._disconnected_cb(rc)
        except Exception:
            log.exception("error handling a disconnect (ignored)")

    def _disconnected_cb(self, rc: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if not self._answered.is_set():
            self._last_rc = ConnectionAbortedError(f"broker closed the connection before "
                                                   f"answering CONNECT ({rc})")
            self._answered.set()
        with self._out:
            self._out.notify_all()
        if was and not self._closed:
            log.warning("lost connection to %s (%s); reconnecting", self.url.redacted(), rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropped a message with a non-UTF-8 topic")
            return
        try:
            self._dispatcher.put(topic, msg.payload, bool(msg.retain))
        except Exception:
            log.exception("could not queue a message on %s", topic)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any,
                    props: Any) -> None:
        try:
            with self._out:
                self._out.notify_all()
        except Exception:
            log.exception("error in on_publish (ignored)")

    # ----------------------------------------------------------- bus API
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                timeout: float = 30.0) -> mqtt.MQTTMessageInfo:
        """Queue a message; returns paho's MessageInfo (``wait_for_publish`` from a
        non-paho thread only). Blocks the caller (never paho's thread) while more
        than ``max_outgoing_bytes`` are unsent."""
        try:
            validate_publish_topic(topic)
        except WireError as exc:
            raise TransportError(str(exc)) from exc
        if qos not in (0, 1, 2):
            raise TransportError(f"qos must be 0, 1 or 2, not {qos!r}")
        if not isinstance(payload, (bytes, bytearray)):
            payload = bytes(payload)
        size = len(payload)
        limit = self.max_payload
        if self._broker_max_packet:
            limit = min(limit, self._broker_max_packet - len(topic.encode()) - 64)
        if size > limit:
            raise TransportError(f"payload of {size} bytes on {topic} exceeds the {limit}-byte "
                                 "limit (bus max_payload or the broker's max_packet_size); "
                                 "send it in chunks (wire.codec.encode_chunks)")
        client = self._client
        if client is None or self._closed:
            raise TransportError(f"bus to {self.url.redacted()} is closed; create a new one")
        if qos == 0 and not self._connected.is_set():
            raise TransportError(f"not connected to {self.url.redacted()} (reconnecting); "
                                 "retry later or publish with qos=1 to have it queued")
        self._wait_room(size, timeout)
        try:
            info = client.publish(topic, payload, qos, retain)
        except (OSError, ValueError, RuntimeError, ssl.SSLError) as exc:
            # a socket broken under paho: the network thread reconnects; qos >= 1 is
            # queued by paho only when it returned an info, so report this one
            raise TransportError(f"publish to {topic} failed: {exc}; the connection to "
                                 f"{self.url.redacted()} is being re-established") from exc
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0:
            return info                  # lost with the connection, as qos 0 may be
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        with self._out:
            self._pending.append((info, size, qos))
            self._pending_bytes += size
        return info

    def _on_paho_thread(self) -> bool:
        client = self._client
        return client is not None and threading.current_thread() is getattr(client, "_thread",
                                                                              None)

    def _reap(self, drop_qos0: bool = False) -> None:
        pending = self._pending
        while pending and (_is_done(pending[0][0], pending[0][2])
                           or (drop_qos0 and pending[0][2] == 0)):
            self._pending_bytes -= pending.popleft()[1]

    def _wait_room(self, size: int, timeout: float) -> None:
        if self._on_paho_thread():
            return
        deadline = time.monotonic() + timeout
        with self._out:
            self._reap()
            while self._pending and self._pending_bytes + size > self._max_outgoing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"{self._pending_bytes} bytes still unsent to "
                                         f"{self.url.redacted()} after {timeout:g} s; the link "
                                         "or broker is too slow (or down)")
                self._out.wait(min(remaining, 0.5))
                self._reap()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is sent (qos 0) or acknowledged (qos 1/2)."""
        if self._on_paho_thread():
            return False
        deadline = time.monotonic() + timeout
        with self._out:
            self._reap()
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._out.wait(min(remaining, 0.5))
                self._reap()
        return True

    def subscribe(self, pattern: str, handler: Handler, qos: int = 0) -> None:
        try:
            validate_filter(pattern)
        except WireError as exc:
            raise TransportError(str(exc)) from exc
        self._subs.add(pattern, handler, qos)
        # always (re)SUBSCRIBE: the broker then re-sends the retained records, so a
        # handler added to a pattern already subscribed sees them too
        client = self._client
        if client is not None and self._connected.is_set():
            qos = max(q for p, q in self._subs.items() if p == pattern)
            client.subscribe(pattern, qos)

    def unsubscribe(self, pattern: str) -> None:
        if self._subs.remove(pattern):
            client = self._client
            if client is not None and self._connected.is_set():
                client.unsubscribe(pattern)

    def close(self, final: Will | None = None, timeout: float = 5.0) -> None:
        """Clean disconnect (the broker sends no will). ``final``, e.g. an offline
        state, is published at qos >= 1 and waited for first. Never raises: a bus
        that cannot say goodbye is closed anyway."""
        if self._closed:
            return
        try:
            if final is not None and self._connected.is_set():
                try:
                    self.publish(final.topic, final.payload, max(1, final.qos), final.retain)
                except TransportError as exc:
                    log.warning("could not publish the final message: %s", exc)
            wait = timeout if self._connected.is_set() else min(timeout, 0.5)
            if not self.flush(wait):
                log.warning("closing %s with unsent messages", self.url.redacted())
        except Exception:
            log.exception("error while closing the bus to %s (ignored)", self.url.redacted())
        finally:
            self._closed = True
            try:
                self._stop_client()
                self._dispatcher.stop(timeout)
            except Exception:
                log.exception("error stopping the bus to %s (ignored)", self.url.redacted())

    def __enter__(self) -> "PahoBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_done(info: mqtt.MQTTMessageInfo, qos: int) -> bool:
    """Sent (qos 0) or acknowledged (qos >= 1); never raises. paho 2.x's
    ``is_published()`` raises RuntimeError for a message published while
    disconnected (rc MQTT_ERR_NO_CONN) even though paho queued it (qos >= 1) and
    sends it after the reconnect; it marks it published then."""
    if info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_AGAIN:
        try:
            return info.is_published()
        except (RuntimeError, ValueError):
            return True
    if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
        cond = getattr(info, "_condition", None)
        if cond is None:
            return True
        with cond:
            return bool(getattr(info, "_published", True))
    return True                     # qos 0 lost with the connection, or refused by paho


def _value(rc: Any) -> Any:
    return getattr(rc, "value", rc)


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Turn off Nagle's algorithm on every (re)connect: paho leaves it on, and a small
    publish that follows a PUBACK then waits ~40 ms for the broker's delayed TCP ack."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):   # not a TCP socket (websockets, tests)
        pass
