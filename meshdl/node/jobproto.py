"""The client side of the job protocol as a pure state machine:
``step(state, event) -> (state, effects)``, like ``node.election.step``.

No I/O and no clock: the client feeds what it sees (the leader's answers, the
leader record, members going offline or silent, plans cleared, task reports, the
result, clock ticks) and carries out the effects (publish the request, fetch the
plan and send the input, give up on this attempt with a reason, or fail the job).
Tests drive it directly.

One attempt: ``requesting`` (the request is re-sent every ``resend_s`` without an
answer, and at once when the leader changes: a request sent during a fail-over
reached nobody) -> ``planned`` (the client fetches the plan and sends the input) ->
``running`` (until the result) -> ``done``; or ``retry`` (this attempt failed in a
way a fresh plan may fix, with a named reason) or ``failed`` (the job cannot run:
the leader refused it, or no member of the mesh is alive).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

REQUESTING, PLANNED, RUNNING, DONE, RETRY, FAILED = (
    "requesting", "planned", "running", "done", "retry", "failed")
ENDED = (DONE, RETRY, FAILED)


# ------------------------------------------------------------------ messages (typed views
# of the wire's JobStatus states: "planned", "failed", "task", "input")
# The leader's machine (``node.leaderproto``) emits the same two answers, naming the job.
@dataclass(frozen=True)
class JobPlanned:
    plan_id: str
    term: int = 0
    job: str = ""


@dataclass(frozen=True)
class JobFailed:
    reason: str
    by_leader: bool = False       # the leader refused the job (no plan will fix it)
    job: str = ""


@dataclass(frozen=True)
class TaskReport:
    task: str
    device: str = ""


def to_status(msg: "JobPlanned | JobFailed", ts: float, term: int = 0):
    """A leader's answer as the wire's job status (``planned`` + plan id, or ``failed`` +
    the reason)."""
    from meshdl.wire.control import JobStatus
    if isinstance(msg, JobPlanned):
        return JobStatus(msg.job, "planned", msg.plan_id, msg.term, ts)
    return JobStatus(msg.job, "failed", msg.reason[:2000], term, ts)


def from_status(st, requesting: bool) -> "JobPlanned | JobFailed | None":
    """The wire's ``planned``/``failed`` status as a message (None for other states);
    a failure while still requesting is the leader's refusal."""
    if st.state == "planned":
        return JobPlanned(st.detail, st.term, st.job)
    if st.state == "failed":
        return JobFailed(st.detail, requesting, st.job)
    return None


# ------------------------------------------------------------------ other events
@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class LeaderSeen:
    node: str | None              # None: the leader record was cleared
    term: int = 0


@dataclass(frozen=True)
class InputSent:
    devices: tuple[str, ...]      # the plan's devices
    tasks: int                    # the plan's task count


@dataclass(frozen=True)
class Offline:
    device: str


@dataclass(frozen=True)
class Silent:
    device: str
    seconds: float


@dataclass(frozen=True)
class PlanCleared:
    plan_id: str


@dataclass(frozen=True)
class Result:
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class NoMesh:
    why: str                      # no live member and no leader: what was seen, the fix


Event = Union[JobPlanned, JobFailed, TaskReport, Tick, LeaderSeen, InputSent, Offline,
              Silent, PlanCleared, Result, NoMesh]


# ------------------------------------------------------------------ effects
@dataclass(frozen=True)
class SendRequest:
    pass


@dataclass(frozen=True)
class StartInput:
    plan_id: str                  # fetch this plan, check it, send the input to its source


@dataclass(frozen=True)
class Finish:
    phase: str                    # done / retry / failed
    reason: str = ""


Effect = Union[SendRequest, StartInput, Finish]


@dataclass(frozen=True)
class Params:
    resend_s: float = 1.0         # re-send an unanswered request
    no_mesh_s: float = 2.0        # with no live member and no leader, give up after


