"""Streams of frames on a mesh: several frames in flight, answers in order.

``stream(client, frames, model=..., window=W)`` (also ``MeshClient.stream``) yields
one ``InferResult`` per frame, in input order, with ``.index``; a frame that could
not be answered has ``.error`` set and ``output`` None. How:

- **The plan is fetched once** (a plan request to the leader, objective
  ``throughput`` by default) and reused while the mesh is stable: frames go straight
  to the plan's source as jobs of that plan, no request per frame. A throughput plan
  may carry replicas (``plan.meta["replicas"]``): frames go to them by smooth
  weighted round robin (the planner's weights), as the cost model predicted.
- **Pipelining**: up to W frames are in flight at once, so while frame n runs stage
  k+1 on one device, frame n+1 runs stage k on another (every node computes its
  tasks one at a time, FIFO). The window is the credit: a new frame is read (and
  loaded) only when fewer than W frames are unanswered or waiting to be yielded, so
  memory stays flat whatever the stream's length.
- **Exactly once, or failed**: each frame has its own job id per attempt; a device
  going offline (or any failure a fresh plan may fix) drops the current plan, the
  next attempt asks the leader again and re-sends the frame; answers of abandoned
  attempts are ignored (their job ids are forgotten). After ``max_attempts`` or the
  frame's deadline the frame is reported failed; it is never yielded twice.
- ``rate_fps`` paces the input (a camera); ``progress(done, fps)`` is called as
  frames complete (the CLI prints frames/s live).
"""
from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from meshdl.errors import JobError, MeshdlError, TransportError

log = logging.getLogger(__name__)

MAX_WINDOW = 64


class _PlanBook:
    """The stream's current plan(s), shared by the frame workers; re-fetched once
    after a failure (not once per failed frame)."""

    def __init__(self, client: Any, model: str, strategy: str, alpha: float,
                 objective: str | None, timeout: float, source: str | None = None,
                 sink: str | None = None) -> None:
        self.client, self.model, self.strategy = client, model, strategy
        self.source, self.sink = source, sink
        self.alpha, self.objective = alpha, objective
        self.shape: tuple[int, ...] | None = None
        self.timeout = timeout
        self._lock = threading.Lock()
        self._plans: list[Any] = []
        self._weights: list[float] = []
        self._cur: list[float] = []
        self.generation = 0
        self.fetches = 0

    def _fetch(self) -> None:
        from meshdl.planner.throughput import replicas
        primary = self.client.request_plan(self.model, self.strategy, self.alpha,
                                           self.shape, timeout=self.timeout,
                                           source=self.source, sink=self.sink,
                                           objective=self.objective)
        plans, weights = replicas(primary)
        ids = [p.plan_id for p in plans[1:]]
        known = {p.plan_id: p for p in self.client.plans_known(ids, timeout=2.0)} if ids else {}
        keep = [(primary, weights[0])] + [(known[p.plan_id], w) for p, w
                                          in zip(plans[1:], weights[1:]) if p.plan_id in known]
        if len(keep) < len(plans):
            log.warning("stream: %d replica plan(s) of %s were not published; using %d",
                        len(plans) - len(keep), primary.plan_id, len(keep))
        self._plans = [p for p, _ in keep]
        self._weights = [w for _, w in keep]
        self._cur = [0.0] * len(keep)
        self.generation += 1
        self.fetches += 1

    def pick(self, shape: tuple[int, ...]) -> tuple[Any, int]:
        """The plan for the next frame (weighted round robin) and its generation."""
        with self._lock:
            if self.shape is None:
                self.shape = tuple(shape)       # the stream's frame shape: the first one's
            gone = self.client.offline()
            if self._plans and any(d in gone for p in self._plans for d in p.devices()):
                self._plans = []                 # a device of the plan went offline
            if not self._plans:
                self._fetch()
            total = sum(self._weights)
            for i, w in enumerate(self._weights):
                self._cur[i] += w
            k = max(range(len(self._cur)), key=lambda i: (self._cur[i], -i))
            self._cur[k] -= total
            return self._plans[k], self.generation

    def reset_round_robin(self) -> None:
        with self._lock:
            self._cur = [0.0] * len(self._cur)

    def invalidate(self, generation: int) -> None:
        with self._lock:
            if generation == self.generation:
                self._plans = []

    def current(self) -> list[Any]:
        with self._lock:
            return list(self._plans)


def _load(frame: Any, model: str) -> Any:
    """The frame as a tensor of its own: a job reads its input until it ends (pieces
    are sent from it, and resent), so a caller's array is copied, never shared; a
    camera loop may refill its buffer as soon as the frame is yielded."""
    import torch
    if isinstance(frame, (str, Path)):
        from meshdl import imaging
        frame = imaging.load_image(frame, preprocessing=imaging.preprocess_for(model))
        return torch.as_tensor(frame, dtype=torch.float32).contiguous()
    if torch.is_tensor(frame):
        return frame.detach().to(torch.float32, copy=True).contiguous()
    return torch.tensor(frame, dtype=torch.float32).contiguous()       # always a copy


