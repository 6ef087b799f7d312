"""Streams of frames in the cost model: frames/s, per-frame latency, the bottleneck.

``simulate_stream(plans, graph, mesh, n_frames, rate_fps, window)`` runs the one
discrete-event model of ``planner.simulate`` over ``n_frames`` copies of a plan's
program at once: frame i's input leaves the source at its arrival time, every copy
shares the devices (one task at a time each, FIFO by ready time) and the links (one
hop at a time each), so frame n+1's stage k overlaps frame n's stage k+1 exactly as
far as the resources allow. ``plans`` may hold several plans (replicas): frames go to
them by smooth weighted round robin (``weights``, default the inverse of each plan's
bottleneck period), so a stage replicated on two devices is two plans that share the
other stages' devices.

Arrivals: frame i arrives at ``i / rate_fps`` (all at 0 with no rate); with a
``window`` W (credit) frame i is also not sent before frames 0..i-W are answered (the
stream hands answers over in order), found as a fixed point of the simulation
(arrival_i = max(i / rate, max_{j <= i-W} done_j)).

``bottleneck(plans, ...)`` is the analytic steady state: the busiest resource's work
per frame (compute seconds per device, hop seconds per link, weighted by each
replica's share of the frames); its inverse bounds the rate of any schedule.
Pure and deterministic, like the rest of ``planner/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan
from meshdl.planner.simulate import Program, Simulator


@dataclass(frozen=True)
class StreamScore:
    """What the cost model predicts for a stream of frames."""

    fps: float                      # steady-state frames per second
    latency_p50_s: float            # frame arrives at the source -> sink holds its answer
    latency_p95_s: float
    latency_mean_s: float
    makespan_s: float               # first arrival -> last answer
    frames: int
    period_s: float                 # analytic bottleneck period (1 / its rate bound)
    bottleneck: str                 # "compute on X" or "link a-b"
    replicas: int = 1
    done_s: tuple[float, ...] = field(default=(), compare=False)
    arrival_s: tuple[float, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"fps": self.fps, "latency_p50_s": self.latency_p50_s,
                "latency_p95_s": self.latency_p95_s, "latency_mean_s": self.latency_mean_s,
                "makespan_s": self.makespan_s, "frames": self.frames,
                "period_s": self.period_s, "bottleneck": self.bottleneck,
                "replicas": self.replicas}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    v = sorted(values)
    if not v:
        return 0.0
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def steady_fps(done: Sequence[float]) -> float:
    """Frames per second after the pipeline filled: the least-squares slope of answer
    time over answer count, over the middle half of the answers (all of them for short
    streams): the pipeline fills in the first quarter and drains faster in the last (the
    first stages are idle), and bursts of answers do not count as a higher rate."""
    d = sorted(done)
    n = len(d)
    if n < 2:
        return 1.0 / d[0] if n == 1 and d[0] > 0 else 0.0
    ys = d[n // 4:n - n // 4] if n >= 8 else d
    m = len(ys)
    xm = (m - 1) / 2.0
    ym = sum(ys) / m
    sxx = sum((i - xm) ** 2 for i in range(m))
    slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sxx
    return 1.0 / slope if slope > 0 else float("inf")


def round_robin(weights: Sequence[float], n: int) -> list[int]:
    """Smooth weighted round robin: which replica each of ``n`` frames goes to."""
    if not weights or any(w <= 0 for w in weights):
        raise PlanError(f"replica weights {list(weights)} must be positive")
    total = float(sum(weights))
    cur = [0.0] * len(weights)
    out = []
    for _ in range(n):
        for r, w in enumerate(weights):
            cur[r] += w
        pick = max(range(len(cur)), key=lambda r: (cur[r], -r))
        cur[pick] -= total
        out.append(pick)
    return out


# ------------------------------------------------------------------ analytic
def _loads(sim: Simulator, prog: Program) -> dict[str, float]:
    """Seconds of work per frame on each resource: compute per device, busy time per
    link (or, on a star mesh, per access link / shared medium)."""
    load: dict[str, float] = {}
    for d, dur in zip(prog.task_dev, prog.task_dur):
        key = f"compute on {sim.ids[d]}"
        load[key] = load.get(key, 0.0) + dur
    names = getattr(sim, "names", sim.ids)
    n_links = sim.n_links
    shared = n_links + 2 * len(sim.ids)
    label: dict[int, str] = {}
    for link in sim.mesh.links:
        label[len(label)] = f"link {link.a}-{link.b}"
    for hops in prog.tr_hops:
        for r, u, v, dur in hops:
            key = label.get(r)
            if key is None:
                if r == shared:
                    key = "shared medium"
                elif u >= len(sim.ids):
                    key = f"downlink of {names[v]}"
                else:
                    key = f"uplink of {names[u]}"
                label[r] = key
            load[key] = load.get(key, 0.0) + dur
    return load


def bottleneck_of(sim: Simulator, progs: Sequence[Program],
                  shares: Sequence[float]) -> tuple[float, str]:
    """(seconds of work per frame on the busiest resource, its name)."""
    total: dict[str, float] = {}
    for prog, share in zip(progs, shares):
        for key, v in _loads(sim, prog).items():
            total[key] = total.get(key, 0.0) + share * v
    if not total:
        return 0.0, "nothing"
    name = max(sorted(total), key=lambda k: total[k])
    return total[name], name


def _shares(weights: Sequence[float]) -> list[float]:
    s = float(sum(weights))
    return [w / s for w in weights]


def auto_weights(sim: Simulator, progs: Sequence[Program]) -> list[float]:
    """Each replica's weight: the inverse of its own bottleneck period."""
    return [1.0 / max(bottleneck_of(sim, [p], [1.0])[0], 1e-12) for p in progs]


