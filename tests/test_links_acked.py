"""A sender on no emulated link (the client) starts its retransmission timer once the
broker acknowledged its frames: in a device's namespace its own uplink may be slow, and
a timer started at the publish resent inputs still crossing it (issue 11)."""
from __future__ import annotations

import threading

from meshdl.node.emulation import Links
from proc_util import wait_for


class Handle:
    """Like paho's MQTTMessageInfo: published once the broker's PUBACK arrived."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.rc = 0

    def is_published(self) -> bool:
        return self._done.is_set()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def ack(self) -> None:
        self._done.set()


def recording() -> tuple[list[Handle], object]:
    """A publish that returns a fresh ack handle per frame, and the handles."""
    handles: list[Handle] = []

    def publish(topic, payload):
        handles.append(Handle())
        return handles[-1]
    return handles, publish


def test_on_sent_waits_for_the_broker_acks_of_every_frame():
    handles, publish = recording()
    links = Links("client-x", publish)
    sent = threading.Event()
    try:
        links.send("src", [("t", b"a"), ("t", b"b")], sent.set)
        assert len(handles) == 2
        handles[0].ack()
        assert not sent.wait(0.3)            # the second frame is still on the way
        handles[1].ack()
        assert sent.wait(5.0)
    finally:
        links.stop()


def test_on_sent_at_once_without_acks_and_after_a_failed_publish():
    links = Links("client-y", lambda t, p: None)
    sent = threading.Event()
    links.send("src", [("t", b"a")], sent.set)
    assert sent.is_set()                     # nothing to wait for: as before
    links.stop()

    class Failed(Handle):
        def is_published(self) -> bool:
            raise RuntimeError("publish failed: no connection")
    links = Links("client-z", lambda t, p: Failed())
    sent = threading.Event()
    try:
        links.send("src", [("t", b"a")], sent.set)
        assert sent.wait(5.0)                # the retransmission timer decides then
    finally:
        links.stop()


def test_sends_complete_in_order_and_stop_ends_the_waiter():
    handles, publish = recording()
    links = Links("client-w", publish)
    order: list[int] = []
    links.send("a", [("t", b"1")], lambda: order.append(1))
    links.send("b", [("t", b"2")], lambda: order.append(2))
    handles[0].ack()
    handles[1].ack()
    assert wait_for(lambda: order == [1, 2])
    links.send("c", [("t", b"3")], lambda: order.append(3))     # never acked
    links.stop()
    assert wait_for(lambda: links._acker is not None and not links._acker.is_alive())
    assert order == [1, 2]
