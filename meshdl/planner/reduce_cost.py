"""Cost of reduce points: tiled stages whose tasks run in phases.

A tiled stage holding global reductions (squeeze-and-excitation pools, see
``meshdl.graph.phased``) runs each task as phases 0..P. After phase p every task sends
its partials (``graph.reduce_points``: a few numbers per channel) to every other task
of the stage: an all-to-all of tiny vectors, costed like any other transfer (same
routes, links, radios, wire model). Phase p+1 of a task starts when its own phase p is
done and the partials of all the stage's tasks have arrived. FLOPs are split over the
phases in the proportions of the whole map (``graph.phase_fractions``).

``add_reduce_phases`` rewrites a compiled ``Program`` in place: plan task i keeps its
index for phase 0 (it receives the stage's input pieces); the later phases are new
tasks appended at the end, and the last one sends the task's output pieces.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence


def _info(sim: Any, a: int, b: int) -> tuple[list[float], list[int]] | None:
    """(phase FLOP fractions, partial bytes per exchange) of ops [a, b), cached."""
    cache = sim.__dict__.setdefault("_reduce_info", {})
    key = (a, b)
    if key not in cache:
        g = sim.graph
        points = g.reduce_points(a, b) if hasattr(g, "reduce_points") else []
        cache[key] = (g.phase_fractions(a, b), [nb for _, _, nb in points]) if points else None
    return cache[key]


def add_reduce_phases(sim: Any, prog: Any, stages: Sequence[tuple[int, int, Sequence[tuple]]],
                      transfer: Callable[..., int]) -> None:
    """Split the tasks of every tiled stage with reduce points into phases, linked by
    the all-to-all exchange of partials (``transfer(src dev, dst dev, bytes, dest task,
    pos)`` is the compiler's own transfer factory)."""
    base = 0
    for k, (a, b, tasks) in enumerate(stages):
        first, n = base, len(tasks)
        base += n
        if n < 2 and (n == 0 or tasks[0][1] is None):
            continue            # one whole task: the reductions run natively
        info = _info(sim, a, b)
        if info is None:
            continue
        fractions, exchange_bytes = info
        cur = list(range(first, first + n))          # the tasks of the current phase
        total = [prog.task_dur[t] for t in cur]
        outs = [prog.out_transfers[t] for t in cur]
        for t, d in zip(cur, total):
            prog.task_dur[t] = d * fractions[0]
            prog.out_transfers[t] = []
        for p, nbytes in enumerate(exchange_bytes, start=1):
            nxt = []
            for i, t in enumerate(cur):
                q = len(prog.task_dev)
                prog.task_dev.append(prog.task_dev[t])
                prog.task_dur.append(total[i] * (fractions[p] if p < len(fractions) else 0.0))
                prog.task_stage.append(k)
                prog.out_transfers.append([])
                prog.n_inputs.append(n)
                prog.phase_of[q] = (first + i, p)
                nxt.append(q)
            for t in cur:                            # all-to-all of the partials
                for q in nxt:
                    prog.out_transfers[t].append(
                        transfer(prog.task_dev[t], prog.task_dev[q], nbytes, q, b))
            cur = nxt
        for t, o in zip(cur, outs):
            prog.out_transfers[t] = o
