"""Strategy ``meshdl`` (the default): stage cuts, devices, tile rows and routes chosen
together, every candidate judged by the simulator.

A candidate is a tuple of stages ``(a, b, spatial, devices, rows)``: ops [a, b) on
``devices``; a spatial stage with several devices is cut into full-width row bands of
``rows`` output rows each (band i on devices[i], devices in the pool's canonical
order so that consecutive stages on the same devices keep their data local); one
device runs the stage whole. Routes are the mesh's fastest paths.

Search (bounded, pure, deterministic):
1. pool: the source, the sink and the best ``pool_size`` devices within a few hops
   (ranked by an estimate of the time to take a share of the work: compute plus the
   transfer from the source and to the sink);
2. segmentations: each spatial run cut at the positions where the resolution drops
   (after a pooling or strided op; at most ``max_cuts`` interior cuts); non-spatial
   parts whole, split further only when no device can hold their weights;
3. coarse pass: every segmentation with the top-m pool devices on all its spatial
   stages, for a few m; plus the whole model on each single device (local included);
4. fine pass on the best few: greedy per-stage add/remove/swap of devices with the
   simulator as judge (a device joins only if the objective improves, so no device
   whose transfers cost more than the compute it saves), row balancing that equalises
   finish times, and the best device for each whole stage.
Objective: alpha * latency / latency_local + (1 - alpha) * energy / energy_local;
plans that overflow a device's memory are refused.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan, Region
from meshdl.graph.tiling import make_stage, split_ratio
from meshdl.planner.base import PlanRequest, register
from meshdl.planner.simulate import RunResult, Simulator

INF = float("inf")
Stage_ = tuple  # (a, b, spatial, devices tuple[int], rows tuple[int] | None)


class Search:
    """Candidate construction and scoring shared by ``meshdl`` and ``optimal``."""

    def __init__(self, g, mesh, req: PlanRequest, pool: Sequence[str] | None = None,
                 pool_size: int = 10, max_hops: int = 3) -> None:
        self.g, self.mesh, self.req = g, mesh, req
        self.sim = Simulator(g, mesh)
        self.src = self.sim.dev(req.source)
        self.snk = self.sim.dev(req.sink)
        self.alpha = float(req.alpha)
        self.cache: dict[tuple, tuple[float, RunResult | None]] = {}
        self._tasks: dict[tuple, list] = {}
        self.evaluations = 0
        ref = self.sim.run(self.sim.compile([(0, len(g.ops), [
            (self.src, None, None, g.flops)])], self.src, self.snk))
        self.lat_ref = max(ref.latency, 1e-12)
        self.e_ref = max(ref.energy, 1e-12)
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

    def _prune(self, k: int, max_hops: int) -> list[int]:
        """Source, sink and the k devices that look most useful (canonical order)."""
        g, sim = self.g, self.sim
        near = self._near(max_hops)
        in_b = g.tensor_bytes(0)
        share = min(4, max(1, len(near)))
        est = {}
        for d in near:
            est[d] = (g.flops / share / sim.flops[d]
                      + self.path_time(self.src, d, in_b / share)
                      + self.path_time(d, self.snk, g.tensor_bytes(len(g.ops))))
        ranked = sorted(near, key=lambda d: (est[d], sim.ids[d]))
        keep = [self.src] + ([self.snk] if self.snk != self.src else [])
        keep += [d for d in ranked if d not in keep][:k]
        return sorted(set(keep), key=lambda d: (est.get(d, 0.0), sim.ids[d]))

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
        runs = list(g.spatial_runs)
        parts: list[list[tuple]] = []       # per region of the model: its options
        at = 0
        for a, b in runs + [(len(g.ops), len(g.ops))]:
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

    # ----- building and scoring -----------------------------------------------------------
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

    def evaluate(self, cand: tuple) -> tuple[float, RunResult | None]:
        got = self.cache.get(cand)
        if got is not None:
            return got
        if not self.fits(cand):
            got = (INF, None)
        else:
            prog = self.sim.compile([(st[0], st[1], self.tasks(st)) for st in cand],
                                    self.src, self.snk,
                                    keys=[(st[0], st[1], st[3], st[4]) for st in cand])
            r = self.sim.run(prog)
            self.evaluations += 1
            got = (self.alpha * r.latency / self.lat_ref
                   + (1.0 - self.alpha) * r.energy / self.e_ref, r)
        self.cache[cand] = got
        return got

    def uniform(self, seg: Sequence[tuple[int, int, bool]], devs: Sequence[int],
                whole_dev: int) -> tuple:
        return tuple(self.stage(a, b, sp, devs if sp else (whole_dev,))
                     for a, b, sp in seg)

    # ----- refinement ---------------------------------------------------------------------
    def balance(self, cand: tuple, rounds: int = 4) -> tuple:
        """Re-split rows so each spatial stage's tasks finish together."""
        best, (best_obj, r) = cand, self.evaluate(cand)
        cur = cand
        for _ in range(rounds):
            if r is None:
                break
            new, changed, t = [], False, 0
            for k, st in enumerate(cur):
                a, b, sp, devs, rows = st
                n = len(self.tasks(st))
                if rows is None or n < 2:
                    new.append(st)
                    t += n
                    continue
                fin = r.task_finish[t:t + n]
                base = r.stage_finish[k - 1] if k > 0 else 0.0
                spans = [max(f - base, 1e-12) for f in fin]
                mean = sum(spans) / n
                act = [x for x in rows if x > 0]
                w = [rw * mean / s for rw, s in zip(act, spans)]
                nrows = self.rows_for(b, devs[:len(w)], w)
                if nrows != rows[:len(w)]:
                    changed = True
                new.append((a, b, sp, devs[:len(w)], nrows))
                t += n
            if not changed:
                break
            cur = tuple(new)
            obj, r = self.evaluate(cur)
            if obj < best_obj:
                best, best_obj = cur, obj
        return best

    def moves(self, st: Stage_) -> list[tuple[int, ...]]:
        """Device sets to try for one stage: add the next pool devices, drop the lowest
        ranked / slowest / any (small sets), swap, grow or shrink by a third."""
        a, b, sp, devs, _ = st
        if not sp:
            need = self.g.weight_bytes_between(a, b)
            return [(d,) for d in self.pool if d != devs[0] and self.sim.memory[d] > need]
        flops = self.sim.flops
        outside = [d for d in self.pool if d not in devs]
        out = [devs + (d,) for d in outside[:2]]
        m = len(devs)
        if m > 1:
            drop = set(devs[-2:]) | {min(devs, key=lambda d: (flops[d], -self.order[d]))}
            if m <= 6:
                drop = set(devs)
            out += [tuple(x for x in devs if x != d) for d in sorted(drop, key=self.order.get)]
            out += [tuple(x if x != devs[-1] else o for x in devs) for o in outside[:2]]
        step = max(2, m // 3)
        ranked = list(devs) + outside
        out += [tuple(ranked[:m + step]), tuple(ranked[:max(1, m - step)])]
        return list(dict.fromkeys(o for o in out if o and o != devs))

    def improve(self, cand: tuple, budget: int = 300, rounds: int = 4) -> tuple:
        """Best-improvement local search, stage by stage, with row balancing between
        rounds; stops after ``budget`` more evaluations."""
        stop = self.evaluations + budget
        best = self.balance(cand)
        best_obj = self.evaluate(best)[0]
        for _ in range(rounds):
            improved = False
            for k in range(len(best)):
                a, b, sp, devs, _ = best[k]
                for m in self.moves(best[k]):
                    if self.evaluations >= stop:
                        break
                    trial = best[:k] + (self.stage(a, b, sp, m),) + best[k + 1:]
                    obj = self.evaluate(trial)[0]
                    if obj < best_obj - 1e-12:
                        best, best_obj, improved = trial, obj, True
            if not improved or self.evaluations >= stop:
                break
            best = self.balance(best)
            best_obj = self.evaluate(best)[0]
        return best

    def to_plan(self, cand: tuple, strategy: str) -> Plan:
        g, ids = self.g, self.sim.ids
        stages = []
        for k, st in enumerate(cand):
            a, b = st[0], st[1]
            tiles = [(None if o is None else Region(*o), ids[d])
                     for d, o, _, _ in self.tasks(st)]
            stages.append(make_stage(g, k, a, b, tiles))
        plan = Plan(model=g.name, input_shape=g.input_shape, num_ops=len(g.ops),
                    stages=stages, source=self.req.source, sink=self.req.sink,
                    strategy=strategy)
        for s in plan.stages:
            plan.routes.update({f"{x}>{y}": self.mesh.route(x, y) for x, y in _pairs(plan, s)
                                if x != y})
        return plan


def _pairs(plan: Plan, s) -> list[tuple[str, str]]:
    out = []
    for t in s.tasks:
        if s.index == 0:
            out.append((plan.source, t.device))
        out += [(p.device, t.device) for p, _ in plan.producers(t)]
        if s.index == len(plan.stages) - 1:
            out.append((t.device, plan.sink))
    return out


def best_single(search: Search) -> tuple:
    """The whole model on the single best device (the source included)."""
    g = search.g
    seg = ((0, len(g.ops), False),)
    cands = [search.uniform(seg, (d,), d) for d in search.pool]
    return min(cands, key=lambda c: (search.evaluate(c)[0], cands.index(c)))


def coarse(search: Search, seg: tuple, sizes: Sequence[int], heads_too: bool = True
           ) -> tuple | None:
    """The best of: the top-m pool devices (rank order) on every spatial stage, for m
    in ``sizes``; whole stages on the first of sink, source, fastest devices that fits
    (then, with ``heads_too``, the best of those for the chosen m)."""
    sim = search.sim
    fast = sorted(search.pool, key=lambda d: (-sim.flops[d], search.order[d]))
    whole_w = max((search.g.weight_bytes_between(a, b) for a, b, sp in seg if not sp),
                  default=0)
    heads = list(dict.fromkeys([search.snk, search.src, *fast]))
    heads = [h for h in heads if sim.memory[h] > whole_w][:6]
    best, best_obj = None, INF
    for m in sizes:
        for h in heads:             # the first head that fits beside these devices
            c = search.uniform(seg, tuple(search.pool[:m]), h)
            if search.fits(c):
                obj = search.evaluate(c)[0]
                if obj < best_obj:
                    best, best_obj = c, obj
                break
    chain = pipeline(search, seg, fast)
    if chain is not None and search.evaluate(chain)[0] < best_obj:
        best, best_obj = chain, search.evaluate(chain)[0]
    if best is None or not heads_too:
        return best
    devs = next((st[3] for st in best if st[2]), ())
    for h in heads:
        c = search.uniform(seg, devs, h)
        obj = search.evaluate(c)[0]
        if obj < best_obj:
            best, best_obj = c, obj
    return best


def pipeline(search: Search, seg: tuple, order: Sequence[int]) -> tuple | None:
    """Stages packed whole onto devices in ``order`` (fastest first): a stage stays on
    the current device while its weights fit, else moves to the next that holds it.
    The start for models no single device can hold."""
    g, mem = search.g, search.sim.memory
    stages, at, used = [], 0, 0
    for a, b, sp in seg:
        need = g.weight_bytes_between(a, b)
        act = g.tensor_bytes(a) + g.tensor_bytes(b)
        while at < len(order) and used + need + act > mem[order[at]]:
            at, used = at + 1, 0
        if at >= len(order):
            return None
        stages.append(search.stage(a, b, sp, (order[at],)))
        used += need
    return tuple(stages)


def _sizes(n: int, full: bool) -> list[int]:
    base = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48] if full else [1, 3, n // 2]
    return sorted({m for m in base if 1 <= m <= n} | {n})


@register("meshdl", "joint choice of stage cuts, devices, tile rows and routes, judged "
                    "by the simulator (alpha trades latency for energy)")
def plan_meshdl(g, mesh, req: PlanRequest) -> Plan:
    opts = req.options
    search = Search(g, mesh, req, pool_size=int(opts.get("pool_size", 14)),
                    max_hops=int(opts.get("max_hops", 3)))
    segs = search.segmentations(max_cuts=int(opts.get("max_cuts", 3)))
    n = len(search.pool)
    screened = []
    for i, seg in enumerate(segs):
        c = coarse(search, seg, _sizes(n, False), heads_too=False)
        if c is not None:
            screened.append((search.evaluate(c)[0], i, seg))
    screened.sort()
    ranked = []
    for _, i, seg in screened[:int(opts.get("shortlist", 4))]:
        c = coarse(search, seg, _sizes(n, True))
        ranked.append((search.evaluate(c)[0], i, c))
    ranked.sort()
    finalists = [best_single(search)] + [c for _, _, c in ranked[:int(opts.get("finalists", 3))]]
    best, best_obj = None, INF
    budget = int(opts.get("budget", 150))
    for c in finalists:
        if search.evaluate(c)[0] >= INF:
            continue
        c = search.improve(c, budget=budget)
        obj = search.evaluate(c)[0]
        if obj < best_obj:
            best, best_obj = c, obj
    if best is None:
        raise PlanError(f"no device set in mesh {mesh.name!r} can hold {g.name} "
                        f"({g.weight_bytes / 2**20:.1f} MiB of weights) within its memory; "
                        "add devices with more memory or use a smaller model")
    plan = search.to_plan(best, "meshdl")
    plan.meta["search"] = {"evaluations": search.evaluations, "segmentations": len(segs),
                           "pool": [search.sim.ids[d] for d in search.pool],
                           "objective": best_obj}
    return plan


__all__ = ["Search", "plan_meshdl", "best_single", "coarse"]