@dataclass(frozen=True)
class Attempt:
    job: str
    started: float
    deadline: float
    params: Params = Params()
    phase: str = REQUESTING
    next_send: float = 0.0
    sends: int = 0
    leader: str | None = None
    plan_id: str = ""
    devices: tuple[str, ...] = ()
    tasks: int = 0
    reported: frozenset = frozenset()
    reason: str = ""


def start(job: str, now: float, deadline: float, leader: str | None = None,
          params: Params | None = None) -> tuple[Attempt, list[Effect]]:
    a = Attempt(job, now, deadline, params or Params(), leader=leader,
                next_send=now + (params or Params()).resend_s, sends=1)
    return a, [SendRequest()]


def _end(a: Attempt, phase: str, reason: str = "") -> tuple[Attempt, list[Effect]]:
    return replace(a, phase=phase, reason=reason), [Finish(phase, reason)]


def step(a: Attempt, e: Event) -> tuple[Attempt, list[Effect]]:
    """The attempt after ``e`` and the effects to carry out."""
    if a.phase in ENDED:
        return a, []
    if isinstance(e, Tick):
        if e.now >= a.deadline:
            return _end(a, RETRY, _stuck(a))
        if a.phase == REQUESTING and e.now >= a.next_send:
            return replace(a, next_send=e.now + a.params.resend_s, sends=a.sends + 1), \
                [SendRequest()]
        return a, []
    if isinstance(e, NoMesh):
        return _end(a, FAILED, e.why) if a.phase == REQUESTING else (a, [])
    if isinstance(e, LeaderSeen):
        changed = e.node != a.leader
        a = replace(a, leader=e.node)
        if changed and e.node is not None and a.phase == REQUESTING:
            return replace(a, sends=a.sends + 1), [SendRequest()]   # ask the new leader now
        return a, []
    if isinstance(e, JobPlanned):
        if a.phase != REQUESTING:
            return a, []                      # a duplicate answer to a re-sent request
        return replace(a, phase=PLANNED, plan_id=e.plan_id), [StartInput(e.plan_id)]
    if isinstance(e, JobFailed):
        if e.by_leader:
            return _end(a, FAILED, f"the leader refused job {a.job}: {e.reason}")
        return _end(a, RETRY, e.reason)
    if isinstance(e, InputSent):
        if a.phase != PLANNED:
            return a, []
        return replace(a, phase=RUNNING, devices=tuple(e.devices), tasks=e.tasks), []
    if isinstance(e, TaskReport):
        return replace(a, reported=a.reported | {e.task}), []
    if isinstance(e, Offline):
        if a.phase in (PLANNED, RUNNING) and e.device in a.devices:
            return _end(a, RETRY, f"device {e.device} of plan {a.plan_id} went offline "
                                  f"during job {a.job}")
        return a, []
    if isinstance(e, Silent):
        if a.phase == RUNNING and e.device in a.devices:
            return _end(a, RETRY, f"device {e.device} of plan {a.plan_id} stopped responding "
                                  f"(no heartbeat for {e.seconds:.1f} s) during job {a.job}")
        return a, []
    if isinstance(e, PlanCleared):
        if a.phase in (PLANNED, RUNNING) and e.plan_id == a.plan_id and not a.reported:
            return _end(a, RETRY, f"the leader superseded plan {a.plan_id} before job "
                                  f"{a.job} started (the members or links changed)")
        return a, []
    if isinstance(e, Result):
        if a.phase not in (PLANNED, RUNNING):
            return a, []
        return _end(a, DONE) if e.ok else _end(a, RETRY, e.error or "the sink reported a "
                                                                   "failure")
    raise TypeError(f"not a job protocol event: {e!r}")


def _stuck(a: Attempt) -> str:
    """Name what an attempt that reached its deadline was waiting for."""
    if a.phase == REQUESTING:
        who = a.leader or "none known"
        return (f"job {a.job}: no answer from the leader ({who}) to {a.sends} request(s) "
                "before the deadline")
    if a.phase == PLANNED:
        return f"job {a.job}: plan {a.plan_id} was announced but the input could not be sent"
    return (f"job {a.job} (plan {a.plan_id}): no answer before the deadline; "
            f"{len(a.reported)}/{a.tasks} tasks reported")
