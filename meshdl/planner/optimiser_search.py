"""Candidates, scoring and the Pareto archive shared by ``meshdl`` and ``optimal``.

A candidate is a tuple of stages ``(a, b, spatial, devices, rows)``: ops [a, b) on
``devices``; a spatial stage with several devices is cut into full-width row bands of
``rows`` output rows each (band i on devices[i], devices in the pool's canonical
order so that consecutive stages on the same devices keep their data local); one
device runs the stage whole. Routes are the mesh's fastest paths.

``Search.evaluate`` simulates a candidate once and caches its (latency, energy);
the objective ``alpha * latency / latency_ref + (1 - alpha) * energy / energy_ref``
(references: the whole model on the source) is computed from the cache for the
current ``alpha``, so one search can be steered by several alphas in turn. Every
evaluated candidate goes through a Pareto archive of (latency, energy); the
minimum of any such objective over everything evaluated lies on that archive.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan, Region
from meshdl.graph.tiling import make_stage, split_ratio
from meshdl.planner.base import PlanRequest
from meshdl.planner.optimiser_moves import INF, Moves, Stage_
from meshdl.planner.simulate import RunResult, Simulator



class Search(Moves):
    """Candidate construction, scoring and the (latency, energy) archive; the local
    search moves come from ``Moves``."""

    def __init__(self, g, mesh, req: PlanRequest, pool: Sequence[str] | None = None,
                 pool_size: int = 10, max_hops: int = 3) -> None:
        self.g, self.mesh, self.req = g, mesh, req
        self.sim = Simulator(g, mesh, req.options.get("wire"))   # wire: compressed pieces
        self.src = self.sim.dev(req.source)
        self.snk = self.sim.dev(req.sink)
        self.alpha = float(req.alpha)
        # candidate -> (latency, energy, run) or (INF, INF, None) when it does not fit
        self.cache: dict[tuple, tuple[float, float, RunResult | None]] = {}
        self.front: list[tuple] = []   # the Pareto archive: (lat, e, size, n, cand)
        self._tasks: dict[tuple, object] = {}
        self.evaluations = 0
        # improve(): a device that joins and falls this close gets its rows balanced
        self.slack = float(req.options.get("slack", 0.05))
        ref = self.sim.run(self.sim.compile([(0, len(g.ops), [
            (self.src, None, None, g.flops)])], self.src, self.snk))
        self.lat_ref = max(ref.latency, 1e-12)
        self.e_ref = max(ref.energy, 1e-12)
        self.est_t: dict[int, float] = {}
        self.est_e: dict[int, float] = {}
        self.pool = ([self.sim.dev(d) for d in pool] if pool is not None
                     else self._prune(pool_size, max_hops))
        self.order = {d: i for i, d in enumerate(self.pool)}

    # ----- candidate devices -------------------------------------------------------
    def path_time(self, a: int, b: int, nbytes: float) -> float:
        if a == b:
            return 0.0
        links = self.sim.links
        return sum(links[(u, v)][1] + nbytes * links[(u, v)][2]
                   for _, u, v in self.sim.hops(a, b))

    def path_energy(self, a: int, b: int, nbytes: float) -> float:
        if a == b:
            return 0.0
        sim = self.sim
        return sum((sim.links[(u, v)][1] + nbytes * sim.links[(u, v)][2])
                   * (sim.p_tx[u] + sim.p_rx[v]) for _, u, v in sim.hops(a, b))

    def _estimate(self, d: int, share: int) -> tuple[float, float]:
        """(time, energy) for device d taking 1/share of the model (whole for energy)."""
        g, sim = self.g, self.sim
        in_b, out_b = g.tensor_bytes(0), g.tensor_bytes(len(g.ops))
        t = (g.flops / share / sim.flops[d] + self.path_time(self.src, d, in_b / share)
             + self.path_time(d, self.snk, out_b))
        e = (g.flops * sim.p_comp[d] / sim.flops[d] + self.path_energy(self.src, d, in_b)
             + self.path_energy(d, self.snk, out_b))
        return t, e

    def _prune(self, k: int, max_hops: int) -> list[int]:
        """Source, sink and the k devices that look most useful: two thirds ranked by an
        estimate of the time to take a share of the work, the rest by the energy to take
        all of it (so low-power devices are candidates whatever alpha is asked for).
        Canonical order: by the time estimate."""
        sim = self.sim
        near = self._near(max_hops)
        share = min(4, max(1, len(near)))
        for d in near:
            self.est_t[d], self.est_e[d] = self._estimate(d, share)
        by_t = sorted(near, key=lambda d: (self.est_t[d], sim.ids[d]))
        by_e = sorted(near, key=lambda d: (self.est_e[d], sim.ids[d]))
        keep = list(dict.fromkeys([self.src, self.snk]))
        n_t = len(keep) + max(1, (2 * k + 2) // 3)
        for ranked, limit in ((by_t, n_t), (by_e, len(keep) + k), (by_t, len(keep) + k)):
            for d in ranked:
                if len(keep) >= limit:
                    break
                if d not in keep:
                    keep.append(d)
        return sorted(set(keep), key=lambda d: (self.est_t[d], sim.ids[d]))

    def _near(self, max_hops: int) -> list[int]:
        """Devices within max_hops of the source or the sink (BFS on the link table)."""
        adj: dict[int, list[int]] = {}
        for (u, v) in self.sim.links:
            adj.setdefault(u, []).append(v)
        seen = {self.src: 0, self.snk: 0}
        frontier = [self.src, self.snk]
        for depth in range(1, max_hops + 1):
            nxt = []
            for u in frontier:
                for v in sorted(adj.get(u, ())):
                    if v not in seen:
                        seen[v] = depth
                        nxt.append(v)
            frontier = nxt
        return sorted(seen)

    def energy_ranked(self) -> list[int]:
        """Pool devices, least energy estimate first."""
        if not self.est_e:
            for d in self.pool:
                self.est_t[d], self.est_e[d] = self._estimate(d, 1)
        return sorted(self.pool, key=lambda d: (self.est_e.get(d, INF), self.order[d]))

    # ----- segmentations -------------------------------------------------------------
    def cut_candidates(self, a: int, b: int, max_cands: int = 6) -> list[int]:
        """Interior positions of spatial run [a, b) right after the resolution drops."""
        g = self.g
        pos = [p for p in g.positions if a <= p <= b]
        out = [q for p, q in zip(pos, pos[1:]) if a < q < b
               and g.tensor_shape(q)[-2] < g.tensor_shape(p)[-2]]
        if len(out) > max_cands:     # keep an even spread by FLOPs
            total = g.flops_between(a, b)
            picks = []
            for i in range(1, max_cands + 1):
                target = g.flops_between(0, a) + total * i / (max_cands + 1)
                best = min(out, key=lambda q: abs(g.flops_between(0, q) - target))
                if best not in picks:
                    picks.append(best)
            out = sorted(picks)
        return out

    def segmentations(self, max_cuts: int = 3) -> list[tuple[tuple[int, int, bool], ...]]:
        g = self.g
        parts: list[list[tuple]] = []       # per region of the model: its options
        at = 0
        for a, b in list(g.spatial_runs) + [(len(g.ops), len(g.ops))]:
            if at < a:
                parts.append([tuple(self._fit_whole(at, a))])
            if a < b:
                cands = self.cut_candidates(a, b)
                opts = []
                for n in range(0, min(max_cuts, len(cands)) + 1):
                    for cuts in combinations(cands, n):
                        bounds = [a, *cuts, b]
                        opts.append(tuple((p, q, True) for p, q in zip(bounds, bounds[1:])))
                parts.append(opts)
            at = b
        segs: list[tuple] = [()]
        for opts in parts:
            segs = [s + o for s in segs for o in opts]
        return segs

    def _fit_whole(self, a: int, b: int) -> list[tuple[int, int, bool]]:
        """[a, b) as whole stages, split where no pool device holds the weights."""
        g = self.g
        cap = max(self.sim.memory[d] for d in self.pool)
        pos = [p for p in g.positions if a <= p <= b]
        out, start = [], a
        for p, q in zip(pos, pos[1:]):
            if g.weight_bytes_between(p, q) + g.tensor_bytes(p) + g.tensor_bytes(q) > cap:
                raise PlanError(
                    f"ops [{p}, {q}) of {g.name} need "
                    f"{(g.weight_bytes_between(p, q) + g.tensor_bytes(p)) / 2**20:.1f} MiB "
                    f"but the largest candidate device has {cap / 2**20:.1f} MiB; no device "
                    "can hold them: add a device with more memory")
            if g.weight_bytes_between(start, q) + g.tensor_bytes(start) \
                    + g.tensor_bytes(q) > cap:
                out.append((start, p, False))
                start = p
        out.append((start, b, False))
        return out

    # ----- building ------------------------------------------------------------------------
    def rows_for(self, b: int, devs: Sequence[int], weights: Sequence[float] | None = None
                 ) -> tuple[int, ...] | None:
        if len(devs) <= 1:
            return None
        key = ("rows", b, tuple(devs))
        if weights is None and key in self._tasks:
            return self._tasks[key]
        h = self.g.tensor_shape(b)[-2]
        w = weights if weights is not None else [self.sim.flops[d] for d in devs]
        rows = tuple(split_ratio(h, w))
        if weights is None:
            self._tasks[key] = rows
        return rows

    def stage(self, a: int, b: int, spatial: bool, devs: Sequence[int],
              weights: Sequence[float] | None = None) -> Stage_:
        devs = tuple(sorted(set(devs), key=lambda d: self.order.get(d, 1 << 30)))
        if spatial and len(devs) > 1:
            devs = devs[:self.g.tensor_shape(b)[-2]]
            return (a, b, True, devs, self.rows_for(b, devs, weights))
        return (a, b, spatial, devs[:1], None)

    def uniform(self, seg: Sequence[tuple[int, int, bool]], devs: Sequence[int],
                whole_dev: int) -> tuple:
        return tuple(self.stage(a, b, sp, devs if sp else (whole_dev,))
                     for a, b, sp in seg)

    def tasks(self, st: Stage_) -> list:
        a, b, spatial, devs, rows = st
        key = (a, b, devs, rows)
        got = self._tasks.get(key)
        if got is None:
            if rows is None:
                got = [(devs[0], None, None, self.g.flops_between(a, b))]
            else:
                got, h0 = [], 0
                w = self.g.tensor_shape(b)[-1]
                for d, n in zip(devs, rows):
                    if n <= 0:
                        continue
                    rp = self.g.region_plan(a, b, Region(h0, h0 + n, 0, w))
                    got.append((d, (h0, h0 + n, 0, w), tuple(rp.input_region.to_list()),
                                rp.flops))
                    h0 += n
            self._tasks[key] = got
        return got

    def fits(self, cand: tuple) -> bool:
        """Every device holds the weights of its stages and its largest task's data."""
        w: dict[int, int] = {}
        mem = self.sim.memory
        for st in cand:
            wb = self.g.weight_bytes_between(st[0], st[1])
            for d in st[3]:
                w[d] = w.get(d, 0) + wb
        if any(n > mem[d] for d, n in w.items()):
            return False
        w = {}
        act: dict[int, int] = {}
        for st in cand:
            wb, need = self._memory(st)
            for d, n in need.items():
                w[d] = w.get(d, 0) + wb
                if n > act.get(d, 0):
                    act[d] = n
        return all(w[d] + act[d] <= mem[d] for d in w)

    def _memory(self, st: Stage_) -> tuple[int, dict[int, int]]:
        key = ("mem", st[0], st[1], st[3], st[4])
        got = self._tasks.get(key)
        if got is None:
            a, b = st[0], st[1]
            need: dict[int, int] = {}
            for d, o, i, _ in self.tasks(st):
                n = self.sim.region_bytes(a, i) + self.sim.region_bytes(b, o)
                need[d] = max(need.get(d, 0), n)
            got = (self.g.weight_bytes_between(a, b), need)
            self._tasks[key] = got
        return got

    # ----- scoring -------------------------------------------------------------------------
    def objective(self, latency: float, energy: float, alpha: float | None = None) -> float:
        if latency >= INF:
            return INF
        a = self.alpha if alpha is None else alpha
        return a * latency / self.lat_ref + (1.0 - a) * energy / self.e_ref

    def score(self, cand: tuple) -> tuple[float, float, RunResult | None]:
        """(latency, energy, run) of a candidate, simulated once."""
        got = self.cache.get(cand)
        if got is not None:
            return got
        if not self.fits(cand):
            got = (INF, INF, None)
        else:
            prog = self.sim.compile([(st[0], st[1], self.tasks(st)) for st in cand],
                                    self.src, self.snk,
                                    keys=[(st[0], st[1], st[3], st[4]) for st in cand])
            r = self.sim.run(prog)
            self.evaluations += 1
            got = (r.latency, r.energy, r)
            self._archive(r.latency, r.energy, cand)
        self.cache[cand] = got
        return got

    def bound(self, cand: tuple) -> float:
        """A lower bound of the objective without simulating: no device computes less
        than its tasks' FLOPs take, nor spends less than their compute energy."""
        got = self.cache.get(cand)
        if got is not None:
            return self.objective(got[0], got[1])
        sim = self.sim
        comp: dict[int, float] = {}
        for st in cand:
            for d, _, _, f in self.tasks(st):
                comp[d] = comp.get(d, 0.0) + f / sim.flops[d]
        return self.objective(max(comp.values()),
                              sum(t * sim.p_comp[d] for d, t in comp.items()))

    def evaluate(self, cand: tuple) -> tuple[float, RunResult | None]:
        """(objective at the current alpha, run)."""
        lat, e, r = self.score(cand)
        return self.objective(lat, e), r

    def _archive(self, lat: float, e: float, cand: tuple) -> None:
        """Keep the non-dominated candidates; of equal scores, the one with the fewest
        tasks and stages (then the first found)."""
        size = (sum(len(st[3]) for st in cand), len(cand))
        for p in self.front:
            if p[0] <= lat and p[1] <= e and (p[0] < lat or p[1] < e or p[2] <= size):
                return
        self.front = [p for p in self.front if not (lat <= p[0] and e <= p[1])]
        self.front.append((lat, e, size, self.evaluations, cand))

    def pick(self, alpha: float | None = None) -> tuple | None:
        """The archived candidate with the least objective (ties: the simplest, then the
        earliest found)."""
        if not self.front:
            return None
        return min(self.front, key=lambda p: (self.objective(p[0], p[1], alpha), p[2],
                                              p[3]))[4]

    def pareto(self) -> list[tuple[float, float]]:
        return sorted((p[0], p[1]) for p in self.front)

    def to_plan(self, cand: tuple, strategy: str) -> Plan:
        g, ids = self.g, self.sim.ids
        stages = []
        for k, st in enumerate(cand):
            tiles = [(None if o is None else Region(*o), ids[d])
                     for d, o, _, _ in self.tasks(st)]
            stages.append(make_stage(g, k, st[0], st[1], tiles))
        plan = Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops),
                    stages=stages, source=self.req.source, sink=self.req.sink,
                    strategy=strategy)
        for s in plan.stages:
            for t in s.tasks:
                pairs = [(p.device, t.device) for p, _ in plan.producers(t)]
                if s.index == 0:
                    pairs.append((plan.source, t.device))
                if s.index == len(plan.stages) - 1:
                    pairs.append((t.device, plan.sink))
                plan.routes.update({f"{x}>{y}": self.mesh.route(x, y) for x, y in pairs
                                    if x != y})
        return plan


__all__ = ["Search", "INF", "Stage_"]
