"""The cost model: a discrete-event simulation of one inference under a plan.

Model (DESIGN section 7), as implemented here:

- The model input sits on ``plan.source`` at t = 0. A stage-0 task needs its
  ``in_region`` of the input; a task of stage k > 0 needs the pieces
  ``plan.producers(task)``; the last stage's tiles go to ``plan.sink``. Latency is
  the time the sink holds the whole output.
- A piece of ``graph.tensor_bytes(pos, region)`` bytes travels hop by hop along
  ``plan.routes["a>b"]`` (else the mesh's fastest path), store-and-forward. A hop
  occupies its link, the sender's radio and the receiver's radio for
  ``latency + bytes * 8 / bandwidth`` seconds. Pieces between tasks on the same
  device are free and instant (so is a zero-byte piece).
- On a **star** mesh (``mesh.star``: every piece goes through the MQTT broker) a
  piece a -> b crosses a's uplink then b's downlink, store and forward through the
  broker (a hop on the broker's own device is free). Each device's uplink and downlink
  are separate resources; the devices of a shared medium (one Wi-Fi cell) all use one.
  A hop to or from the broker keeps only the device's radio busy (energy).
- Links are **half-duplex** shared resources (as Wi-Fi is: both directions share the
  one medium): a link carries one hop at a time, in FIFO order of the time the hop
  was requested (ties by request order). Devices relay for others while computing.
- A device computes one task at a time, FIFO by the time the task's last input
  arrived; a task takes ``task.flops / device.flops`` seconds.
- Energy per device: compute_w x compute time + tx_w x send time + rx_w x receive
  time (+ idle_w x (latency - busy time) for every device the plan touches when
  ``include_idle``; busy = compute + send + receive time, capped at latency).
- Peak memory per device: weights of the (distinct) stages it runs + its largest
  input + output activation of a single task.

The simulation is a heap of requests processed in time order (deterministic ties),
over a compiled, index-based form of the plan: ``Simulator`` keeps per-mesh and
per-graph tables so the optimisers can score thousands of candidates cheaply.
The event loop itself and the compiled form (``Program``, ``RunResult``) live in
``planner.sim_events``; they are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from meshdl.errors import PlanError, TopologyError
from meshdl.graph.plan import Plan
from meshdl.planner.reduce_cost import add_reduce_phases
from meshdl.planner.sim_events import (Program, RunResult,  # re-exported
                                       run_program, schedule_of)

@dataclass(frozen=True)
class Score:
    """What the cost model predicts for one plan (seconds, joules, bytes)."""

    latency_s: float
    energy_j: float
    energy_by_device: dict[str, float] = field(default_factory=dict)
    compute_s_by_device: dict[str, float] = field(default_factory=dict)
    busy_by_device: dict[str, float] = field(default_factory=dict)
    peak_memory_by_device: dict[str, int] = field(default_factory=dict)
    stage_finish_s: list[float] = field(default_factory=list)
    bytes_moved: int = 0          # bytes x hops: what the links carried
    transfers: int = 0            # pieces that crossed the mesh (>= 1 hop)
    over_memory: tuple[str, ...] = ()   # devices whose peak memory exceeds theirs
    # per-event schedule (only with ``simulate(..., schedule=True)``; not in to_dict):
    # {"tasks": {task id: (device, start_s, end_s)}, "transfers": [{"src": task id | "",
    #  "dst": task id | "", "bytes": n, "hops": [(u, v, start_s, end_s), ...]}]}
    schedule: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"latency_s": self.latency_s, "energy_j": self.energy_j,
                "energy_by_device": dict(self.energy_by_device),
                "compute_s_by_device": dict(self.compute_s_by_device),
                "busy_by_device": dict(self.busy_by_device),
                "peak_memory_by_device": dict(self.peak_memory_by_device),
                "stage_finish_s": list(self.stage_finish_s),
                "bytes_moved": int(self.bytes_moved), "transfers": int(self.transfers),
                "over_memory": list(self.over_memory)}


class Simulator:
    """Scores plans on one (graph, mesh). Keep one per planning call: it caches the
    mesh's link table, routes and the graph's per-position byte sizes."""

    def __init__(self, graph, mesh, wire=None) -> None:
        self.graph = graph
        self.mesh = mesh
        self.wire = wire         # a planner.wiremodel.WireModel: compressed pieces, or None
        self.ids = list(mesh.devices)
        self.index = {d: i for i, d in enumerate(self.ids)}
        devs = [mesh.devices[d] for d in self.ids]
        self.flops = [float(d.flops) for d in devs]
        self.memory = [int(d.memory_bytes) for d in devs]
        self.p_comp = [d.power.compute_w for d in devs]
        self.p_tx = [d.power.tx_w for d in devs]
        self.p_rx = [d.power.rx_w for d in devs]
        self.p_idle = [d.power.idle_w for d in devs]
        self.links: dict[tuple[int, int], tuple[int, float, float]] = {}
        for n, link in enumerate(mesh.links):
            a, b = self.index[link.a], self.index[link.b]
            entry = (n, float(link.latency_s), 8.0 / float(link.bandwidth_bps))
            self.links[(a, b)] = entry
            self.links[(b, a)] = entry
        self.n_links = len(mesh.links)
        self.star = mesh.star
        self.n_res = self.n_links
        self.names = self.ids + ["@broker"]       # index len(ids): the broker (no energy)
        if self.star is not None:
            n = len(self.ids)
            shared = self.n_links + 2 * n
            self._up: list[tuple[int, float, float] | None] = []
            self._down: list[tuple[int, float, float] | None] = []
            for i, d in enumerate(self.ids):
                acc = self.star.link_of(d)
                if acc is None:
                    self._up.append(None)
                    self._down.append(None)
                    continue
                inm = d in self.star.medium
                self._up.append((shared if inm else self.n_links + 2 * i, acc.latency_s,
                                 8.0 / acc.up_bps))
                self._down.append((shared if inm else self.n_links + 2 * i + 1,
                                   acc.latency_s, 8.0 / acc.down_bps))
            self.n_res = shared + 1
        self._routes: dict[tuple[int, int], tuple[tuple[int, int, int], ...]] = {}
        self._px: dict[int, tuple[int, int, int]] = {}   # position -> (bytes/pixel, H, W)
        self._edges: dict[Any, list[tuple[int, int, int]]] = {}
        self._hop_times: dict[tuple[int, int, int], tuple] = {}

    # ----- tables ---------------------------------------------------------------
    def dev(self, device_id: str) -> int:
        try:
            return self.index[device_id]
        except KeyError:
            raise PlanError(f"plan uses device {device_id!r}, which is not in mesh "
                            f"{self.mesh.name!r}; re-plan for this mesh") from None

    def region_bytes(self, pos: int, region) -> int:
        px = self._px.get(pos)
        if px is None:
            shape = self.graph.tensor_shape(pos)
            total = self.graph.tensor_bytes(pos)
            if len(shape) == 4:
                px = (total // (shape[-2] * shape[-1]), shape[-2], shape[-1])
            else:
                px = (total, 0, 0)
            self._px[pos] = px
        if region is None or px[1] == 0:
            return px[0] if px[1] == 0 else px[0] * px[1] * px[2]
        h = region[1] - region[0]
        w = region[3] - region[2]
        return px[0] * h * w if h > 0 and w > 0 else 0

    def hops(self, a: int, b: int, path: Sequence[str] | None = None
             ) -> tuple[tuple[int, int, int], ...]:
        """((link, u, v), ...) from a to b: along ``path`` when given, else the mesh's
        fastest path (cached)."""
        if path is None:
            key = (a, b)
            got = self._routes.get(key)
            if got is not None:
                return got
            try:
                path = self.mesh.route(self.ids[a], self.ids[b])
            except TopologyError as exc:
                raise PlanError(f"no route from {self.ids[a]!r} to {self.ids[b]!r}: {exc}"
                                ) from exc
            got = self._path_hops(path)
            self._routes[key] = got
            return got
        return self._path_hops(path)

    def _path_hops(self, path: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
        out = []
        for u, v in zip(path, path[1:]):
            iu, iv = self.dev(u), self.dev(v)
            entry = self.links.get((iu, iv))
            if entry is None:
                raise PlanError(f"route {list(path)} uses {u}-{v}, which is not a link of "
                                f"mesh {self.mesh.name!r}; re-plan or fix plan.routes")
            out.append((entry[0], iu, iv))
        return tuple(out)

    # ----- compiling ------------------------------------------------------------
    def compile(self, stages: Sequence[tuple[int, int, Sequence[tuple]]], source: int,
                sink: int, routes: dict[str, list[str]] | None = None,
                keys: Sequence[Any] | None = None) -> Program:
        """``stages``: [(start, end, [(device index, out_region, in_region, flops), ...]),
        ...] with regions as (h0, h1, w0, w1) tuples or None (whole). ``routes``
        ("a>b" -> path) override the mesh's fastest paths. ``keys``: optional hashable
        names of each stage's task list, to reuse the pieces between stage pairs."""
        routes = routes or {}
        links = self.links
        hop_cache = self._hop_times
        task_dev: list[int] = []
        task_dur: list[float] = []
        task_stage: list[int] = []
        n_inputs: list[int] = []
        out_tr: list[list[int]] = []
        tr_dest: list[int] = []
        tr_hops: list[tuple] = []
        tr_bytes: list[int] = []
        start: list[int] = []
        used: dict[int, None] = {source: None}
        wbytes: dict[int, int] = {}
        act: dict[int, int] = {}

        star = self.star is not None

        def transfer(a: int, b: int, nbytes: int, dest: int, pos: int = -1) -> int:
            if a == b or nbytes <= 0:
                hops: tuple = ()
            elif star:
                path = routes.get(f"{self.ids[a]}>{self.ids[b]}") if routes else None
                hkey = (a, b, nbytes, pos, None if path is None else tuple(path))
                hops = hop_cache.get(hkey)
                if hops is None:
                    hops = self._star_hops([a, b] if path is None
                                           else [self.dev(x) for x in path], nbytes, pos)
                    hop_cache[hkey] = hops
            else:
                path = routes.get(f"{self.ids[a]}>{self.ids[b]}") if routes else None
                if path is None:
                    hkey = (a, b, nbytes) if self.wire is None else (a, b, nbytes, pos)
                    hops = hop_cache.get(hkey)
                    if hops is None:
                        hops = self._hop_durations(self.hops(a, b), nbytes, pos)
                        hop_cache[hkey] = hops
                else:
                    hops = self._hop_durations(self.hops(a, b, path), nbytes, pos)
            tr_dest.append(dest)
            tr_hops.append(hops)
            tr_bytes.append(nbytes)
            return len(tr_dest) - 1

        base_prev = 0
        prev_tasks: Sequence[tuple] = ()
        for k, (a, b, tasks) in enumerate(stages):
            base = len(task_dev)
            wb = self.graph.weight_bytes_between(a, b)
            for dev, out_r, in_r, flops in tasks:
                task_dev.append(dev)
                task_dur.append(flops / self.flops[dev])
                task_stage.append(k)
                out_tr.append([])
                n_inputs.append(0)
                if dev not in used:
                    used[dev] = None
                need = self.region_bytes(a, in_r) + self.region_bytes(b, out_r)
                if need > act.get(dev, 0):
                    act[dev] = need
            for dev in {t[0] for t in tasks}:
                wbytes[dev] = wbytes.get(dev, 0) + wb
            if k == 0:
                for i, (dev, _, in_r, _) in enumerate(tasks):
                    start.append(transfer(source, dev, self.region_bytes(a, in_r), base + i,
                                          a))
                    n_inputs[base + i] = 1
            else:
                key = (keys[k - 1], keys[k]) if keys is not None else None
                edges = self._edges.get(key) if key is not None else None
                if edges is None:
                    edges = self._pieces(a, prev_tasks, tasks)
                    if key is not None:
                        self._edges[key] = edges
                for i, j, nbytes in edges:
                    p = base_prev + i
                    out_tr[p].append(transfer(task_dev[p], task_dev[base + j], nbytes,
                                              base + j, a))
                    n_inputs[base + j] += 1
            base_prev, prev_tasks = base, tasks
        last_end = stages[-1][1]
        for i, (_, out_r, _, _) in enumerate(prev_tasks):
            t = base_prev + i
            out_tr[t].append(transfer(task_dev[t], sink, self.region_bytes(last_end, out_r),
                                      -1, last_end))
        used.setdefault(sink, None)
        peak = {d: wbytes.get(d, 0) + act.get(d, 0) for d in used}
        prog = Program(task_dev, task_dur, task_stage, n_inputs, start, out_tr, tr_dest,
                       tr_hops, tr_bytes, len(stages), list(used), peak)
        add_reduce_phases(self, prog, stages, transfer)   # SE-style reduce points
        return prog

    def _hop_durations(self, hops: tuple, nbytes: int, pos: int) -> tuple:
        """((link, u, v, seconds), ...): latency + bytes / bandwidth per hop; with a
        wire model the bytes are the compressed ones and the first hop also carries
        the codec's time (compress at the sender, decompress at the receiver)."""
        links = self.links
        codec_s = 0.0
        if self.wire is not None:
            slowest = min(8.0 / links[(u, v)][2] for _, u, v in hops)
            nbytes, codec_s = self.wire.cost(pos, nbytes, slowest)
        return tuple((l, u, v, links[(u, v)][1] + nbytes * links[(u, v)][2]
                      + (codec_s if k == 0 else 0.0))
                     for k, (l, u, v) in enumerate(hops))

    def _star_hops(self, path: Sequence[int], nbytes: int, pos: int = -1) -> tuple:
        """Access hops of a piece along ``path`` (device indices) on a star mesh:
        uplink of each sender, downlink of each receiver, through the broker (with a
        wire model: compressed bytes, the codec's time on the first hop)."""
        raw = []
        broker = len(self.ids)
        for u, v in zip(path, path[1:]):
            if u == v:
                continue
            up, down = self._up[u], self._down[v]
            if up is not None:
                raw.append((up[0], u, broker, up[1], up[2]))
            if down is not None:
                raw.append((down[0], broker, v, down[1], down[2]))
        codec_s = 0.0
        if self.wire is not None and raw:
            slowest = min(8.0 / h[4] for h in raw)
            nbytes, codec_s = self.wire.cost(pos, nbytes, slowest)
        return tuple((r, u, v, lat + nbytes * per + (codec_s if k == 0 else 0.0))
                     for k, (r, u, v, lat, per) in enumerate(raw))

    def _pieces(self, pos: int, prev: Sequence[tuple], cur: Sequence[tuple]
                ) -> list[tuple[int, int, int]]:
        """(producer, consumer, bytes) for every piece between two stages' task lists
        (the overlap of the producer's tile and the consumer's input region)."""
        out = []
        for j, (_, _, in_r, _) in enumerate(cur):
            for i, (_, p_out, _, _) in enumerate(prev):
                if p_out is None or in_r is None:
                    piece = p_out if in_r is None else in_r
                else:
                    piece = (max(p_out[0], in_r[0]), min(p_out[1], in_r[1]),
                             max(p_out[2], in_r[2]), min(p_out[3], in_r[3]))
                    if piece[1] <= piece[0] or piece[3] <= piece[2]:
                        continue
                out.append((i, j, self.region_bytes(pos, piece)))
        return out

    def compile_plan(self, plan: Plan) -> Program:
        if not plan.stages:
            raise PlanError("plan has no stages; a plan must cover the model")
        stages = []
        for s in plan.stages:
            if not s.tasks:
                raise PlanError(f"stage {s.index} has no tasks")
            stages.append((s.start, s.end, [
                (self.dev(t.device),
                 None if t.out_region is None else tuple(t.out_region.to_list()),
                 None if t.in_region is None else tuple(t.in_region.to_list()),
                 float(t.flops)) for t in s.tasks]))
        return self.compile(stages, self.dev(plan.source), self.dev(plan.sink), plan.routes)

    # ----- the event loop -------------------------------------------------------
    def run(self, prog: Program, trace: bool = False) -> RunResult:
        return run_program(prog, self.n_res, self.p_comp, self.p_tx, self.p_rx, trace)

    # ----- scores -----------------------------------------------------------------
    def score(self, prog: Program, include_idle: bool = False,
              task_ids: Sequence[str] | None = None) -> Score:
        """``task_ids`` (the plan's task ids in stage order) also fills ``schedule``."""
        r = self.run(prog, trace=task_ids is not None)
        busy: dict[str, float] = {}
        energy: dict[str, float] = {}
        comp: dict[str, float] = {}
        involved = set(prog.devices_used)
        for d in range(len(self.ids)):
            b = r.compute_s[d] + r.tx_s[d] + r.rx_s[d]
            if b <= 0 and d not in involved:
                continue
            name = self.ids[d]
            e = (self.p_comp[d] * r.compute_s[d] + self.p_tx[d] * r.tx_s[d]
                 + self.p_rx[d] * r.rx_s[d])
            if include_idle:
                e += self.p_idle[d] * max(0.0, r.latency - b)
            busy[name], energy[name], comp[name] = b, e, r.compute_s[d]
        peak = {self.ids[d]: m for d, m in prog.peak_mem.items()}
        over = tuple(self.ids[d] for d, m in prog.peak_mem.items() if m > self.memory[d])
        return Score(latency_s=r.latency, energy_j=float(sum(energy.values())),
                     energy_by_device=energy, compute_s_by_device=comp, busy_by_device=busy,
                     peak_memory_by_device=peak, stage_finish_s=list(r.stage_finish),
                     bytes_moved=int(r.bytes_moved), transfers=r.transfers,
                     over_memory=over,
                     schedule={} if task_ids is None else self._schedule(prog, r, task_ids))

    def _schedule(self, prog: Program, r: RunResult, task_ids: Sequence[str]) -> dict:
        """Per-task and per-transfer times of a traced run, named by plan task ids."""
        return schedule_of(prog, r, task_ids, self.ids, self.names)


def simulate(plan: Plan, graph, mesh, bandwidth_cap_mbps: float | None = None,
             include_idle: bool = False, schedule: bool = False, wire=None) -> Score:
    """Predict latency, energy and the rest of ``Score`` for ``plan`` on ``mesh``.
    ``schedule=True`` also fills ``Score.schedule`` (when each task and hop runs).
    ``wire``: a ``planner.wiremodel.WireModel`` (compressed pieces), None = raw."""
    if plan.num_ops != len(graph.ops):
        raise PlanError(f"plan was made for {plan.model} ({plan.num_ops} ops), not "
                        f"{graph.name} ({len(graph.ops)} ops); re-plan for this model")
    if bandwidth_cap_mbps is not None:
        mesh = mesh.with_bandwidth_cap(bandwidth_cap_mbps)
    sim = Simulator(graph, mesh, wire)
    ids = [t.id for s in plan.stages for t in s.tasks] if schedule else None
    return sim.score(sim.compile_plan(plan), include_idle=include_idle, task_ids=ids)


__all__ = ["Score", "Simulator", "Program", "RunResult", "simulate"]
