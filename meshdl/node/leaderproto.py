"""The leader side of the job protocol as a pure state machine:
``step(state, event) -> (state, effects)``, like ``node.election.step`` and the
client's ``node.jobproto.step``.

No I/O and no clock. The leader's edge (``node.leader.LeaderDuties``, used by the real
node and by the test harness) feeds what happens (a job was requested, a plan was
issued or could not be made, the live members changed, the leader changed, the clock)
and carries out the effects: plan a request (``MakePlan``; the edge plans and issues
it, then feeds ``PlanIssued`` or ``PlanRefused``) and answer a job with the messages
the client's machine takes: ``jobproto.JobPlanned(plan_id, term, job)`` or
``jobproto.JobFailed(reason, by_leader, job)`` (on the wire, the job's status
``planned`` or ``failed``).

Rules
- Standing requests: the mesh's defaults plus every distinct request a client made
  (bounded, least recently used dropped, defaults kept). Each has at most one current
  plan, made on one membership; a job is answered with it while the live members are
  the ones it was made on, else the request is planned again first.
- A job waits only while its request is being planned; at most ``per_client`` jobs of
  one client and ``max_waiting`` in all wait (more are refused, named).
- A duplicate request (the client re-sent it: the answer was lost, or the leader
  changed) is answered again with the same plan while that plan is current; never
  planned twice.
- Jobs answered within their deadline whose plan uses a member that then went away
  are failed, naming the device and what happened to it.
- Once another node leads (or a newer term begins), this machine answers nothing:
  waiting jobs are dropped, their clients re-send to the new leader.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping, Union

from meshdl.errors import PlanError
from meshdl.node.jobproto import JobFailed, JobPlanned
from meshdl.wire import topics


# ------------------------------------------------------------------ requests
@dataclass(frozen=True)
class StandingRequest:
    model: str
    strategy: str = "meshdl"
    alpha: float = 0.5
    source: str | None = None      # None: the topology default, else the leader
    sink: str | None = None
    input_shape: tuple[int, ...] | None = None   # None: the model's own
    objective: str | None = None   # None: alpha mix; latency, energy, throughput (streams)

    @classmethod
    def from_plan(cls, plan: Any) -> "StandingRequest | None":
        """The request a plan was made for (``meta["request"]``), or None."""
        meta = getattr(plan, "meta", None)
        if meta is None and isinstance(plan, Mapping):
            meta = plan.get("meta")
        req = meta.get("request") if isinstance(meta, Mapping) else None
        if not isinstance(req, Mapping):
            return None
        try:
            shape = req.get("input_shape")
            return cls(str(req["model"]), str(req.get("strategy") or "meshdl"),
                       float(req.get("alpha", 0.5)), req.get("source"), req.get("sink"),
                       None if shape is None else tuple(int(v) for v in shape),
                       _objective("plan", req.get("objective")))
        except (KeyError, TypeError, ValueError, PlanError):
            return None

    @classmethod
    def from_job(cls, job: Any, default: "StandingRequest") -> "StandingRequest":
        """The request of a wire ``JobRequest`` (raises PlanError naming a bad option)."""
        o = job.options if isinstance(job.options, Mapping) else {}

        def opt_id(key: str) -> str | None:
            v = o.get(key)
            return topics.validate_id(v, key) if v not in (None, "") else None
        alpha = o.get("alpha", default.alpha)
        if type(alpha) not in (int, float) or not 0.0 <= alpha <= 1.0:
            raise PlanError(f"job {job.job}: alpha {alpha!r} must be a number in [0, 1]")
        return cls(job.model or default.model, job.strategy or default.strategy, float(alpha),
                   opt_id("source"), opt_id("sink"), _shape(job.job, o.get("input_shape")),
                   _objective(job.job, o.get("objective")))


def _objective(job: str, v: Any) -> str | None:
    if v in (None, ""):
        return None
    if v not in ("latency", "energy", "throughput"):
        raise PlanError(f"job {job}: objective {v!r} must be latency, energy or throughput")
    return v


def _shape(job: str, v: Any) -> tuple[int, ...] | None:
    """A requested input shape: (N, C, H, W) of positive ints, bounded."""
    if v is None:
        return None
    if (not isinstance(v, (list, tuple)) or len(v) != 4
            or not all(type(d) is int and 0 < d <= 8192 for d in v)):
        raise PlanError(f"job {job}: input_shape {v!r} must be 4 positive ints (N, C, H, W)")
    return tuple(v)


# ------------------------------------------------------------------ events
@dataclass(frozen=True)
class JobRequested:
    job: str
    client: str
    request: StandingRequest | None   # None: the request was refused (``error`` says why)
    now: float
    deadline_s: float = 60.0
    error: str = ""

    @classmethod
    def from_wire(cls, msg: Any, default: StandingRequest, now: float) -> "JobRequested":
        """A wire ``JobRequest`` as an event (a bad option becomes ``error``)."""
        deadline = msg.deadline_s if msg.deadline_s and msg.deadline_s > 0 else 60.0
        try:
            return cls(msg.job, msg.client, StandingRequest.from_job(msg, default), now,
                       float(deadline))
        except PlanError as exc:
            return cls(msg.job, msg.client, None, now, float(deadline), str(exc))


@dataclass(frozen=True)
class PlanIssued:
    """The edge planned ``request`` on ``members`` and issued plan ``plan_id``."""
    request: StandingRequest
    plan_id: str
    devices: tuple[str, ...]
    members: frozenset


@dataclass(frozen=True)
class PlanRefused:
    request: StandingRequest
    reason: str


@dataclass(frozen=True)
class MembersChanged:
    members: frozenset              # the live members now
    now: float
    why: tuple = ()                 # ((device, what happened to it), ...)


@dataclass(frozen=True)
class LeaderChanged:
    leader: str | None
    term: int


@dataclass(frozen=True)
class Replan:
    """The edge's planner changed (e.g. a hand-made plan was added or withdrawn): the
    current plans of ``model`` (every model when None) are made again on next use."""
    model: str | None = None


@dataclass(frozen=True)
class Tick:
    now: float


Event = Union[JobRequested, PlanIssued, PlanRefused, MembersChanged, LeaderChanged, Replan,
              Tick]


# ------------------------------------------------------------------ effects
@dataclass(frozen=True)
class MakePlan:
    request: StandingRequest        # plan it on the live members, issue it, feed the outcome


Effect = Union[MakePlan, JobPlanned, JobFailed]


# ------------------------------------------------------------------ state
@dataclass(frozen=True)
class Params:
    max_requests: int = 32          # standing requests kept
    per_client: int = 8             # jobs of one client waiting for a plan
    max_waiting: int = 256          # jobs waiting for a plan, in all
    remember: int = 512             # answered jobs kept (duplicates, member failures)


@dataclass(frozen=True)
class Waiting:
    job: str
    client: str
    request: StandingRequest
    until: float                    # the job's deadline


@dataclass(frozen=True)
class Answered:
    plan_id: str                    # "" when the job was refused
    reason: str
    until: float


@dataclass(frozen=True)
class LeaderState:
    me: str
    term: int
    params: Params = field(default_factory=Params)
    active: bool = True
    members: frozenset = frozenset()
    defaults: tuple = ()
    requests: tuple = ()            # standing requests, least recently used first
    current: Mapping[StandingRequest, tuple[str, frozenset]] = field(default_factory=dict)
    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # plan -> devices
    planning: frozenset = frozenset()                  # requests with a MakePlan out
    waiting: tuple = ()             # Waiting, oldest first
    answered: Mapping[str, Answered] = field(default_factory=dict)   # job -> answer

    def __post_init__(self) -> None:
        for name in ("current", "devices", "answered"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def plan_of(self, request: StandingRequest) -> str | None:
        """The request's current plan, if made on the live members."""
        cur = self.current.get(request)
        return cur[0] if cur is not None and cur[1] == self.members else None


