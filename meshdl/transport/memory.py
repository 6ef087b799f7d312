"""In-memory broker and bus: MQTT semantics (wildcards, retained messages, wills)
without a network, for unit tests of node logic.

``MemoryBroker`` routes; each ``MemoryBus`` is one client with its own dispatcher
thread, like ``PahoBus``. ``crash()`` simulates a dead client (its will is
published); ``close()`` is a clean disconnect (no will).
"""
from __future__ import annotations

import itertools
import logging
import threading

from meshdl.errors import TransportError
from meshdl.transport.bus import Dispatcher, Handler, Subscriptions, Will
from meshdl.wire.topics import topic_matches, validate_filter, validate_publish_topic

log = logging.getLogger(__name__)


class MemoryBroker:
    def __init__(self, max_payload: int = 64 << 20) -> None:
        self.max_payload = max_payload
        self._lock = threading.RLock()
        self._clients: dict[str, "MemoryBus"] = {}
        self._retained: dict[str, bytes] = {}
        self._ids = itertools.count(1)

    def bus(self, client_id: str | None = None, will: Will | None = None) -> "MemoryBus":
        return MemoryBus(self, client_id or f"mem-{next(self._ids)}", will)

    def retained(self, pattern: str = "#") -> dict[str, bytes]:
        with self._lock:
            return {t: p for t, p in self._retained.items() if topic_matches(pattern, t)}

    # ----------------------------------------------------------- internal
    def _attach(self, bus: "MemoryBus") -> None:
        with self._lock:
            old = self._clients.get(bus.client_id)
            self._clients[bus.client_id] = bus
        if old is not None and old is not bus:      # MQTT: a duplicate id takes over
            old._detach(send_will=True)

    def _detach(self, bus: "MemoryBus", will: Will | None) -> None:
        with self._lock:
            if self._clients.get(bus.client_id) is bus:
                del self._clients[bus.client_id]
        if will is not None:
            self._route(will.topic, bytes(will.payload), will.retain)

    def _route(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets = [c for c in self._clients.values() if c._wants(topic)]
        for client in targets:
            client._deliver(topic, payload, False)

    def _subscribed(self, bus: "MemoryBus", pattern: str) -> None:
        with self._lock:
            stored = [(t, p) for t, p in self._retained.items() if topic_matches(pattern, t)]
        for topic, payload in stored:
            bus._deliver(topic, payload, True)


class MemoryBus:
    """A ``Bus`` connected to a ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker, client_id: str, will: Will | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self._will = will
        self._subs = Subscriptions()
        self._patterns: set[str] = set()
        self._plock = threading.Lock()
        self._dispatcher = Dispatcher(self._subs, f"membus-{client_id}")
        self._connected = threading.Event()
        self._closed = False
        broker._attach(self)
        self._connected.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        validate_publish_topic(topic)
        if not self.connected:
            raise TransportError(f"memory bus {self.client_id} is not connected")
        data = bytes(payload)
        if len(data) > self.broker.max_payload:
            raise TransportError(f"payload of {len(data)} bytes exceeds the "
                                 f"{self.broker.max_payload}-byte limit; chunk it")
        self.broker._route(topic, data, retain)

    def subscribe(self, pattern: str, handler: Handler, qos: int = 0) -> None:
        validate_filter(pattern)
        self._subs.add(pattern, handler, qos)
        with self._plock:
            self._patterns.add(pattern)
        if self.connected:
            self.broker._subscribed(self, pattern)

    def unsubscribe(self, pattern: str) -> None:
        self._subs.remove(pattern)
        with self._plock:
            self._patterns.discard(pattern)

    def crash(self) -> None:
        """Die without a clean disconnect: the broker publishes the will."""
        self._detach(send_will=True)

    def close(self, final: Will | None = None, timeout: float = 5.0) -> None:
        if self._closed:
            return
        if final is not None and self.connected:
            self.publish(final.topic, final.payload, final.qos, final.retain)
        self._detach(send_will=False)
        self._closed = True
        self._dispatcher.stop(timeout)

    # ----------------------------------------------------------- internal
    def _detach(self, send_will: bool) -> None:
        if not self._connected.is_set():
            return
        self._connected.clear()
        self.broker._detach(self, self._will if send_will else None)

    def _wants(self, topic: str) -> bool:
        with self._plock:
            return any(topic_matches(p, topic) for p in self._patterns)

    def _deliver(self, topic: str, payload: bytes, retained: bool) -> None:
        if self.connected:
            self._dispatcher.put(topic, payload, retained)

    def __enter__(self) -> "MemoryBus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
