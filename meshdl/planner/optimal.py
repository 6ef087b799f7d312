"""Strategy ``optimal``: exhaustive search on small meshes, the yardstick for ``meshdl``.

The space (documented, so comparisons mean something):
- segmentations: exactly ``meshdl``'s (``Search.segmentations``): each spatial run cut
  at positions where the resolution drops, with at most ``max_cuts`` interior cuts
  (default 1, i.e. at most two stages per spatial run); parts that cannot be tiled
  run whole (split only where memory forces it);
- each spatial stage: EVERY non-empty subset of the mesh's devices; one device runs
  the stage whole, several get full-width row bands in proportion to their FLOP/s,
  in the same canonical device order ``meshdl`` uses;
- each whole stage: every device;
- routes: the mesh's fastest paths.
Every structure is scored by the simulator (memory overflows are refused); the
best ``top`` structures then get the same row balancing ``meshdl`` applies, and the
best result wins. On a mesh of at most ``MAX_DEVICES`` devices this space contains
every structure ``meshdl`` can produce with the same ``max_cuts`` (meshdl's pool is
then the whole mesh), so ``meshdl``'s objective can be compared with it directly.
With its defaults ``meshdl`` searches a larger space (up to 3 cuts per spatial run, a
last whole stage that may hand its smallest tensor to the sink), so it can beat this
yardstick: ratios below 1 are expected, above 1 are search misses.
"""
from __future__ import annotations

import heapq
from itertools import combinations, product

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan
from meshdl.planner.base import PlanRequest, register
from meshdl.planner.optimiser_search import INF, Search

MAX_DEVICES = 6


def _subsets(devs: list[int]) -> list[tuple[int, ...]]:
    return [c for n in range(1, len(devs) + 1) for c in combinations(devs, n)]


@register("optimal", f"exhaustive search over cuts, device subsets and speed-proportional "
                     f"rows, for meshes of at most {MAX_DEVICES} devices")
def plan_optimal(g, mesh, req: PlanRequest) -> Plan:
    n = len(mesh.devices)
    limit = int(req.options.get("max_devices", MAX_DEVICES))
    if n > limit:
        raise PlanError(f"strategy 'optimal' searches exhaustively and refuses meshes of more "
                        f"than {limit} devices (mesh {mesh.name!r} has {n}); use strategy "
                        "'meshdl', which searches the same space heuristically")
    search = Search(g, mesh, req, pool=sorted(mesh.devices))
    # canonical order: the same ranking meshdl's pool would use on this mesh
    ranked = Search(g, mesh, req, pool_size=n, max_hops=n).pool
    search.pool = ranked
    search.order = {d: i for i, d in enumerate(ranked)}
    top = int(req.options.get("top", 16))
    subsets = _subsets(ranked)
    best: list[tuple[float, int, tuple]] = []     # a bounded max-heap of the top results
    count = 0
    for seg in search.segmentations(max_cuts=int(req.options.get("max_cuts", 1))):
        choices = [subsets if sp else [(d,) for d in ranked] for _, _, sp in seg]
        for combo in product(*choices):
            cand = tuple(search.stage(a, b, sp, devs) for (a, b, sp), devs in zip(seg, combo))
            obj = search.evaluate(cand)[0]
            count += 1
            if obj >= INF:
                continue
            item = (-obj, -count, cand)
            if len(best) < top:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
            search.cache.pop(cand, None)     # keep memory flat: scores live in the heap
    if not best:
        raise PlanError(f"no assignment of {g.name} to mesh {mesh.name!r} fits the devices' "
                        "memory; add a device with more memory or use a smaller model")
    finals = sorted(best, reverse=True)            # best first, ties by enumeration order
    winner, win_obj = None, INF
    for _, _, cand in finals:
        c = search.balance(cand)
        obj = search.evaluate(c)[0]
        if obj < win_obj:
            winner, win_obj = c, obj
    plan = search.to_plan(winner, "optimal")
    plan.meta["search"] = {"structures": count, "objective": win_obj,
                           "space": "segmentations x device subsets per spatial stage x "
                                    "device per whole stage; rows by speed, top balanced"}
    return plan


__all__ = ["plan_optimal", "MAX_DEVICES"]
