"""Node-to-node probe messages on ``meshdl/v1/{mesh}/node/{id}/probe``.

One small topic per node carries four kinds of message (msgpack maps, bounded and
validated like every control message):

- ``claim``: a starting process announces it wants to be node ``id`` (with its
  session); ``here``: the live owner of ``id`` answers a claim. Together they
  detect duplicate node ids before a birth is published (see ``membership``).
- ``ping`` / ``pong``: RTT and throughput probes between neighbours. A ping to
  node B is published on B's probe topic, B answers on the sender's.
- ``set_link``: debug/test control of an *emulated* node's link figures
  (``{"peer", "bandwidth_bps", "latency_s"}``); real nodes ignore it.

``Prober`` measures with ping/pong (re-exported by ``node.telemetry``). A link's rate
is the *slope* of time against size: a base ping padded past what the path lets
through at once (a token bucket's burst, a Wi-Fi aggregate, a 64 KB GSO packet) and
a bigger one, ``rate = crossings x extra bytes / extra time``; an empty ping gives the
RTT. A single padded ping against an empty one counted the free burst as speed: a
3 Mbit/s shaped link with a 16 KiB probe read ~1.3x fast (issue 11, docs/NOTES.md).
Paddings are sized from the last figure so the extra part takes ~``TARGET_EXTRA_S``.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

from meshdl.errors import WireError
from meshdl.wire.topics import node_probe as probe_topic, validate_id

log = logging.getLogger(__name__)
KINDS = ("claim", "here", "ping", "pong", "set_link")
MAX_PROBE_BYTES = 1 << 20
MAX_PAD = MAX_PROBE_BYTES - 4096


@dataclass(frozen=True)
class Probe:
    kind: str
    sender: str
    session: int = 0
    nonce: str = ""
    ts: float = 0.0
    pad: bytes = b""
    link: dict = field(default_factory=dict)


def encode_probe(p: Probe) -> bytes:
    if p.kind not in KINDS:
        raise WireError(f"probe kind {p.kind!r} is not one of {KINDS}")
    if len(p.pad) > MAX_PAD:
        raise WireError(f"probe padding of {len(p.pad)} bytes exceeds {MAX_PAD}")
    return msgpack.packb({"v": 1, "type": "probe", "kind": p.kind,
                          "from": validate_id(p.sender, "probe sender"), "session": p.session,
                          "nonce": p.nonce, "ts": p.ts, "pad": bytes(p.pad),
                          "link": dict(p.link)}, use_bin_type=True)


def decode_probe(payload: Any) -> Probe:
    """Decode and validate; raise WireError for anything off-contract."""
    size = len(payload)
    if size > MAX_PROBE_BYTES:
        raise WireError(f"probe of {size} bytes exceeds {MAX_PROBE_BYTES}")
    try:
        body = msgpack.unpackb(bytes(payload), raw=False, max_ext_len=0, max_str_len=size,
                               max_bin_len=size, max_array_len=64, max_map_len=64,
                               strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise WireError(f"undecodable probe: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != 1 or body.get("type") != "probe":
        raise WireError("not a v1 probe message")
    kind = body.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown probe kind {kind!r}")
    session, nonce, ts = body.get("session", 0), body.get("nonce", ""), body.get("ts", 0.0)
    pad, link = body.get("pad", b""), body.get("link", {})
    if type(session) is not int or session < 0 or not isinstance(nonce, str) \
            or len(nonce) > 64 or type(ts) not in (int, float) \
            or not isinstance(pad, bytes) or not isinstance(link, dict):
        raise WireError("probe fields have the wrong types")
    if kind == "set_link":
        peer, bw, lat = link.get("peer"), link.get("bandwidth_bps"), link.get("latency_s")
        validate_id(peer, "set_link peer")
        for v in (bw, lat):
            if v is not None and (type(v) not in (int, float) or v < 0):
                raise WireError("set_link figures must be non-negative numbers")
        if bw is not None and bw <= 0:
            raise WireError("set_link bandwidth_bps must be positive")
    return Probe(kind, validate_id(body.get("from"), "probe sender"), session, nonce,
                 float(ts), pad, link)


# ----------------------------------------------------------------- measurement
BROKER = "@broker"          # a node's own access link (self-probe through the broker)
SMALL_PAD = 64
BIG_PAD = 64 << 10          # extra padding of the first probe (no figure yet)
BASE_PAD = 16 << 10         # base padding of the first probe
MIN_BASE = 8 << 10
MIN_PAD = 16 << 10          # least extra padding
BASE_S = 0.006              # base padding: at least this long at the last rate (> a burst)
TARGET_EXTRA_S = 0.12       # extra padding sized to add ~this over all crossings
PROBE_TIMEOUT = 1.0
# a link that just slowed: the chain to a confirmed step is the wait for the next round
# (<= a period), the empty ping's timeout (a queue) or the padded ping's, the confirming
# probe's wait and its empty ping's timeout, then the leader's planning; each is kept short so a step is planned
# around within two telemetry periods (issue 11: 0.5 s + 0.25 period + 0.5 s made 2.3)
SLOW_FLOOR_S = 0.25         # least timeout of a padded ping (10x its expected time)
CONFIRM_TIMEOUT = 0.25      # the empty ping of a probe confirming a low sample (and the
                            # least wait of any empty ping once the quiet RTT is known)
CONFIRM_FRACTION = 0.1      # a sample beyond its estimate is re-probed this period fraction later
BIG_TIMEOUT = 3.0           # a padded probe slower than this: the link is at most pad/this
MIN_EXTRA_S = 0.002         # the probe cannot resolve a rate whose extra time is below this
SAMPLES = 5                 # median of the last probes per peer
DIR_EVERY = 3               # an access link's directions: every this many clean samples


def probe_figures(small_s: float, big_s: float, pad_bytes: int = BIG_PAD - SMALL_PAD,
                  crossings: int = 2) -> dict[str, float]:
    """RTT and throughput (bit/s) from two pings whose paddings differ by ``pad_bytes``,
    each crossing the path ``crossings`` times (ping there, pong back)."""
    extra = max(big_s - small_s, MIN_EXTRA_S)
    return {"rtt_s": small_s, "throughput_bps": crossings * pad_bytes * 8.0 / extra}


def median_figures(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(statistics.median(s[k] for s in samples)) for k in samples[-1]}


def probe_pads(last_bps: float | None, crossings: int = 2) -> tuple[int, int]:
    """(base, extra) padding for a probe of a path last measured at ``last_bps``: the
    base lasts ``BASE_S`` (past a burst), the extra ``TARGET_EXTRA_S`` over all crossings."""
    if last_bps is None or not last_bps > 0:
        return BASE_PAD, BIG_PAD
    base = int(min(MAX_PAD // 4, max(MIN_BASE, last_bps * BASE_S / 8)))
    extra = int(last_bps * TARGET_EXTRA_S / (8 * crossings))
    return base, int(min(MAX_PAD - base, max(MIN_PAD, extra)))


class Prober:
    """Measures RTT/throughput to peers with ping/pong probes over the broker."""

    def __init__(self, bus, mesh: str, me: str, session: int,
                 access_latency_s: float | None = None, *, threshold: float = 0.5,
                 traffic=None, on_step=None) -> None:
        """``access_latency_s`` set: measure this node's access link to the broker
        (shaped links) instead of peers; the value is the latency the node itself adds.
        Figures are step-detecting estimates (``node/linkestimate.py``, issue 11 d11):
        ``threshold`` the relative step they detect, ``traffic()`` bytes (received,
        sent) on this node's interfaces (a probe that saw other traffic is *loaded*),
        ``on_step()`` called after a confirmed step (publish telemetry now)."""
        from meshdl.node.linkestimate import EstimatorParams
        self._bus, self._mesh, self._me, self._session = bus, mesh, me, session
        self._access = access_latency_s
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[float]]] = {}
        self._results: dict[str, dict[str, float]] = {}
        self._est: dict[str, dict] = {}          # peer -> figure -> linkestimate.Estimate
        self._samples: dict[str, list[dict[str, float]]] = {}   # raw figures, last SAMPLES
        rate = EstimatorParams(threshold, window=SAMPLES)
        self._params = {"throughput_bps": rate, "up_bps": rate, "down_bps": rate,
                        "rtt_s": EstimatorParams(threshold, window=SAMPLES, floor=0.002)}
        # the access link's directions, each on its own (node/probe_dir.py)
        from meshdl.node.probe_dir import DirectionProbe
        self._dir = DirectionProbe(bus, mesh, me, MIN_EXTRA_S) \
            if access_latency_s is not None else None
        self._clean, self._shape_due = 0, False
        self._traffic, self._on_step = traffic, on_step
        self._quiet_rtt: dict[str, float] = {}   # empty-ping RTT on an idle link
        self._cursor = 0

    def on_pong(self, p: Probe) -> None:
        with self._lock:
            entry = self._waiting.get(p.nonce)
        if entry is not None:
            entry[1].append(time.perf_counter())
            entry[0].set()

    def _ping(self, peer: str, pad: int, timeout: float = PROBE_TIMEOUT) -> float | None:
        nonce = uuid.uuid4().hex[:16]
        done: tuple[threading.Event, list[float]] = (threading.Event(), [])
        with self._lock:
            self._waiting[nonce] = done
        try:
            t0 = time.perf_counter()
            self._bus.publish(probe_topic(self._mesh, peer),
                              encode_probe(Probe("ping", self._me, self._session, nonce,
                                                 time.time(), b"\0" * pad)))
            if not done[0].wait(timeout):
                return None
            return done[1][0] - t0
        finally:
            with self._lock:
                self._waiting.pop(nonce, None)

    def measure(self, peer: str) -> dict[str, float] | None:
        """Probe ``peer`` (``@broker``: this node's own access link); the figures feed
        the peer's step-detecting estimates, which are its result."""
        from meshdl.node import linkestimate as le
        target = self._me if peer == BROKER else peer
        with self._lock:
            est = self._est.get(peer, {}).get("throughput_bps")
        # paddings from the estimate (stable while it is), or from a pending low
        # sample (a link that just slowed answers the confirming probe quickly)
        rate = None if est is None or est.value is None else min((est.value,) + est.pending)
        low = est is not None and bool(est.pending) and min(est.pending) < est.value
        base_pad, extra_pad = probe_pads(rate)
        with self._lock:
            quiet = self._quiet_rtt.get(peer)
        # the empty ping: once the quiet RTT is known, waiting past 10x it only tells
        # that the link is busy (then the passive rate over the wait is the reading)
        wait = PROBE_TIMEOUT if quiet is None else min(
            PROBE_TIMEOUT, max(CONFIRM_TIMEOUT, 10 * quiet + 0.05))
        before = self._traffic() if self._traffic is not None else None
        t0 = time.perf_counter()
        small = self._ping(target, SMALL_PAD, CONFIRM_TIMEOUT if low else wait)
        # ten times a padding's expected time on the estimate already is a step
        slow = (lambda pad: BIG_TIMEOUT if not rate
                else min(BIG_TIMEOUT, max(SLOW_FLOOR_S, 10 * 2 * pad * 8 / rate)))
        base = big = None
        if small is not None:
            base = self._ping(target, base_pad, slow(base_pad))
            if base is not None:
                big = self._ping(target, base_pad + extra_pad, slow(base_pad + extra_pad))
        elapsed = time.perf_counter() - t0
        after = self._traffic() if before is not None else None
        moved = None if before is None or after is None else \
            (after[0] - before[0], after[1] - before[1])
        pads = SMALL_PAD + (0 if small is None else base_pad) + (
            0 if base is None else base_pad + extra_pad)
        loaded = le.probe_loaded(None if moved is None else sum(moved),
                                 (4 if peer == BROKER else 2) * pads)
        # other traffic, and the empty ping queued (timed out, or 2x + 20 ms over its
        # quiet RTT): the link was saturated, so what it carried meanwhile is its rate
        saturated = loaded and (small is None or (
            quiet is not None and small > 2 * quiet + 0.02))
        if small is None and not saturated:
            return None
        if saturated:
            fig = {"rtt_s": elapsed if small is None else small,
                   "throughput_bps": le.passive_series_bps(*moved, elapsed)}
            loaded = False
        else:
            if base is None:          # slower than the timeout allows: report that bound
                fig = probe_figures(small, elapsed, base_pad - SMALL_PAD)
            else:
                fig = probe_figures(base, elapsed if big is None else big, extra_pad)
                fig["rtt_s"] = small
            if not loaded:
                with self._lock:
                    self._quiet_rtt[peer] = small if quiet is None else min(
                        small, 0.8 * quiet + 0.2 * small)
        if peer == BROKER and not loaded and not saturated and big is not None:
            self._clean += 1        # the shape is measured every DIR_EVERY clean samples
            if (self._clean - 1) % DIR_EVERY == 0 or self._shape_due:
                fig.update(self._directions(fig["throughput_bps"]))
        if peer == BROKER:
            # the latency is the node's own (netem is absent; a veth adds ~0); a small
            # ping queued behind data on the shaped link would overstate it badly
            fig["rtt_s"] = 2.0 * (self._access or 0.0)
        with self._lock:
            samples = self._samples.setdefault(peer, [])
            samples.append(fig)
            del samples[:-SAMPLES]
            ests = self._est.setdefault(peer, {})
            stepped = False
            for key, val in fig.items():
                old = ests.get(key, le.Estimate())
                ests[key] = le.update(old, val, self._params[key], loaded)
                stepped |= ests[key].steps != old.steps
            self._results[peer] = {k: e.value for k, e in ests.items() if e.value is not None}
            result = dict(self._results[peer])
        log.debug("probe %s: %.4g Mbit/s%s%s -> %s (pings %s / %s / %s s of %.3f s, pads "
                  "%d + %d)", peer, fig["throughput_bps"] / 1e6, " (loaded)" if loaded else "",
                  " (saturated)" if saturated else "", result, small, base, big, elapsed,
                  base_pad, extra_pad)
        # a step of the series rate: measure the shape (which direction moved) next
        self._shape_due = (self._shape_due or stepped) and "up_bps" not in fig
        if stepped:
            log.info("link %s of %s: step to %.4g Mbit/s", peer, self._me,
                     result.get("throughput_bps", 0.0) / 1e6)
            if self._on_step is not None:
                self._on_step()
        return result

    def _directions(self, series_bps: float) -> dict[str, float]:
        """{"up_bps", "down_bps"} of the access link, each measured on its own, after
        a clean series sample (empty when not measured or when other traffic crossed
        meanwhile). The extra padding lasts ~TARGET_EXTRA_S / 2 on a direction at the
        series rate (each direction is at least that fast; a direction up to ~30x
        faster is still resolved)."""
        from meshdl.node import linkestimate as le
        if self._dir is None or not self._dir.enabled:
            return {}
        base, extra = probe_pads(series_bps, crossings=2)     # ~TARGET_EXTRA_S / 2 each
        before = self._traffic() if self._traffic is not None else None
        pair = self._dir.measure(base, extra, lambda n: min(
            BIG_TIMEOUT, max(SLOW_FLOOR_S, 10 * n * 8 / series_bps)))
        after = self._traffic() if before is not None else None
        if pair is None or (before is not None and after is not None and le.probe_loaded(
                after[0] - before[0] + after[1] - before[1], 2 * (2 * base + extra))):
            return {}
        return {"up_bps": pair[0], "down_bps": pair[1]}

    def stop(self) -> None:
        """Remove what the probes left on the broker (retained paddings)."""
        if self._dir is not None and self._dir.worked:
            self._dir.clear()

    def round(self, peers: list[str], count: int) -> None:
        """Probe ``count`` peers (round robin); forget peers that left. Measuring the
        access link: probe it once."""
        if self._access is not None:
            try:
                if self.measure(BROKER) is None:
                    log.debug("no answer to the access-link probe")
            except Exception as exc:      # a dead bus must not kill the probe thread
                log.debug("access probe failed: %s", exc)
            return
        peers = sorted(p for p in peers if p != self._me)
        with self._lock:
            self._results = {p: f for p, f in self._results.items() if p in peers}
            self._est = {p: f for p, f in self._est.items() if p in peers}
            self._samples = {p: f for p, f in self._samples.items() if p in peers}
        if not peers:
            return
        for i in range(min(count, len(peers))):
            peer = peers[(self._cursor + i) % len(peers)]
            try:
                if self.measure(peer) is None:
                    log.debug("no probe answer from %s", peer)
            except Exception as exc:  # a dead bus must not kill the probe thread
                log.debug("probe to %s failed: %s", peer, exc)
        self._cursor += count

    def next_wait(self, period: float) -> float:
        """Seconds until the next round: ``period``, or ``CONFIRM_FRACTION`` of it while
        a sample beyond an estimate waits to be confirmed (a step is seen within ~1.1
        periods at one probe a period)."""
        with self._lock:
            pending = any(e.pending for f in self._est.values() for e in f.values())
        return period * CONFIRM_FRACTION if pending else period

    def results(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {p: dict(f) for p, f in self._results.items()}
