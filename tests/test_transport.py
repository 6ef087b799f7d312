"""Transport against real brokers (mosquitto; the core flows also on amqtt) and MemoryBus."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import make_tls_files
from meshdl.errors import TransportError
from meshdl.transport.broker import EmbeddedBroker
from meshdl.transport.bus import Bus, Will
from meshdl.transport.memory import MemoryBroker
from meshdl.transport.paho_bus import PahoBus
from meshdl.transport.urls import parse_url
from meshdl.wire import topics

DEADLINE = 10.0


class Inbox:
    """Collects messages; wait(pred) returns once a matching one arrived."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, bool, str]] = []
        self._cond = threading.Condition()

    def __call__(self, topic, payload, retained) -> None:
        with self._cond:
            self.items.append((topic, bytes(payload), retained, threading.current_thread().name))
            self._cond.notify_all()

    def wait(self, pred=lambda item: True, timeout: float = DEADLINE):
        with self._cond:
            ok = self._cond.wait_for(lambda: any(pred(i) for i in self.items), timeout)
        assert ok, f"no matching message within {timeout} s; got {self.items[:5]}"
        return next(i for i in self.items if pred(i))


def _payload(p: bytes):
    return lambda item: item[1] == p


def sync(pub: PahoBus, inbox: Inbox, topic: str) -> None:
    """Publish a marker and wait for it: earlier messages from pub have arrived by then."""
    marker = os.urandom(8)
    pub.publish(topic, marker, qos=1)
    inbox.wait(_payload(marker))


def subscribed(bus, inbox: Inbox, pattern: str, probe_topic: str) -> None:
    """Subscribe and prove the subscription is live (the broker delivers a probe)."""
    bus.subscribe(pattern, inbox)
    marker = os.urandom(8)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        bus.publish(probe_topic, marker, qos=1)
        with inbox._cond:
            if inbox._cond.wait_for(lambda: any(i[1] == marker for i in inbox.items), 0.2):
                return
    raise AssertionError("subscription never became live")


# ------------------------------------------------------------------ url parsing
@pytest.mark.parametrize("url,expect", [
    ("mqtt://h:1884", ("mqtt", "h", 1884, None, None)),
    ("mqtts://u:p%40ss@broker.lan", ("mqtts", "broker.lan", 8883, "u", "p@ss")),
    ("127.0.0.1", ("mqtt", "127.0.0.1", 1883, None, None)),
])
def test_parse_url(url, expect):
    u = parse_url(url)
    assert (u.scheme, u.host, u.port, u.username, u.password) == expect
    assert "p@ss" not in u.redacted()


@pytest.mark.parametrize("url", ["http://h", "mqtt://", "mqtt://h:99999", "mqtt://h/x", ""])
def test_parse_url_rejects(url):
    with pytest.raises(TransportError):
        parse_url(url)


# ------------------------------------------------------------------ memory bus
def test_memory_bus_semantics():
    broker = MemoryBroker()
    state = topics.node_state("m", "a")
    will = Will(state, b"offline", qos=1, retain=True)
    a = broker.bus("a", will=will)
    b = broker.bus("b")
    assert isinstance(a, Bus)
    a.publish(state, b"online", retain=True)
    inbox = Inbox()
    b.subscribe(topics.node_state_all("m"), inbox)
    topic, payload, retained, thread = inbox.wait(_payload(b"online"))
    assert retained and thread != threading.current_thread().name
    route = Inbox()
    b.subscribe(topics.route_inbox("m", "b"), route)
    a.publish(topics.route_topic("m", ["b"], "j1", "p0"), b"x")
    assert route.wait()[0].endswith("/route/b/j1/p0")
    a.crash()
    assert inbox.wait(_payload(b"offline"))[2] is False
    assert broker.retained(state)[state] == b"offline"
    with pytest.raises(TransportError):
        a.publish(state, b"again")
    c = broker.bus("c", will=Will(topics.node_state("m", "c"), b"dead"))
    c.close(final=Will(topics.node_state("m", "c"), b"bye", retain=True))
    inbox.wait(_payload(b"bye"))
    b.unsubscribe(topics.node_state_all("m"))
    broker.bus("d").publish(topics.node_state("m", "d"), b"unheard")
    assert not any(i[1] in (b"dead", b"unheard") for i in inbox.items)
    b.close()


