"""Emulated links share one thread (issue 12: one thread pool, not a thread per peer),
and still pace every hop to its bandwidth and latency."""
from __future__ import annotations

import threading
import time

from meshdl.node.emulation import Links
from proc_util import wait_for


class Published:
    def __init__(self):
        self.items: list[tuple[float, str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, topic, payload):
        with self.lock:
            self.items.append((time.monotonic(), topic, len(payload)))

    def count(self):
        with self.lock:
            return len(self.items)


def test_many_next_hops_keep_the_thread_count_bounded():
    pub = Published()
    before = threading.active_count()
    links = Links("a", pub, lambda a, b: (1e9, 0.001))
    try:
        for i in range(1500):
            links.send(f"hop{i}", [(f"t/{i}", b"x" * 100)])
            links.send_small(f"hop{i}", f"ack/{i}", b"a")
        assert threading.active_count() - before <= 2
        assert wait_for(lambda: pub.count() == 3000, 30)
        assert threading.active_count() - before <= 2
        assert links.lanes() <= 257                # idle lanes are forgotten
    finally:
        links.stop()


def test_a_hop_is_paced_to_its_bandwidth_and_hops_run_in_parallel():
    """1 MB over an 8 Mbit/s hop takes ~1 s (+ latency); a second hop at the same time
    is not serialised behind it; frames of one hop keep their order."""
    pub = Published()
    figures = {"b": (8e6, 0.05), "c": (8e6, 0.05)}
    links = Links("a", pub, lambda a, b: figures[b])
    done = {}
    try:
        t0 = time.monotonic()
        for hop in ("b", "c"):
            frames = [(f"{hop}/{i}", b"x" * 100_000) for i in range(10)]
            links.send(hop, frames, lambda hop=hop: done.setdefault(hop, time.monotonic()))
        assert wait_for(lambda: len(done) == 2, 30)
        for hop in ("b", "c"):
            took = done[hop] - t0
            assert 0.95 * 1.05 <= took < 3.0, (hop, took)     # S/B + latency, loose
            mine = [t for _, t, _ in pub.items if t.startswith(hop + "/")]
            assert mine == [f"{hop}/{i}" for i in range(10)]
        assert abs(done["b"] - done["c"]) < 0.5              # in parallel, not in series
    finally:
        links.stop()


def test_star_downlink_holds_each_frame_for_its_transfer_time():
    pub = Published()
    star = {"a": (8e6, 4e6, 0.02)}
    links = Links("a", pub, lambda a, b: (8e6, 0.0), access=lambda d: star.get(d))
    got = []
    try:
        t0 = time.monotonic()
        for i in range(5):
            links.downlink(100_000, i == 0, lambda i=i: got.append((i, time.monotonic())))
        assert wait_for(lambda: len(got) == 5, 30)
        assert [i for i, _ in got] == list(range(5))
        took = got[-1][1] - t0                  # 500 KB at 4 Mbit/s + 20 ms = 1.02 s
        assert 1.0 <= took < 3.0, took
    finally:
        links.stop()
