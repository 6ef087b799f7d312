"""The event loop of the cost model (see ``planner.simulate``): runs a plan compiled
to indices (``Program``) and returns what happened (``RunResult``).

Pure: it takes the compiled program and the per-device power / resource tables of a
``Simulator``, and touches nothing else.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

from meshdl.errors import PlanError


@dataclass
class Program:
    """A plan compiled to indices: what the event loop runs."""

    task_dev: list[int]
    task_dur: list[float]
    task_stage: list[int]
    n_inputs: list[int]                      # pieces each task waits for
    start_transfers: list[int]               # transfer ids leaving the source at t = 0
    out_transfers: list[list[int]]           # task -> transfer ids it sends when done
    tr_dest: list[int]                       # transfer -> consumer task, -1 = the sink
    tr_hops: list[tuple]                     # transfer -> ((link, u, v, seconds), ...)
    tr_bytes: list[int]
    n_stages: int
    devices_used: list[int]                  # source, task devices, sink (first use order)
    peak_mem: dict[int, int]
    start_at: list[float] = field(default_factory=list)   # per start transfer (streams);
                                                          # empty: all leave at t = 0
    phase_of: dict[int, tuple[int, int]] = field(default_factory=dict)  # later phases of
                                      # tasks of stages with reduce points: (task, phase)


@dataclass
class RunResult:
    latency: float
    energy: float
    task_finish: list[float]
    stage_finish: list[float]
    compute_s: list[float]
    tx_s: list[float]
    rx_s: list[float]
    bytes_moved: int
    transfers: int
    task_start: list[float] | None = None          # with run(..., trace=True)
    hop_times: list[list[tuple[float, float]]] | None = None   # transfer -> [(start, end)]


def run_program(prog: Program, n_res: int, p_comp: Sequence[float], p_tx: Sequence[float],
                p_rx: Sequence[float], trace: bool = False) -> RunResult:
    """Run ``prog`` on ``n_res`` link resources and ``len(p_comp)`` devices (powers in
    watts, by device index); ``trace`` also records task starts and hop times."""
    n_dev = len(p_comp)
    link_free = [0.0] * n_res
    dev_free = [0.0] * n_dev
    compute_s = [0.0] * n_dev
    tx_s = [0.0] * (n_dev + 1)         # slot n_dev: the broker of a star mesh
    rx_s = [0.0] * (n_dev + 1)
    waiting = list(prog.n_inputs)
    ready_at = [0.0] * len(waiting)
    finish = [0.0] * len(waiting)
    stage_finish = [0.0] * prog.n_stages
    sink_time = 0.0
    moved = 0
    crossings = 0
    tr_hops, tr_dest, tr_bytes = prog.tr_hops, prog.tr_dest, prog.tr_bytes
    task_dev, task_dur, task_stage = prog.task_dev, prog.task_dur, prog.task_stage
    out_transfers = prog.out_transfers
    push, pop = heapq.heappush, heapq.heappop
    # heap entries (time, seq, kind, id): kind 0 = compute request of task id,
    # kind h >= 1 = request for hop h-1 of transfer id; seq breaks ties (FIFO)
    heap: list[tuple[float, int, int, int]] = []
    seq = 0
    task_start = [0.0] * len(waiting) if trace else None
    hop_times: list[list] | None = [[] for _ in tr_dest] if trace else None
    pending: list[tuple[int, float]] = [
        (tr, prog.start_at[i] if prog.start_at else 0.0)
        for i, tr in enumerate(prog.start_transfers)]

    def arrive(tr: int, t: float) -> None:
        """Transfer ``tr`` is complete at ``t``: its consumer may become ready."""
        nonlocal seq, sink_time
        dest = tr_dest[tr]
        if dest < 0:
            sink_time = max(sink_time, t)
            return
        if t > ready_at[dest]:
            ready_at[dest] = t
        waiting[dest] -= 1
        if waiting[dest] == 0:
            push(heap, (ready_at[dest], seq, 0, dest))
            seq += 1

    for t, n in enumerate(prog.n_inputs):   # a tile of pure padding needs no input
        if n == 0:
            push(heap, (0.0, seq, 0, t))
            seq += 1
    while True:
        # transfers ready to leave at time tt: free ones arrive at once
        for tr, tt in pending:
            hops = tr_hops[tr]
            if hops:
                crossings += 1
                moved += tr_bytes[tr] * len(hops)
                push(heap, (tt, seq, 1, tr))
                seq += 1
            else:
                arrive(tr, tt)
        pending = []
        if not heap:
            break
        t, _, kind, x = pop(heap)
        if kind == 0:
            d = task_dev[x]
            f = (dev_free[d] if dev_free[d] > t else t) + task_dur[x]
            if task_start is not None:
                task_start[x] = f - task_dur[x]
            dev_free[d] = f
            compute_s[d] += task_dur[x]
            finish[x] = f
            st = task_stage[x]
            if f > stage_finish[st]:
                stage_finish[st] = f
            pending = [(tr, f) for tr in out_transfers[x]]
            continue
        hops = tr_hops[x]
        link, u, v, dur = hops[kind - 1]
        f = (link_free[link] if link_free[link] > t else t) + dur
        if hop_times is not None:
            hop_times[x].append((f - dur, f))
        link_free[link] = f
        tx_s[u] += dur
        rx_s[v] += dur
        if kind < len(hops):
            push(heap, (f, seq, kind + 1, x))
            seq += 1
        else:
            arrive(x, f)
    if any(w > 0 for w in waiting):
        raise PlanError("a task never received all its inputs; the plan's stages do "
                        "not chain (check it with meshdl.graph.check_plan)")
    pc, pt, pr = p_comp, p_tx, p_rx
    energy = sum(pc[d] * compute_s[d] + pt[d] * tx_s[d] + pr[d] * rx_s[d]
                 for d in range(n_dev))
    return RunResult(sink_time, energy, finish, stage_finish, compute_s, tx_s, rx_s,
                     moved, crossings, task_start, hop_times)


def schedule_of(prog: Program, r: RunResult, task_ids: Sequence[str], ids: Sequence[str],
                names: Sequence[str]) -> dict:
    """Per-task and per-transfer times of a traced run, named by plan task ids."""
    producer = {tr: p for p, trs in enumerate(prog.out_transfers) for tr in trs}
    def name(i: int) -> str:
        if i < len(task_ids) or i not in prog.phase_of:
            return task_ids[i]
        t, phase = prog.phase_of[i]
        return f"{task_ids[t]}#p{phase}"
    tasks = {name(i): (ids[prog.task_dev[i]], r.task_start[i], r.task_finish[i])
             for i in range(len(prog.task_dev)) if i < len(task_ids) or i in prog.phase_of}
    transfers = []
    for tr, dest in enumerate(prog.tr_dest):
        p = producer.get(tr)
        hops = [(names[u], names[v], s, e) for (_, u, v, _), (s, e)
                in zip(prog.tr_hops[tr], r.hop_times[tr])]
        transfers.append({"src": "" if p is None else name(p),
                          "dst": "" if dest < 0 else name(dest),
                          "bytes": prog.tr_bytes[tr], "hops": hops})
    return {"tasks": tasks, "transfers": transfers}


__all__ = ["Program", "RunResult", "run_program", "schedule_of"]