# ------------------------------------------------------------------ mosquitto core
def test_pubsub_roundtrip_and_big_payload(mosquitto):
    with PahoBus(mosquitto) as sub, PahoBus(mosquitto) as pub:
        assert sub.protocol == "5" and sub.connected
        inbox = Inbox()
        subscribed(sub, inbox, "meshdl/v1/t/#", "meshdl/v1/t/probe")
        big = os.urandom(1 << 20)
        pub.publish("meshdl/v1/t/big", big, qos=1)
        topic, payload, retained, thread = inbox.wait(lambda i: i[0] == "meshdl/v1/t/big")
        assert payload == big and not retained and "dispatch" in thread
        with pytest.raises(TransportError, match="chunks"):
            pub.publish("meshdl/v1/t/huge", b"\0" * (pub.max_payload + 1))
        with pytest.raises(TransportError):
            pub.publish("meshdl/v1/+/bad", b"")


def test_qos0_burst_of_1mib_pieces(mosquitto):
    n = 64
    with PahoBus(mosquitto) as sub, PahoBus(mosquitto) as pub:
        inbox = Inbox()
        subscribed(sub, inbox, "meshdl/v1/burst/#", "meshdl/v1/burst/probe")
        blob = os.urandom(1 << 20)
        t0 = time.perf_counter()
        for i in range(n):
            pub.publish(f"meshdl/v1/burst/{i}", blob)
        inbox.wait(lambda i: i[0] == f"meshdl/v1/burst/{n - 1}", timeout=30)
        dt = time.perf_counter() - t0
        got = sum(1 for i in inbox.items if i[0] != "meshdl/v1/burst/probe")
        assert got == n, f"lost {n - got} of {n} pieces"
        print(f"qos0 1 MiB x {n}: {n / dt:.0f} MiB/s")


def test_retained_late_subscriber(mosquitto):
    state = topics.node_state("m", "n1")
    with PahoBus(mosquitto) as pub:
        pub.publish(state, b"online", qos=1, retain=True)
        assert pub.flush(DEADLINE)
    with PahoBus(mosquitto) as late:
        inbox = Inbox()
        late.subscribe(topics.node_state_all("m"), inbox)
        topic, payload, retained, _ = inbox.wait()
        assert (topic, payload, retained) == (state, b"online", True)


WILL_CHILD = textwrap.dedent("""
    import sys, time
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.transport.bus import Will
    bus = PahoBus(sys.argv[1], will=Will(sys.argv[2], b"offline", qos=1, retain=True),
                  keepalive=60)
    print("ready", flush=True)
    time.sleep(60)
""")


def _will_on_sigkill(url: str) -> None:
    state = topics.node_state("m", "victim")
    with PahoBus(url) as watcher:
        inbox = Inbox()
        subscribed(watcher, inbox, topics.mesh_all("m"), topics.election("m"))
        child = subprocess.Popen([sys.executable, "-c", WILL_CHILD, url, state],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            os.kill(child.pid, signal.SIGKILL)
            t0 = time.monotonic()
            inbox.wait(lambda i: i[0] == state and i[1] == b"offline")
            assert time.monotonic() - t0 < 5.0     # not a keepalive timeout
        finally:
            child.kill()
            child.wait(5)


def test_will_on_sigkill(mosquitto):
    _will_on_sigkill(mosquitto)


def test_clean_close_sends_final_not_will(mosquitto):
    state = topics.node_state("m", "polite")
    with PahoBus(mosquitto) as watcher:
        inbox = Inbox()
        subscribed(watcher, inbox, topics.mesh_all("m"), topics.election("m"))
        node = PahoBus(mosquitto, will=Will(state, b"will"))
        node.close(final=Will(state, b"offline-clean", qos=1, retain=True))
        inbox.wait(_payload(b"offline-clean"))
        with PahoBus(mosquitto) as other:
            sync(other, inbox, topics.election("m"))
        assert not any(i[1] == b"will" for i in inbox.items)


def test_reconnect_resubscribes_after_broker_restart(mosquitto_broker):
    url = mosquitto_broker.url
    with PahoBus(url, reconnect_delay=(0.05, 0.2)) as sub, \
            PahoBus(url, reconnect_delay=(0.05, 0.2)) as pub:
        inbox = Inbox()
        subscribed(sub, inbox, "meshdl/v1/r/#", "meshdl/v1/r/probe")
        mosquitto_broker.restart()
        assert sub.wait_connected(DEADLINE) and pub.wait_connected(DEADLINE)
        deadline = time.monotonic() + DEADLINE
        while not any(i[1] == b"after" for i in inbox.items):
            assert time.monotonic() < deadline, "no delivery after the restart"
            try:
                pub.publish("meshdl/v1/r/x", b"after", qos=1)
            except TransportError:
                pass
            with inbox._cond:
                inbox._cond.wait(0.2)


def test_publish_while_broker_down_never_raises_or_wedges(mosquitto_broker):
    """paho 2.x queues a QoS-1 publish made while disconnected (rc NO_CONN) and its
    is_published() raises RuntimeError: the bus must neither raise nor wedge later
    publishes, must reconnect, send the queued messages and tell its listeners."""
    url = mosquitto_broker.url
    with PahoBus(url, reconnect_delay=(0.05, 0.2)) as bus:
        reconnected = threading.Event()
        bus.on_reconnect(reconnected.set)
        first = bus.connects
        mosquitto_broker.stop(cleanup=False)
        deadline = time.monotonic() + DEADLINE
        while bus.connected:
            assert time.monotonic() < deadline, "the bus never noticed the broker left"
            time.sleep(0.02)
        for i in range(20):                    # queued by paho: no exception
            bus.publish("meshdl/v1/q/down", b"%d" % i, qos=1, retain=True)
        with pytest.raises(TransportError, match="not connected"):
            bus.publish("meshdl/v1/q/zero", b"x", qos=0)
        assert not bus.flush(0.2)              # still queued, and flush does not raise
        mosquitto_broker.start()
        assert reconnected.wait(DEADLINE), "no reconnect listener call"
        assert bus.connects > first
        assert bus.flush(DEADLINE), "queued messages not sent after the reconnect"
        bus.publish("meshdl/v1/q/up", b"later", qos=1)
        assert bus.flush(DEADLINE)
    with PahoBus(url) as late:
        inbox = Inbox()
        late.subscribe("meshdl/v1/q/down", inbox, qos=1)
        assert inbox.wait(_payload(b"19"))[2], "the last queued message was lost"


def test_unreachable_broker_fails_fast_with_hint():
    from meshdl.transport.broker import free_port
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}.*broker running"):
        PahoBus(f"mqtt://127.0.0.1:{port}", connect_timeout=0.5)
    assert time.monotonic() - t0 < 3