def bottleneck(plans: Plan | Sequence[Plan], graph, mesh, wire=None,
               weights: Sequence[float] | None = None) -> tuple[float, str]:
    """Analytic steady-state period (seconds per frame) and the resource that sets it."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    sim = Simulator(graph, mesh, wire)
    progs = [sim.compile_plan(p) for p in plans]
    w = list(weights) if weights is not None else auto_weights(sim, progs)
    return bottleneck_of(sim, progs, _shares(w))


# ------------------------------------------------------------------ event model
def _merged(progs: Sequence[Program], assign: Sequence[int], arrivals: Sequence[float]
            ) -> tuple[Program, list[list[tuple[int, int]]]]:
    """One program holding every frame's copy; per frame its sink transfers as
    (transfer id, producer task id)."""
    td, tdur, tst, nin, start, start_at, out_tr = [], [], [], [], [], [], []
    dest, hops, nbytes = [], [], []
    used: dict[int, None] = {}
    sinks: list[list[tuple[int, int]]] = []
    n_stages = 0
    for i, r in enumerate(assign):
        p = progs[r]
        t0, r0 = len(td), len(dest)
        td += p.task_dev
        tdur += p.task_dur
        tst += [s + n_stages for s in p.task_stage]
        nin += p.n_inputs
        start += [tr + r0 for tr in p.start_transfers]
        start_at += [arrivals[i]] * len(p.start_transfers)
        out_tr += [[tr + r0 for tr in trs] for trs in p.out_transfers]
        dest += [d + t0 if d >= 0 else -1 for d in p.tr_dest]
        hops += p.tr_hops
        nbytes += p.tr_bytes
        n_stages += p.n_stages
        for d in p.devices_used:
            used.setdefault(d, None)
        producer = {tr: t for t, trs in enumerate(p.out_transfers) for tr in trs}
        sinks.append([(tr + r0, producer.get(tr, -1) + t0 if tr in producer else -1)
                      for tr, d in enumerate(p.tr_dest) if d < 0])
    prog = Program(td, tdur, tst, nin, start, out_tr, dest, hops, nbytes, n_stages,
                   list(used), dict(progs[0].peak_mem), start_at)
    return prog, sinks


def _done_times(sim: Simulator, progs: Sequence[Program], assign: Sequence[int],
                arrivals: Sequence[float]) -> list[float]:
    prog, sinks = _merged(progs, assign, arrivals)
    r = sim.run(prog, trace=True)
    done = []
    for i, trs in enumerate(sinks):
        t = arrivals[i]
        for tr, producer in trs:
            ht = r.hop_times[tr]
            if ht:
                t = max(t, ht[-1][1])
            elif producer >= 0:
                t = max(t, r.task_finish[producer])
        done.append(t)
    return done


def simulate_stream(plans: Plan | Sequence[Plan], graph, mesh, n_frames: int = 32,
                    rate_fps: float | None = None, window: int | None = None,
                    wire=None, weights: Sequence[float] | None = None,
                    bandwidth_cap_mbps: float | None = None) -> StreamScore:
    """Predict a stream of ``n_frames`` frames through ``plans`` (see the module doc)."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    if not plans:
        raise PlanError("simulate_stream needs at least one plan")
    if n_frames < 1 or n_frames > 100_000:
        raise PlanError(f"n_frames {n_frames} must be in [1, 100000]")
    if rate_fps is not None and not rate_fps > 0:
        raise PlanError(f"rate_fps {rate_fps} must be positive (or None: as fast as possible)")
    if window is not None and window < 1:
        raise PlanError(f"window {window} must be at least 1 frame")
    for p in plans:
        if p.num_ops != len(graph.ops):
            raise PlanError(f"plan was made for {p.model} ({p.num_ops} ops), not "
                            f"{graph.name} ({len(graph.ops)} ops); re-plan for this model")
    if bandwidth_cap_mbps is not None:
        mesh = mesh.with_bandwidth_cap(bandwidth_cap_mbps)
    sim = Simulator(graph, mesh, wire)
    progs = [sim.compile_plan(p) for p in plans]
    w = list(weights) if weights is not None else auto_weights(sim, progs)
    assign = round_robin(w, n_frames)
    base = [i / rate_fps if rate_fps else 0.0 for i in range(n_frames)]
    arrivals = list(base)
    done = _done_times(sim, progs, assign, arrivals)
    if window is not None:
        for _ in range(200):                   # fixed point: credit returns on answers
            # answers are handed over in order, so frame i's credit comes back when
            # every frame up to i - W is answered (a slow replica holds the window)
            released, upto = [], 0.0
            for d in done:
                upto = max(upto, d)
                released.append(upto)
            nxt = [max(base[i], released[i - window]) if i >= window else base[i]
                   for i in range(n_frames)]
            if all(abs(a - b) <= 1e-9 for a, b in zip(nxt, arrivals)):
                break
            arrivals = nxt
            done = _done_times(sim, progs, assign, arrivals)
    lat = [d - a for d, a in zip(done, arrivals)]
    period, name = bottleneck_of(sim, progs, _shares(w))
    return StreamScore(fps=steady_fps(done), latency_p50_s=percentile(lat, 50),
                       latency_p95_s=percentile(lat, 95),
                       latency_mean_s=sum(lat) / len(lat),
                       makespan_s=max(done) - min(arrivals), frames=n_frames,
                       period_s=period, bottleneck=name, replicas=len(plans),
                       done_s=tuple(done), arrival_s=tuple(arrivals))


__all__ = ["StreamScore", "bottleneck", "percentile", "round_robin", "simulate_stream",
           "steady_fps"]
