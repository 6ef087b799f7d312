"""The local search of ``meshdl``: moves between candidates, row balancing and
best-improvement descent. A mixin of ``optimiser_search.Search`` (it uses its
``evaluate``, ``bound``, ``stage``, ``tasks``, ``rows_for``, ``pool`` and ``order``)."""
from __future__ import annotations

from typing import Sequence

INF = float("inf")
Stage_ = tuple  # (a, b, spatial, devices tuple[int], rows tuple[int] | None)


class Moves:
    """Refinement steps; every candidate they build is judged by ``evaluate``."""

    def costliest(self, devs: Sequence[int]) -> int:
        """The device with the most joules per FLOP (ties: the lowest ranked)."""
        sim = self.sim
        return max(devs, key=lambda d: (sim.p_comp[d] / sim.flops[d], self.order.get(d, 0)))

    def balance(self, cand: tuple, rounds: int = 4) -> tuple:
        """Re-split rows so each spatial stage's tasks finish together (kept only when
        the objective improves)."""
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
        """Device sets to try for one stage: add the next pool devices (by rank and by
        energy), drop the lowest ranked / slowest / any (small sets), swap, grow or
        shrink by a third; a single device may move to any pool device."""
        a, b, sp, devs, _ = st
        if not sp:
            need = self.g.weight_bytes_between(a, b)
            return [(d,) for d in self.pool if d != devs[0] and self.sim.memory[d] > need]
        flops = self.sim.flops
        outside = [d for d in self.pool if d not in devs]
        thrifty = [d for d in self.energy_ranked() if d not in devs][:2]
        out = [devs + (d,) for d in dict.fromkeys(outside[:2] + thrifty)]
        m = len(devs)
        if m == 1:
            out += [(d,) for d in outside]
        else:
            drop = set(devs[-2:]) | {min(devs, key=lambda d: (flops[d], -self.order[d])),
                                      self.costliest(devs)}
            if m <= 6:
                drop = set(devs)
            out += [tuple(x for x in devs if x != d) for d in sorted(drop, key=self.order.get)]
            out += [tuple(x if x != devs[-1] else o for x in devs) for o in outside[:2]]
        step = max(2, m // 3)
        ranked = list(devs) + outside
        out += [tuple(ranked[:m + step]), tuple(ranked[:max(1, m - step)])]
        return list(dict.fromkeys(o for o in out if o and o != devs))

    def joint_moves(self, cand: tuple) -> list[tuple]:
        """Whole-plan moves: one device joins, or leaves, every spatial stage at once (a
        device that helps only when it keeps its rows from stage to stage). Not when
        alpha = 1: then a device that speeds one stage up is kept on its own."""
        spatial = [k for k, st in enumerate(cand) if st[2]]
        if not spatial or self.alpha >= 1.0:     # latency alone: per-stage moves do
            return []
        used = list(dict.fromkeys(d for k in spatial for d in cand[k][3]))
        outside = [d for d in self.pool if d not in used]
        thrifty = [d for d in self.energy_ranked() if d not in used][:2]
        out = []
        for d in dict.fromkeys(outside[:2] + thrifty):
            out.append(self._with(cand, spatial, lambda devs, d=d: devs + (d,)))
        leave = used if len(used) <= 6 else used[-2:] + [
            min(used, key=lambda x: (self.sim.flops[x], -self.order[x])),
            self.costliest(used)]
        for d in dict.fromkeys(leave):
            if len(used) > 1:
                out.append(self._with(cand, spatial, lambda devs, d=d: tuple(
                    x for x in devs if x != d) or tuple(x for x in used if x != d)[:1]))
        return [c for c in dict.fromkeys(out) if c != cand]

    def _with(self, cand: tuple, ks: Sequence[int], fn) -> tuple:
        out = list(cand)
        for k in ks:
            a, b, sp, devs, _ = cand[k]
            out[k] = self.stage(a, b, sp, fn(devs))
        return tuple(out)

    def _try(self, trial: tuple, best_obj: float, grows: bool) -> tuple[tuple, float]:
        """Score a move; one that adds a device and falls just short (within ``slack``)
        gets its rows balanced too (a device that joins helps once it has its share)."""
        if self.bound(trial) >= best_obj - 1e-12:
            return trial, INF
        obj = self.evaluate(trial)[0]
        if grows and best_obj - 1e-12 <= obj < best_obj * (1.0 + self.slack):
            trial = self.balance(trial, rounds=2)
            obj = self.evaluate(trial)[0]
        return trial, obj

    def improve(self, cand: tuple, budget: int = 300, rounds: int = 4) -> tuple:
        """Best-improvement local search: whole-plan moves, then stage by stage, with
        row balancing between rounds; stops after ``budget`` more evaluations."""
        stop = self.evaluations + budget
        best = self.balance(cand)
        best_obj = self.evaluate(best)[0]
        for _ in range(rounds):
            improved = False
            n_tasks = sum(len(st[3]) for st in best)
            for trial in self.joint_moves(best):
                if self.evaluations >= stop:
                    break
                trial, obj = self._try(trial, best_obj,
                                       sum(len(st[3]) for st in trial) > n_tasks)
                if obj < best_obj - 1e-12:
                    best, best_obj, improved = trial, obj, True
            for k in range(len(best)):
                a, b, sp, devs, _ = best[k]
                for m in self.moves(best[k]):
                    if self.evaluations >= stop:
                        break
                    trial = best[:k] + (self.stage(a, b, sp, m),) + best[k + 1:]
                    trial, obj = self._try(trial, best_obj, len(m) > len(devs))
                    if obj < best_obj - 1e-12:
                        best, best_obj, improved = trial, obj, True
            if not improved or self.evaluations >= stop:
                break
            best = self.balance(best)
            best_obj = self.evaluate(best)[0]
        return best


__all__ = ["Moves", "INF"]
