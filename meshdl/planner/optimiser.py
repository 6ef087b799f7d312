"""Strategy ``meshdl`` (the default): stage cuts, devices, tile rows and routes chosen
together, every candidate judged by the simulator.

Candidates, scoring and the moves live in ``optimiser_search`` (``Search``). Search
(bounded, pure, deterministic):
1. pool: the source, the sink and ``pool_size`` devices within a few hops, two thirds
   ranked by an estimate of the time to take a share of the work, the rest by the
   energy to take all of it (compute plus the transfers from the source and to the
   sink);
2. segmentations: each spatial run cut at the positions where the resolution drops
   (after a pooling or strided op; at most ``max_cuts`` interior cuts); non-spatial
   parts whole, split further only when no device can hold their weights;
3. for each alpha of the schedule (below): seeds = the whole model on the single best
   device by objective (transfers of the input and the answer included; the source,
   i.e. ``local``, is one of them), the best few single devices and their pairs on
   the best segmentations, the source handing one of its smallest tensors to one of
   those devices, and the top-m pool devices on every spatial stage for a few m
   (segmentations screened by objective);
4. local search from the best seeds: whole-plan moves (a device joins or leaves every
   spatial stage), per-stage add/remove/swap of devices, row balancing that equalises
   finish times, the best device for each whole stage; a move is kept only if the
   objective improves (so no device whose transfers cost more than they save);
   the last whole stage may hand its smallest tensor to the sink;
5. every simulated candidate enters a Pareto archive of (latency, energy); the plan is
   the archived candidate with the least objective for the requested alpha.
Objective: alpha * latency / latency_local + (1 - alpha) * energy / energy_local;
plans that overflow a device's memory are refused.

Alpha schedule: when the pool has at most ``sweep_pool`` devices (default 12), steps
3-4 run for alpha = 1, 0.9, 0.7, 0.5, 0.3, 0 whatever alpha is requested, so the archive
does not depend on it: then energy never rises as alpha falls and latency never rises
as alpha grows (an exact trade-off curve over what was explored). Larger pools search
for the requested alpha only (planning time).
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan
from meshdl.planner.base import PlanRequest, register
from meshdl.planner.optimiser_search import INF, Search

SCHEDULE = (1.0, 0.9, 0.7, 0.5, 0.3, 0.0)


def singles(search: Search) -> list[tuple]:
    """The whole model on each pool device that holds it, best objective first."""
    seg = ((0, len(search.g.ops), False),)
    cands = [search.uniform(seg, (d,), d) for d in search.pool]
    cands = [c for c in cands if search.evaluate(c)[0] < INF]
    return sorted(cands, key=lambda c: (search.evaluate(c)[0], search.order[c[0][3][0]]))


def best_single(search: Search) -> tuple | None:
    """The whole model on the single best device (the source included)."""
    got = singles(search)
    return got[0] if got else None


def _heads(search: Search, seg: tuple) -> list[int]:
    sim = search.sim
    fast = sorted(search.pool, key=lambda d: (-sim.flops[d], search.order[d]))
    whole_w = max((search.g.weight_bytes_between(a, b) for a, b, sp in seg if not sp),
                  default=0)
    heads = list(dict.fromkeys([search.snk, search.src, *fast]))
    return [h for h in heads if sim.memory[h] > whole_w][:6]


def coarse(search: Search, seg: tuple, sizes: Sequence[int], heads_too: bool = True
           ) -> tuple | None:
    """The best of: the top-m pool devices (rank order) on every spatial stage, for m
    in ``sizes``; whole stages on the first of sink, source, fastest devices that fits
    (then, with ``heads_too``, the best of those for the chosen m)."""
    heads = _heads(search, seg)
    best, best_obj = None, INF
    # likely winners first (many devices when latency counts), so the bound prunes more
    for m in sorted(sizes, reverse=search.alpha >= 0.5):
        for h in heads:             # the first head that fits beside these devices
            c = search.uniform(seg, tuple(search.pool[:m]), h)
            if search.fits(c):
                if search.bound(c) >= best_obj:
                    break
                obj = search.evaluate(c)[0]
                if obj < best_obj:
                    best, best_obj = c, obj
                break
    fast = sorted(search.pool, key=lambda d: (-search.sim.flops[d], search.order[d]))
    chain = pipeline(search, seg, fast)
    if chain is not None and len({st[3] for st in chain}) < 2:
        chain = None                # one device: the same as a single-device seed
    if chain is not None and search.evaluate(chain)[0] < best_obj:
        best, best_obj = chain, search.evaluate(chain)[0]
    if best is None or not heads_too:
        return best
    devs = next((st[3] for st in best if st[2]), ())
    for h in heads:
        c = search.uniform(seg, devs, h)
        if search.bound(c) >= best_obj:
            continue
        obj = search.evaluate(c)[0]
        if obj < best_obj:
            best, best_obj = c, obj
    return best


def on_devices(search: Search, seg: tuple, devs: Sequence[int]) -> tuple | None:
    """``devs`` on every spatial stage; whole stages on the best of ``devs``, the sink,
    the source and the fastest devices that fits."""
    best, best_obj = None, INF
    for h in list(dict.fromkeys([*devs, *_heads(search, seg)]))[:len(devs) + 2]:
        c = search.uniform(seg, devs, h)
        obj = search.evaluate(c)[0]
        if obj < best_obj:
            best, best_obj = c, obj
    return best


def tapered(search: Search, cand: tuple, tail: Sequence[int]) -> list[tuple]:
    """Variants of ``cand`` that keep its devices on the first spatial stages (the
    large maps) and run every later stage on one device of ``tail``."""
    spatial = [k for k, st in enumerate(cand) if st[2] and len(st[3]) > 1]
    out = []
    for d in tail:
        for j in spatial[:-1] if len(spatial) > 1 else spatial:
            c = tuple(st if k <= j else search.stage(st[0], st[1], st[2], (d,))
                      for k, st in enumerate(cand))
            if c != cand and search.evaluate(c)[0] < INF:
                out.append(c)
    return out


def tails(search: Search, cand: tuple) -> list[tuple]:
    """Variants of ``cand`` whose last whole stage hands over at its smallest tensor:
    the ops after it run on the sink (a classifier's logits can outweigh its
    features)."""
    g = search.g
    k = len(cand) - 1
    a, b, sp, devs, _ = cand[k]
    if sp or devs[0] == search.snk:
        return []
    inner = [p for p in g.positions if a < p < b]
    if not inner:
        return []
    q = min(inner, key=lambda p: (g.tensor_bytes(p), -p))
    if g.tensor_bytes(q) >= g.tensor_bytes(b):
        return []
    c = cand[:k] + (search.stage(a, q, False, devs), search.stage(q, b, False, (search.snk,)))
    return [c] if search.evaluate(c)[0] < INF else []


def handovers(search: Search, heads: Sequence[int], k: int = 2) -> list[tuple]:
    """The source runs the model up to a tensor smaller than the input, a device of
    ``heads`` (or the sink) the rest (DNN surgery's space): for each device the ``k``
    hand-over points with the best estimated objective are simulated."""
    g, sim, src, snk = search.g, search.sim, search.src, search.snk
    end = len(g.ops)
    inner = [p for p in g.cut_points if g.tensor_bytes(p) < g.tensor_bytes(0)]
    out = []
    for d in dict.fromkeys([*heads, snk]):
        if d == src:
            continue
        est = []
        for p in inner:
            f0, f1 = g.flops_between(0, p), g.flops_between(p, end)
            nb, ob = g.tensor_bytes(p), g.tensor_bytes(end)
            lat = (f0 / sim.flops[src] + search.path_time(src, d, nb) + f1 / sim.flops[d]
                   + search.path_time(d, snk, ob))
            e = (f0 * sim.p_comp[src] / sim.flops[src] + search.path_energy(src, d, nb)
                 + f1 * sim.p_comp[d] / sim.flops[d] + search.path_energy(d, snk, ob))
            est.append((search.objective(lat, e), p))
        for _, p in sorted(est)[:k]:
            c = (search.stage(0, p, False, (src,)), search.stage(p, end, False, (d,)))
            if search.evaluate(c)[0] < INF:
                out.append(c)
    return out


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


def _sizes(n: int, full: bool, alpha: float = 0.5) -> list[int]:
    """Device counts tried on every spatial stage. Screening skips one device (the
    single-device seeds cover it) and, when latency dominates, small counts."""
    base = ([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48] if full
            else [n // 2] if alpha >= 0.9 else [3, n // 2])
    return sorted({m for m in base if 1 <= m <= n} | {n})


def explore(search: Search, segs: list, opts: dict) -> None:
    """Seeds and local search for ``search.alpha``; results land in the archive."""
    n = len(search.pool)

    def obj(c: tuple) -> float:
        return search.evaluate(c)[0]

    screened = []
    for i, seg in enumerate(segs):
        c = coarse(search, seg, _sizes(n, False, search.alpha), heads_too=False)
        if c is not None:
            screened.append((obj(c), i, seg))
    screened.sort()
    short = screened[:int(opts.get("shortlist", 4))]
    ranked = []
    for _, i, seg in short:
        c = coarse(search, seg, _sizes(n, True))
        if c is not None:
            ranked.append((obj(c), i, c))
    ranked.sort()
    ones = singles(search)
    top = [c[0][3][0] for c in ones[:int(opts.get("top_singles", 3))]]
    cut = sorted(handovers(search, top), key=obj)
    starts = ones[:1] + cut[:2] + [c for _, _, c in ranked[:int(opts.get("finalists", 3))]]
    groups = [(d,) for d in top] + list(combinations(top, 2))
    extra = []
    for _, i, seg in short[:2]:
        if any(sp for _, _, sp in seg):
            extra += [c for c in (on_devices(search, seg, ds) for ds in groups) if c]
    for _, _, c in ranked[:2]:
        extra += tapered(search, c, top[:1])
    extra.sort(key=obj)
    starts += [c for c in extra if c not in starts][:int(opts.get("extra_starts", 2))]
    budget = int(opts.get("budget", 150))
    for c in starts:
        if obj(c) < INF:
            tails(search, search.improve(c, budget=budget))


@register("meshdl", "joint choice of stage cuts, devices, tile rows and routes, judged "
                    "by the simulator (alpha trades latency for energy)")
def plan_meshdl(g, mesh, req: PlanRequest) -> Plan:
    opts = req.options
    search = Search(g, mesh, req, pool_size=int(opts.get("pool_size", 14)),
                    max_hops=int(opts.get("max_hops", 3)))
    segs = search.segmentations(max_cuts=int(opts.get("max_cuts", 3)))
    sweep = len(search.pool) <= int(opts.get("sweep_pool", 12))
    schedule = tuple(float(a) for a in opts.get("alphas", SCHEDULE)) if sweep else (req.alpha,)
    for alpha in schedule:
        search.alpha = alpha
        explore(search, segs, opts)
    search.alpha = req.alpha
    best = search.pick(req.alpha)
    if best is None:
        raise PlanError(f"no device set in mesh {mesh.name!r} can hold {g.name} "
                        f"({g.weight_bytes / 2**20:.1f} MiB of weights) within its memory; "
                        "add devices with more memory or use a smaller model")
    plan = search.to_plan(best, "meshdl")
    plan.meta["search"] = {"evaluations": search.evaluations, "segmentations": len(segs),
                           "pool": [search.sim.ids[d] for d in search.pool],
                           "objective": search.evaluate(best)[0],
                           "alphas": list(schedule),
                           "pareto": [[round(x, 6), round(y, 6)] for x, y in search.pareto()[:64]]}
    return plan


__all__ = ["Search", "INF", "plan_meshdl", "best_single", "coarse", "explore", "singles"]
