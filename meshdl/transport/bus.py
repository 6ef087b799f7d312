"""The ``Bus`` protocol the rest of meshdl sees, and the dispatcher both buses share.

Handlers run on dispatcher threads, never on the network thread: a slow
handler delays its own dispatcher lane, not the connection. Messages of one
topic always go to the same lane, so per-topic order is kept. Nothing is
dropped here: a full lane makes the network thread wait (back-pressure onto the
TCP connection and the broker's queue), with a warning while it lasts.
"""
from __future__ import annotations

import logging
import queue
import secrets
import threading
import zlib
from dataclasses import dataclass
from typing import Callable, Protocol, Union, runtime_checkable

from meshdl.errors import TransportError
from meshdl.wire.topics import topic_matches

log = logging.getLogger(__name__)

Payload = Union[bytes, memoryview]
Handler = Callable[[str, Payload, bool], None]


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker if the connection dies without a clean close."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def private_client_id(prefix: str = "meshdl") -> str:
    """An MQTT client id nobody else can name: ``prefix`` + 64 random bits, published
    nowhere. A broker closes a connection when another connects with its client id,
    whatever the other's identity (mosquitto, measured: a stolen device bundle kicked a
    node whose id was ``meshdl-{node}-{session}-{4 hex of its published claim
    nonce}``, and its will told the mesh it had gone), so an id must not be derivable
    from anything a member can read."""
    return f"{prefix}-{secrets.token_hex(8)}"


@runtime_checkable
class Bus(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        ...

    def subscribe(self, pattern: str, handler: Handler, qos: int = 0) -> None:
        ...

    def unsubscribe(self, pattern: str) -> None:
        ...

    def close(self, final: "Will | None" = None, timeout: float = 5.0) -> None:
        ...

    @property
    def connected(self) -> bool:
        ...

    def wait_connected(self, timeout: float) -> bool:
        ...


class Subscriptions:
    """pattern -> (handlers, qos); thread-safe snapshot lookups."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[tuple[Handler, ...], int]] = {}

    def add(self, pattern: str, handler: Handler, qos: int) -> bool:
        """Add a handler; True: (re-)SUBSCRIBE at the broker. Always, so a second handler
        of a pattern also gets the retained records (the broker re-sends them on a
        repeated SUBSCRIBE; retained handlers are idempotent anyway: a reconnect re-sends
        them too)."""
        with self._lock:
            handlers, old_qos = self._subs.get(pattern, ((), -1))
            self._subs[pattern] = (handlers + (handler,), max(qos, old_qos))
            return True

    def remove(self, pattern: str) -> bool:
        with self._lock:
            return self._subs.pop(pattern, None) is not None

    def items(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(p, q) for p, (_, q) in self._subs.items()]

    def handlers_for(self, topic: str) -> list[Handler]:
        with self._lock:
            subs = list(self._subs.items())
        return [h for p, (hs, _) in subs if topic_matches(p, topic) for h in hs]


class Dispatcher:
    """Bounded lanes of (topic, payload, retained) drained by worker threads."""

    def __init__(self, subs: Subscriptions, name: str, lanes: int = 1,
                 max_queued: int = 10000, block_s: float = 5.0) -> None:
        if lanes < 1:
            raise TransportError("dispatch lanes must be >= 1")
        self._subs = subs
        self._block_s = block_s
        self._queues = [queue.Queue(max_queued) for _ in range(lanes)]
        self._threads = [threading.Thread(target=self._run, args=(q,), daemon=True,
                                          name=f"{name}-dispatch-{i}")
                         for i, q in enumerate(self._queues)]
        self.dropped = 0            # kept for callers; nothing is dropped any more
        self.stalls = 0             # times a full lane made the network thread wait
        for t in self._threads:
            t.start()

    def put(self, topic: str, payload: Payload, retained: bool) -> None:
        """Called from the network thread: waits for room (back pressure on the
        socket), warning every ``block_s`` while the lane stays full. Never drops."""
        lane = self._queues[zlib.crc32(topic.encode()) % len(self._queues)
                            if len(self._queues) > 1 else 0]
        item = (topic, payload, retained)
        waited = 0.0
        while True:
            try:
                lane.put(item, timeout=self._block_s)
                return
            except queue.Full:
                waited += self._block_s
                self.stalls += 1
                log.warning("inbound lane full for %.0f s (message on %s waits; the "
                            "connection is back-pressured): handlers are too slow", waited,
                            topic)

    def _run(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            topic, payload, retained = item
            for handler in self._subs.handlers_for(topic):
                try:
                    handler(topic, payload, retained)
                except Exception:
                    log.exception("handler %r failed on %s; message dropped", handler, topic)

    def stop(self, timeout: float = 5.0) -> None:
        """Let queued messages drain, then stop the lanes."""
        for q in self._queues:
            try:
                q.put(None, timeout=timeout)
            except queue.Full:
                log.warning("dispatcher lane still full at close; abandoning it")
        current = threading.current_thread()
        for t in self._threads:
            if t is not current:
                t.join(timeout)