def _failed(index: int, job: str, error: str, attempts: int, plan: Any) -> Any:
    from meshdl.client import InferResult
    return InferResult(output=None, top5=[], latency_s=math.nan, total_s=math.nan,
                       plan=plan, stages=[], attempts=attempts, job=job, index=index,
                       error=error)


def stream(client: Any, frames: Iterable[Any], model: str = "efficientnet_lite0", *,
           window: int | None = None, strategy: str = "meshdl", alpha: float = 1.0,
           objective: str | None = "throughput", rate_fps: float | None = None,
           frame_timeout: float = 60.0, max_attempts: int = 4, topk: int = 5,
           source: str | None = None, sink: str | None = None,
           progress: Callable[[int, float], None] | None = None) -> Iterator[Any]:
    """See the module doc. ``window`` None: the planner's stream window for the plan's
    replicas (``planner.throughput.stream_window``)."""
    if window is not None and not 1 <= int(window) <= MAX_WINDOW:
        raise JobError(f"window {window} must be 1..{MAX_WINDOW} frames in flight")
    if rate_fps is not None and not rate_fps > 0:
        raise JobError(f"--fps {rate_fps} must be positive")
    if max_attempts < 1:
        raise JobError("max_attempts must be at least 1")
    import meshdl
    from meshdl import imaging
    from meshdl.client import RetryableJobError
    from meshdl.planner.throughput import stream_window
    info = meshdl.models.info(model)
    labels = imaging.imagenet_labels() if info.num_classes == 1000 else None
    it = iter(frames)
    base = client.job_id(uuid.uuid4().hex[:10])      # job ids name their client
    t_start = time.monotonic()

    book = _PlanBook(client, model, strategy, alpha, objective, timeout=frame_timeout,
                     source=source, sink=sink)

    def run(index: int, frame: Any) -> Any:
        deadline = time.monotonic() + frame_timeout
        errors: list[str] = []
        plan = None
        try:
            x = _load(frame, model)
        except (MeshdlError, OSError, ValueError, TypeError) as exc:
            return _failed(index, f"{base}-{index}", f"frame {index} cannot be read: {exc}",
                           0, None)
        for attempt in range(1, max_attempts + 1):
            job = f"{base}-{index}-{attempt}"
            try:
                plan, gen = book.pick(tuple(x.shape))
            except MeshdlError as exc:
                errors.append(f"attempt {attempt}: no plan: {exc}")
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(0.2 * attempt, max(0.0, deadline - time.monotonic())))
                continue
            try:
                res = client.run_on_plan(job, x, plan, deadline)
            except (RetryableJobError, TransportError) as exc:
                errors.append(f"attempt {attempt} (job {job}): {exc}")
                log.info("stream frame %d: %s; re-planning", index, exc)
                book.invalidate(gen)
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(0.1 * attempt, max(0.0, deadline - time.monotonic())))
                continue
            except MeshdlError as exc:           # not fixable by a new plan
                errors.append(f"attempt {attempt} (job {job}): {exc}")
                break
            res.attempts, res.index = attempt, index
            res.top5 = imaging.topk(res.output, topk, labels=labels)
            return res
        return _failed(index, f"{base}-{index}", "; ".join(errors[-3:]) or "no attempt ran",
                       len(errors), plan)

    first = next(it, _END)
    if first is _END:
        return
    if window is None:                       # the planner's window for the plan's replicas
        try:
            book.pick(tuple(_load(first, model).shape))
            book.reset_round_robin()
            w = stream_window(len(book.current()))
        except (MeshdlError, OSError, ValueError, TypeError) as exc:
            log.warning("stream: no plan yet (%s); window 4", exc)
            w = 4
    else:
        w = int(window)
    pending: deque[tuple[int, Future]] = deque()
    done = 0
    index = 0
    held: Any = first                   # a frame is read only when it can be sent
    more = True
    with ThreadPoolExecutor(max_workers=w, thread_name_prefix="meshdl-stream") as pool:
        try:
            while True:
                while more and len(pending) < w:          # credit: W frames at most
                    frame, held = (held, _END) if held is not _END else (next(it, _END),
                                                                         _END)
                    if frame is _END:
                        more = False
                        break
                    if rate_fps:
                        wait = t_start + index / rate_fps - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                    pending.append((index, pool.submit(run, index, frame)))
                    index += 1
                if not pending:
                    break
                _, fut = pending.popleft()
                res = fut.result()
                done += 1
                if progress is not None:
                    progress(done, done / max(1e-9, time.monotonic() - t_start))
                yield res
        finally:
            for _, fut in pending:
                fut.cancel()


_END = object()


__all__ = ["stream"]
