"""Link estimates that follow a real step within two samples and do not flap on noise.

Pure functions over one figure of one link (throughput in bit/s, or an RTT in s): the
prober keeps an ``Estimate`` per figure and feeds it each probe sample.

- A sample within the band around the estimate (ratio ``1 + threshold`` either way,
  and at least ``floor`` away for small figures) joins the window; the estimate moves
  to the window's median once that is more than ``deadband`` away (so figures, and
  the probe paddings sized from them, hold still under noise); a lone outlier beyond
  the band is held as *pending* and changes nothing.
- ``confirm`` consecutive samples beyond the band on the same side are a step: the
  estimate jumps to the newest of them (the first may be only a bound: a probe that
  timed out) and the window restarts from them (no waiting for a median of old
  samples to turn over).
- A sample taken while this node's own data traffic was crossing the link (``loaded``)
  is noise (the pings queue behind the data, by varying amounts): it is skipped unless
  ``max_skip`` loaded samples were already skipped in a row (a link busy all the time
  is still measured). A probe that found the link saturated (its empty ping queued)
  is not *loaded*: the rate the link carried meanwhile is then the measurement.

So a step persisting ``confirm`` probes is published within ``confirm`` probe periods;
noise inside the band never moves the estimate by more than the band, and an outlier
pair on opposite sides never confirms. Emitted figures change only on steps or
within the band, so the leader's own threshold (vs the plan's mesh) is the hysteresis.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class EstimatorParams:
    threshold: float = 0.5     # a step: the sample is beyond value x (1 + threshold) or / it
    confirm: int = 2           # consecutive samples beyond the band on one side
    window: int = 5            # in-band samples kept; the estimate is their median
    max_skip: int = 3          # loaded samples skipped in a row before one counts
    floor: float = 0.0         # absolute band half-width floor (e.g. 2 ms for RTTs)
    deadband: float = 0.1      # the window's median moves the estimate only past this

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and self.confirm >= 1 and self.window >= 1
                and self.max_skip >= 0 and self.floor >= 0 and self.deadband >= 0):
            raise ValueError(f"bad estimator parameters {self!r}")


@dataclass(frozen=True)
class Estimate:
    value: float | None = None          # None: no sample yet
    window: tuple[float, ...] = ()      # in-band samples, newest last
    pending: tuple[float, ...] = ()     # consecutive out-of-band samples on one side
    skipped: int = 0                    # loaded samples skipped in a row
    steps: int = 0                      # confirmed steps so far


def side(value: float, sample: float, p: EstimatorParams) -> int:
    """+1 above the band around ``value``, -1 below it, 0 within it."""
    hi = max(value * (1.0 + p.threshold), value + p.floor)
    lo = min(value / (1.0 + p.threshold), value - p.floor)
    return 1 if sample > hi else -1 if sample < lo else 0


def update(est: Estimate, sample: float, p: EstimatorParams = EstimatorParams(),
           loaded: bool = False) -> Estimate:
    """The estimate after one more sample (unusable samples change nothing)."""
    if not (isinstance(sample, (int, float)) and math.isfinite(sample) and sample >= 0):
        return est
    sample = float(sample)
    if est.value is None:
        if loaded and est.skipped < p.max_skip:
            return replace(est, skipped=est.skipped + 1)
        return Estimate(sample, (sample,), (), 0, est.steps)
    if loaded and est.skipped < p.max_skip:
        return replace(est, skipped=est.skipped + 1)
    s = side(est.value, sample, p)
    confirms = bool(est.pending) and side(est.value, est.pending[-1], p) == s
    if s == 0:
        window = (est.window + (sample,))[-p.window:]
        m = float(statistics.median(window))
        value = m if abs(m - est.value) > p.deadband * est.value else est.value
        return Estimate(value, window, (), 0, est.steps)
    pending = (est.pending + (sample,)) if confirms else (sample,)
    if len(pending) >= p.confirm:     # the newest: the confirming probe is sized for
        return Estimate(pending[-1], pending, (), 0, est.steps + 1)     # the new level
    return replace(est, pending=pending, skipped=0)


def run(samples, p: EstimatorParams = EstimatorParams(),
        loaded=None) -> list[Estimate]:
    """The estimate after each of ``samples`` (``loaded``: flags, same length)."""
    est, out = Estimate(), []
    for i, x in enumerate(samples):
        est = update(est, x, p, bool(loaded[i]) if loaded is not None else False)
        out.append(est)
    return out


def parse_net_dev(text: str) -> tuple[int, int]:
    """Bytes (received, sent) on every interface but loopback, from /proc/net/dev."""
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep or name.strip() == "lo":
            continue
        f = rest.split()
        if len(f) >= 9:
            rx, tx = rx + int(f[0]), tx + int(f[8])
    return rx, tx


def interface_bytes() -> tuple[int, int] | None:
    """Bytes (received, sent) on this network namespace's interfaces (None: unknown)."""
    try:
        with open("/proc/self/net/dev") as fh:
            return parse_net_dev(fh.read())
    except (OSError, ValueError):
        return None


def probe_loaded(moved: int | None, probe_bytes: int, slack: int = 8 << 10) -> bool:
    """Did other traffic cross the interfaces during a probe that moved
    ``probe_bytes`` itself (payload; ~10% headers and small control messages allowed)?"""
    return moved is not None and moved > 1.1 * probe_bytes + slack


def passive_series_bps(rx: int, tx: int, elapsed_s: float) -> float:
    """The series rate (up then down, as a self-probe measures it) a busy access link
    at least has: its busier direction carried this much, and a symmetric link's
    series rate is half of one direction's."""
    return 0.0 if elapsed_s <= 0 else max(rx, tx) * 8.0 / elapsed_s / 2.0


__all__ = ["Estimate", "EstimatorParams", "interface_bytes", "parse_net_dev",
           "passive_series_bps", "probe_loaded", "run", "side", "update"]
