"""The comparison arms of tools/bench_dynamics.py, run for real on the mesh.

``fixed`` (the plan made at the start, pinned for every job) and ``oracle`` (for each
job, the plan the planner makes for the trace's links of that moment) are issued to
the running mesh as the leader issues its plans: an ``IssuedPlan`` of the leader's
term, published retained on ``plan/{id}`` (every node adopts it, ``node.handlers``),
then each job runs on it through ``MeshClient.run_on_plan`` (no request to the
leader): the same client path, data plane, links and trace as meshdl's own jobs.

The leader keeps planning on its telemetry meanwhile and clears retained plans of its
term that are not its own after ``RETIRE_S`` x K; ``Pinner`` re-issues a pinned plan
as soon as it is cleared (a job already running on it would otherwise hold its pieces
"until the plan is adopted"), and a job the clear caught before its first task report
is re-run at once, its lost time counted.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("bench_dynamics")


def reset_links(up: Any, mesh: Any, trace: Any) -> None:
    """Shape every access link the trace touches back to the topology's figures."""
    for dev in sorted({e.target for e in trace.events}):
        acc = mesh.star.link_of(dev) if mesh.star is not None else None
        if acc is None:
            raise SystemExit(f"bench_dynamics: cannot reset {dev!r}: only device access "
                             "links of a star mesh are traced under --netns")
        up.shape(dev, up_bps=acc.up_bps, down_bps=acc.down_bps)


def plan_for(g: Any, mesh: Any, k: float, model: str, leader: str) -> Any:
    """The plan the leader would make for the client's request (``make_plan``) on
    ``mesh`` (real-world figures) dilated K times."""
    from meshdl.node.leader import make_plan
    from meshdl.node.leaderproto import StandingRequest
    req = StandingRequest(model, "meshdl", 1.0, input_shape=tuple(g.input_shape))
    return make_plan(req, mesh.dilated(k) if k != 1.0 else mesh, g, leader)


class Pinner(threading.Thread):
    """Keeps the plans it was given issued on the mesh (retained, the leader's term)."""

    def __init__(self, client: Any, watcher: Any, mesh_name: str) -> None:
        super().__init__(daemon=True, name="pinner")
        self._c, self._w, self._mesh = client, watcher, mesh_name
        self._pinned: dict[str, Any] = {}      # plan id -> IssuedPlan
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.reissued = 0

    def leader(self, timeout: float = 30.0) -> tuple[str, int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ld = self._w.snapshot().leader
            if ld is not None and ld.node:
                return ld.node, int(ld.term)
            time.sleep(0.05)
        raise SystemExit("bench_dynamics: no leader on the mesh")

    def issue(self, plan: Any) -> Any:
        """Issue ``plan`` for the current leader's term; returns the issued Plan."""
        from meshdl.node.planstore import IssuedPlan
        node, term = self.leader()
        issued = IssuedPlan.issue(plan, term, node)
        with self._lock:
            old = self._pinned.get(issued.plan_id)
            if old is not None and old.term == term:
                return old.plan
            self._pinned[issued.plan_id] = issued
        self._send(issued)
        return issued.plan

    def clear(self) -> None:
        with self._lock:
            self._pinned.clear()

    def _send(self, issued: Any) -> None:
        from meshdl.wire import topics
        from meshdl.wire.control import encode_control
        self._c.bus.publish(topics.plan(self._mesh, issued.plan_id),
                            encode_control(issued.message(time.time())), qos=1, retain=True)

    def run(self) -> None:
        seen: set[str] = set()
        while not self._stop.wait(0.02):
            plans = self._w.snapshot().plans
            with self._lock:
                pinned = dict(self._pinned)
            for pid, issued in pinned.items():
                if pid in plans:
                    seen.add(pid)
                elif pid in seen:             # the leader cleared it: issue it again
                    seen.discard(pid)
                    self.reissued += 1
                    log.info("plan %s cleared by the leader; issued again", pid)
                    self._send(issued)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class PassResult:
    jobs: list = field(default_factory=list)     # per release: (started real s, measured
    #                                              s, Plan), (started, None, None) if failed
    failed: list = field(default_factory=list)   # (started, error)
    late: list = field(default_factory=list)     # real seconds behind the schedule, per job
    wall: dict = field(default_factory=dict)     # job index -> client's wall time / K
    marks: dict = field(default_factory=dict)    # job index -> InferResult.marks
    reruns: int = 0


def run_pinned(c: Any, pinner: Pinner, x: Any, schedule: list[float], t0: float, k: float,
               plan_at: Callable[[float], Any], timeout: float) -> PassResult:
    """Jobs released at ``schedule`` (real-world seconds after ``t0``, a job waits for
    the one before it), each on ``plan_at(start)`` issued just before it."""
    from meshdl.client_results import RetryableJobError
    from meshdl.errors import MeshdlError
    out = PassResult()
    for i, due in enumerate(schedule):
        wait = t0 + due * k - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        mono = time.monotonic()
        started = (mono - t0) / k
        out.late.append(max(0.0, started - due))
        lost = 0.0
        for attempt in range(3):
            t_try = time.monotonic()
            plan = pinner.issue(plan_at((t_try - t0) / k))
            job = c.job_id(uuid.uuid4().hex[:12])
            try:
                r = c.run_on_plan(job, x, plan, time.monotonic() + timeout)
            except RetryableJobError as exc:
                lost += time.monotonic() - t_try
                out.reruns += 1
                log.warning("t=%.2f s: job on %s re-run: %s", started, plan.plan_id, exc)
                continue
            except MeshdlError as exc:
                out.failed.append((started, str(exc)))
                out.jobs.append((started, None, None))
                log.warning("t=%.2f s: job failed: %s", started, exc)
                break
            meas = ((r.mesh_latency_s if r.mesh_latency_s is not None else r.latency_s)
                    + lost) / k
            out.jobs.append((started, meas, plan))
            out.wall[i] = (time.monotonic() - mono) / k
            out.marks[i] = r.marks
            log.info("t=%.2f s: %.3f s on %s (%s); client wall %.3f s", started, meas,
                     plan.plan_id, "+".join(sorted(plan.devices())), out.wall[i])
            break
        else:
            out.failed.append((started, "three attempts re-run"))
            out.jobs.append((started, None, None))
    return out