# ------------------------------------------------------------------ auth, ACL, TLS, bridge
@pytest.fixture
def auth_broker(tmp_path):
    from conftest import _need_mosquitto
    _need_mosquitto()
    with EmbeddedBroker("auth", users={"alice": "s3cret", "bob": "hunter2"},
                        workdir=tmp_path / "auth") as b:
        yield b


def test_auth_refuses_wrong_password(auth_broker):
    url = auth_broker.url.replace("mqtt://", "mqtt://alice:wrong@")
    with pytest.raises(TransportError, match=r"refused the login.*password"):
        PahoBus(url, connect_timeout=5)
    with pytest.raises(TransportError, match="refused the login"):
        PahoBus(auth_broker.url, connect_timeout=5)        # anonymous
    with PahoBus(auth_broker.url, username="alice", password="s3cret") as ok:
        assert ok.connected


def test_acl_limits_users_to_meshdl_tree(auth_broker):
    with PahoBus(auth_broker.url, username="alice", password="s3cret") as sub, \
            PahoBus(auth_broker.url, username="bob", password="hunter2") as pub:
        inbox = Inbox()
        sub.subscribe("#", inbox)
        subscribed(sub, inbox, "meshdl/v1/#", "meshdl/v1/acl/probe")
        pub.publish("private/secret", b"leak", qos=1)
        pub.publish("meshdl/v1/acl/ok", b"fine", qos=1)
        inbox.wait(_payload(b"fine"))
        sync(pub, inbox, "meshdl/v1/acl/sync")
        assert not any(i[1] == b"leak" for i in inbox.items)


def test_python_hashed_password_file_works(tmp_path):
    from conftest import _need_mosquitto
    from meshdl.transport.passwords import make_password_file
    _need_mosquitto()
    pw = make_password_file(tmp_path / "pw", {"carol": "x y z"}, use_tool=False)
    with EmbeddedBroker("auth", files={"passwords": pw}, workdir=tmp_path / "b") as b:
        with PahoBus(b.url, username="carol", password="x y z") as bus:
            assert bus.connected


