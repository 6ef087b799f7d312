"""Task execution on a node: traced models (cached per process) and one compute worker.

A device computes one task at a time (as the cost model assumes), on a worker
thread fed by a queue: never on the MQTT network or dispatcher threads. Models are
built by name (``meshdl.models.build``, pretrained where weights ship offline) and
traced once per (model, input shape) per process.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import numpy as np
import torch

from meshdl.errors import MeshdlError
from meshdl.graph.plan import Plan, Task
from meshdl.graph.runner import assemble, run_task

log = logging.getLogger(__name__)


def tensor_to_wire(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def wire_to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(a, requirements=("C", "W")))


def compute_task(g, plan: Plan, task: Task,
                 pieces: list[tuple[object, torch.Tensor]]) -> torch.Tensor:
    """The task kernel the mesh runs: assemble the input region from its pieces and
    run the task, with the same code as ``meshdl.execute``."""
    stage = plan.stages[task.stage]
    x = assemble(g.tensor_shape(stage.start), task.in_region, pieces)
    with torch.no_grad():
        return run_task(g, plan, task, x)


def warm(g, plan: Plan, tasks: list[Task]) -> None:
    """Run each task once on zeros so the first real job pays no first-call costs."""
    for task in tasks:
        stage = plan.stages[task.stage]
        shape = g.tensor_shape(stage.start)
        r = task.in_region
        if r is not None and len(shape) == 4:
            if r.is_empty():
                continue
            shape = (*shape[:-2], r.rows, r.cols)
        try:
            compute_task(g, plan, task, [(task.in_region, torch.zeros(shape))])
        except MeshdlError as exc:
            log.debug("warm-up of %s skipped: %s", task.id, exc)


class Worker:
    """One thread running submitted callables in FIFO order. ``submit`` never blocks
    (a task may submit its successor to its own worker): the queue's bound comes
    from the work that feeds it (JobTable.max_jobs jobs x the plan's tasks)."""

    def __init__(self, name: str) -> None:
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.busy = False
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._q.put_nowait(fn)

    def depth(self) -> int:
        return self._q.qsize()

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            self.busy = True
            try:
                fn()
            except Exception:
                log.exception("compute worker job failed")
            finally:
                self.busy = False