def initial(me: str, term: int, defaults: tuple = (), recovered: tuple = (),
            members: frozenset = frozenset(), params: Params | None = None) -> LeaderState:
    """A leader's machine for ``term``: the defaults plus requests recovered from the
    retained plans of earlier leaders."""
    s = LeaderState(me, term, params or Params(), members=frozenset(members),
                    defaults=tuple(dict.fromkeys(defaults)))
    for req in (*s.defaults, *recovered):
        s = _remember(s, req)
    return s


def _remember(s: LeaderState, req: StandingRequest) -> LeaderState:
    reqs = [r for r in s.requests if r != req] + [req]
    current = dict(s.current)
    while len(reqs) > s.params.max_requests:
        old = next((r for r in reqs if r not in s.defaults), None)
        if old is None:
            break
        reqs.remove(old)
        current.pop(old, None)
    return replace(s, requests=tuple(reqs), current=current)


def _answer(s: LeaderState, job: str, plan_id: str, reason: str, until: float
            ) -> tuple[LeaderState, list[Effect]]:
    answered = dict(s.answered)
    answered.pop(job, None)
    answered[job] = Answered(plan_id, reason, until)
    while len(answered) > s.params.remember:
        answered.pop(next(iter(answered)))
    s = replace(s, answered=answered)
    if plan_id:
        return s, [JobPlanned(plan_id, s.term, job)]
    return s, [JobFailed(reason, True, job)]


def _prune_devices(s: LeaderState) -> LeaderState:
    keep = {pid for pid, _ in s.current.values()} | {a.plan_id for a in s.answered.values()}
    return replace(s, devices={p: d for p, d in s.devices.items() if p in keep})