def test_tls(tmp_path):
    """tls.conf: TLS with client certificates as identity; no certificate, no entry."""
    from conftest import _need_mosquitto, make_client_cert
    _need_mosquitto()
    certs = make_tls_files(tmp_path / "certs")
    other = make_tls_files(tmp_path / "other")
    mine = make_client_cert(tmp_path / "certs", "alice")
    with EmbeddedBroker("tls", files=certs, workdir=tmp_path / "b") as b:
        assert b.url.startswith("mqtts://")
        with PahoBus(b.url, tls_ca=certs["ca.crt"], **mine) as sub, \
                PahoBus(b.url, tls_ca=certs["ca.crt"], **mine) as pub:
            inbox = Inbox()
            subscribed(sub, inbox, "meshdl/v1/tls/#", "meshdl/v1/tls/probe")
            pub.publish("meshdl/v1/tls/x", b"secret", qos=1)
            inbox.wait(_payload(b"secret"))
        with pytest.raises(TransportError, match="cannot connect"):
            PahoBus(b.url, tls_ca=other["ca.crt"], connect_timeout=1)
        with pytest.raises(TransportError, match="cannot connect"):
            PahoBus(b.url, tls_ca=certs["ca.crt"], connect_timeout=2)    # no certificate


def test_bridge_between_two_brokers(tmp_path):
    from conftest import _need_mosquitto
    _need_mosquitto()
    with EmbeddedBroker(workdir=tmp_path / "a") as a, \
            EmbeddedBroker("bridge", substitutions={"REMOTE_PORT": a.port},
                           users={"site": "s3cret"}, workdir=tmp_path / "b") as b:
        with pytest.raises(TransportError, match="refused the login"):
            PahoBus(b.url, connect_timeout=2)                # anonymous: refused
        with PahoBus(a.url) as on_a, PahoBus(b.url, username="site", password="s3cret") as on_b:
            inbox_a, inbox_b = Inbox(), Inbox()
            subscribed(on_a, inbox_a, "meshdl/v1/#", "meshdl/v1/probe/a")
            on_b.subscribe("meshdl/v1/#", inbox_b)
            deadline = time.monotonic() + DEADLINE        # the bridge comes up
            while not any(i[1] == b"up" for i in inbox_a.items):
                assert time.monotonic() < deadline, "the bridge never came up"
                on_b.publish("meshdl/v1/probe/b", b"up", qos=1)
                time.sleep(0.2)
            on_b.publish("meshdl/v1/m/leader", b"from-b", qos=1)
            inbox_a.wait(_payload(b"from-b"))
            on_a.publish("meshdl/v1/m/election", b"from-a", qos=1)
            inbox_b.wait(_payload(b"from-a"))


# ------------------------------------------------------------------ amqtt fallback
def test_amqtt_core_flows(amqtt_broker):
    url = amqtt_broker.url
    state = topics.node_state("m", "x")
    with PahoBus(url) as pub, PahoBus(url) as sub:
        assert pub.protocol == "3.1.1"            # amqtt refuses MQTT v5
        inbox = Inbox()
        subscribed(sub, inbox, "meshdl/v1/a/#", "meshdl/v1/a/probe")
        pub.publish("meshdl/v1/a/b", b"hello", qos=1)
        inbox.wait(_payload(b"hello"))
        pub.publish(state, b"online", qos=1, retain=True)
        assert pub.flush(DEADLINE)
        late_inbox = Inbox()
        sub.subscribe(topics.node_state_all("m"), late_inbox)
        assert late_inbox.wait()[1:3] == (b"online", True)
    _will_on_sigkill(url)


def test_embedded_broker_stop_really_stops():
    from meshdl.transport.broker import port_open
    for backend in ("amqtt", "mosquitto"):
        if backend == "mosquitto":
            from conftest import _need_mosquitto
            _need_mosquitto()
        b = EmbeddedBroker(backend=backend).start()
        port = b.port
        assert port_open("127.0.0.1", port)
        b.stop()
        assert not port_open("127.0.0.1", port)


def test_dispatcher_never_drops_when_a_lane_is_full():
    """A full inbound lane back-pressures the caller (the network thread) instead of
    dropping: a burst 20x the lane's size into a slow handler arrives whole, in order."""
    from meshdl.transport.bus import Dispatcher, Subscriptions
    subs = Subscriptions()
    got: list[bytes] = []
    done = threading.Event()

    def slow(topic, payload, retained):
        if not got:
            time.sleep(0.3)             # the lane fills while the first message is handled
        got.append(bytes(payload))
        if len(got) == 200:
            done.set()
    subs.add("meshdl/v1/d/#", slow, 1)
    d = Dispatcher(subs, "t", max_queued=10, block_s=0.05)
    try:
        for i in range(200):
            d.put("meshdl/v1/d/x", b"%d" % i, False)
        assert done.wait(DEADLINE)
        assert got == [b"%d" % i for i in range(200)]
        assert d.dropped == 0 and d.stalls > 0
    finally:
        d.stop()