def step(s: LeaderState, e: Event) -> tuple[LeaderState, list[Effect]]:
    """The leader's machine after ``e`` and the effects to carry out."""
    if isinstance(e, LeaderChanged):
        if s.active and (e.leader != s.me or e.term > s.term):
            return replace(s, active=False, waiting=(), planning=frozenset()), []
        return s, []
    if not s.active:
        return s, []
    if isinstance(e, JobRequested):
        return _requested(s, e)
    if isinstance(e, PlanIssued):
        current = dict(s.current)
        current[e.request] = (e.plan_id, frozenset(e.members))
        devices = dict(s.devices)
        devices[e.plan_id] = tuple(e.devices)
        s = replace(s, current=current, devices=devices, planning=s.planning - {e.request})
        if e.request not in s.requests:
            s = _remember(s, e.request)
        return _release(s, e.request, e.plan_id, "")
    if isinstance(e, PlanRefused):
        current = dict(s.current)
        current.pop(e.request, None)
        s = replace(s, current=current, planning=s.planning - {e.request})
        return _release(s, e.request, "", e.reason)
    if isinstance(e, MembersChanged):
        return _members(s, e)
    if isinstance(e, Replan):
        return replace(s, current={r: c for r, c in s.current.items()
                                   if e.model is not None and r.model != e.model}), []
    if isinstance(e, Tick):
        late = [w for w in s.waiting if w.until <= e.now]
        if not late:
            return s, []
        s = replace(s, waiting=tuple(w for w in s.waiting if w.until > e.now))
        effects: list[Effect] = []
        for w in late:
            s, more = _answer(s, w.job, "", f"no plan for job {w.job} of {w.client} before "
                              "its deadline (the leader is still planning)", w.until)
            effects += more
        return s, effects
    raise TypeError(f"not a leader job protocol event: {e!r}")


def _requested(s: LeaderState, e: JobRequested) -> tuple[LeaderState, list[Effect]]:
    until = e.now + e.deadline_s
    old = s.answered.get(e.job)
    if old is not None:                          # a re-sent request: the same answer
        if not old.plan_id:
            return s, [JobFailed(old.reason, True, e.job)]
        if e.request is not None and s.plan_of(e.request) == old.plan_id:
            return s, [JobPlanned(old.plan_id, s.term, e.job)]
    if any(w.job == e.job for w in s.waiting):
        return s, []                             # already waiting for its plan
    if e.request is None:
        return _answer(s, e.job, "", e.error or f"job {e.job}: malformed request", until)
    s = _remember(s, e.request)
    pid = s.plan_of(e.request)
    if pid is not None:
        return _answer(s, e.job, pid, "", until)
    mine = sum(1 for w in s.waiting if w.client == e.client)
    if mine >= s.params.per_client:
        return _answer(s, e.job, "", f"client {e.client} already has {mine} job(s) waiting "
                       f"for a plan (at most {s.params.per_client}); send fewer at once",
                       until)
    if len(s.waiting) >= s.params.max_waiting:
        return _answer(s, e.job, "", f"the leader has {len(s.waiting)} jobs waiting for a "
                       "plan; try again shortly", until)
    s = replace(s, waiting=s.waiting + (Waiting(e.job, e.client, e.request, until),))
    if e.request in s.planning:
        return s, []
    return replace(s, planning=s.planning | {e.request}), [MakePlan(e.request)]


def _release(s: LeaderState, req: StandingRequest, plan_id: str, reason: str
             ) -> tuple[LeaderState, list[Effect]]:
    """Answer every job waiting for ``req``'s plan."""
    ready = [w for w in s.waiting if w.request == req]
    s = replace(s, waiting=tuple(w for w in s.waiting if w.request != req))
    effects: list[Effect] = []
    for w in ready:
        s, more = _answer(s, w.job, plan_id, reason, w.until)
        effects += more
    return _prune_devices(s), effects


def _members(s: LeaderState, e: MembersChanged) -> tuple[LeaderState, list[Effect]]:
    gone = s.members - e.members
    s = replace(s, members=frozenset(e.members))
    if not gone:
        return s, []
    why = dict(e.why)
    answered = dict(s.answered)
    effects: list[Effect] = []
    for job, a in s.answered.items():
        if not a.plan_id or a.until <= e.now:
            continue
        lost = [d for d in s.devices.get(a.plan_id, ()) if d in gone]
        if lost:
            d = sorted(lost)[0]
            del answered[job]                    # a re-sent request is planned afresh
            effects.append(JobFailed(f"device {d} {why.get(d, 'left the mesh')} during job "
                                     f"{job} (plan {a.plan_id}); retry on a new plan",
                                     False, job))
    return _prune_devices(replace(s, answered=answered)), effects
