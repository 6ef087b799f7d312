"""Leader election as a pure state machine: ``step(state, event, now) -> (state, actions)``.

No I/O and no clock: the agent feeds events (membership, leader records, campaign
messages, clock ticks) with the current time and carries out the returned actions
(publish a claim, become leader, step down). Equal inputs give equal outputs.

Protocol
- Order: a candidate is better when it has more FLOP/s; ties go to the smaller id
  (``rank_key``). Every node ranks the online members the same way.
- Terms only grow. ``state.term`` is the highest term seen anywhere (leader
  records, claims, plans).
- When no live leader is known, the node of rank r claims term ``term + 1`` once
  ``settle + r * rank_step`` seconds have passed without a leader (the best node
  claims at once, the others only if it stays silent).
- A claim stands if, within ``claim_window``, no better claim for the same term and
  no claim or leader record of a higher term arrives. Only then does the node act
  as leader (publish the retained leader record, plan). Two claims of one term are
  compared by ``rank_key``: the better one wins on every node.
- A leader that sees a better leader of its own term, or any higher term, steps
  down. A leader that sees a higher-term claim from a worse node counter-claims
  that term, so a node with a stale view cannot unseat a better leader for good.
- Plans carry their term; nodes drop plans of terms older than ``state.term``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping, Union

FOLLOWER, CANDIDATE, LEADER = "follower", "candidate", "leader"


def rank_key(node: str, flops: float) -> tuple[float, str]:
    """Sort key: smaller is better (more FLOP/s first, then the smaller id)."""
    return (-float(flops), node)


def order(members: Mapping[str, float]) -> list[str]:
    """Member ids best first."""
    return sorted(members, key=lambda n: rank_key(n, members[n]))


# ------------------------------------------------------------------ events
@dataclass(frozen=True)
class Members:
    """The online members and their FLOP/s (this node included)."""
    online: Mapping[str, float]


@dataclass(frozen=True)
class LeaderSeen:
    node: str
    term: int


@dataclass(frozen=True)
class LeaderCleared:
    """The retained leader record was cleared (the leader's will, or a step-down)."""


@dataclass(frozen=True)
class ClaimSeen:
    node: str
    term: int
    flops: float


@dataclass(frozen=True)
class TermSeen:
    """A term observed elsewhere (e.g. on a plan)."""
    term: int


@dataclass(frozen=True)
class Tick:
    pass


Event = Union[Members, LeaderSeen, LeaderCleared, ClaimSeen, TermSeen, Tick]


# ------------------------------------------------------------------ actions
@dataclass(frozen=True)
class Claim:
    term: int


@dataclass(frozen=True)
class BecomeLeader:
    term: int


@dataclass(frozen=True)
class StepDown:
    term: int
    reason: str


@dataclass(frozen=True)
class AssertLeader:
    """Re-publish the retained leader record (it was cleared or contested)."""
    term: int


@dataclass(frozen=True)
class LeaderChanged:
    node: str | None
    term: int


Action = Union[Claim, BecomeLeader, StepDown, AssertLeader, LeaderChanged]


# ------------------------------------------------------------------ state
@dataclass(frozen=True)
class Params:
    settle: float = 0.4
    claim_window: float = 0.3
    rank_step: float = 0.4
    leader_grace: float = 1.5


@dataclass(frozen=True)
class ElectionState:
    me: str
    flops: float
    started: float
    params: Params = field(default_factory=Params)
    term: int = 0
    leader: str | None = None
    leader_term: int = 0
    leader_seen_at: float = 0.0
    role: str = FOLLOWER
    claim_term: int = 0
    claim_at: float = 0.0
    members: Mapping[str, float] = field(default_factory=dict)
    best: Mapping[int, tuple[str, float]] = field(default_factory=dict)  # term -> best claim
    leaderless_since: float | None = None
    ranks: Mapping[str, float] = field(default_factory=dict)  # FLOP/s of every node seen

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", MappingProxyType(dict(self.members)))
        object.__setattr__(self, "best", MappingProxyType(dict(self.best)))
        object.__setattr__(self, "ranks", MappingProxyType(dict(self.ranks)))

    @property
    def is_leader(self) -> bool:
        return self.role == LEADER


def initial(me: str, flops: float, now: float, params: Params | None = None,
            term: int = 0) -> ElectionState:
    return ElectionState(me=me, flops=float(flops), started=now, params=params or Params(),
                         term=term, members={me: float(flops)})


def _ranks(s: "ElectionState", seen: Mapping[str, float]) -> dict[str, float]:
    """FLOP/s of every node seen (bounded: members plus the last 256 others)."""
    out = dict(s.ranks)
    out.update({n: float(f) for n, f in seen.items() if f > 0})
    if len(out) > 256:
        keep = set(s.members) | set(seen)
        for n in [n for n in out if n not in keep][:len(out) - 256]:
            del out[n]
    return out


def _better(a: tuple[str, float], b: tuple[str, float]) -> bool:
    return rank_key(*a) < rank_key(*b)


def _record_claim(s: ElectionState, node: str, term: int, flops: float) -> ElectionState:
    cur = s.best.get(term)
    if cur is None or _better((node, flops), cur):
        best = {t: c for t, c in s.best.items() if t >= s.term - 1}
        best[term] = (node, float(flops))
        s = replace(s, best=best)
    return s


def leader_alive(s: ElectionState, now: float) -> bool:
    if s.leader is None:
        return False
    if s.leader == s.me:
        return s.role == LEADER
    return s.leader in s.members or now - s.leader_seen_at < s.params.leader_grace


def step(s: ElectionState, event: Event, now: float) -> tuple[ElectionState, list[Action]]:
    """The state after ``event`` at time ``now`` and the actions to carry out."""
    acts: list[Action] = []
    if isinstance(event, Members):
        online = dict(event.online)
        online[s.me] = s.flops
        s = replace(s, members=online, ranks=_ranks(s, online))
    elif isinstance(event, TermSeen):
        if event.term > s.term:
            if s.role == FOLLOWER:       # keep the leader: its record of this term follows
                s = replace(s, term=event.term)
            else:
                s, acts = _higher_term(s, event.term, None, now)
    elif isinstance(event, ClaimSeen):
        s = _record_claim(s, event.node, event.term, event.flops)
        if event.flops > 0 and s.ranks.get(event.node) != event.flops:
            s = replace(s, ranks=_ranks(s, {event.node: event.flops}))
        s, acts = _on_claim(s, event, now)
    elif isinstance(event, LeaderSeen):
        s, acts = _on_leader(s, event, now)
    elif isinstance(event, LeaderCleared):
        if s.role == LEADER:
            acts.append(AssertLeader(s.leader_term))
        elif s.leader is not None:
            acts.append(LeaderChanged(None, s.term))
            s = replace(s, leader=None)
    elif not isinstance(event, Tick):
        raise TypeError(f"not an election event: {event!r}")
    s, more = _tick(s, now)
    return s, acts + more


def _higher_term(s: ElectionState, term: int, leader: str | None, now: float
                 ) -> tuple[ElectionState, list[Action]]:
    acts: list[Action] = []
    if s.role == LEADER:
        acts.append(StepDown(s.leader_term, f"term {term} seen"))
    if leader != s.leader:
        acts.append(LeaderChanged(leader, term))
    s = replace(s, term=term, role=FOLLOWER, claim_term=0, leader=leader,
                leader_term=term if leader else s.leader_term,
                leader_seen_at=now if leader else s.leader_seen_at,
                leaderless_since=None if leader else _hold(s, now))
    return s, acts


def _on_claim(s: ElectionState, c: ClaimSeen, now: float) -> tuple[ElectionState, list[Action]]:
    if c.node == s.me:
        return s, []
    mine = (s.me, s.flops)
    if c.term > s.term:
        if s.role == LEADER and _better(mine, (c.node, c.flops)):
            # a worse node with a stale view (or that took over while we were frozen):
            # claim the term after its term rather than yield to it, so that two leaders
            # never share a term and its plans are fenced off as older
            t = c.term + 1
            s = replace(s, term=t, claim_term=t, claim_at=now, role=CANDIDATE)
            s = _record_claim(s, s.me, t, s.flops)
            return s, [StepDown(s.leader_term, f"re-claiming leadership over {c.node}'s "
                                               f"term {c.term} with term {t}"), Claim(t)]
        return _higher_term(s, c.term, None, now)
    if c.term == s.term and s.role == CANDIDATE and s.claim_term == c.term \
            and _better((c.node, c.flops), mine):
        return replace(s, role=FOLLOWER, claim_term=0, leaderless_since=_hold(s, now)), []
    return s, []


def _on_leader(s: ElectionState, e: LeaderSeen, now: float) -> tuple[ElectionState, list[Action]]:
    if e.term < s.term or (e.term < s.leader_term):
        return s, []
    if e.node == s.me:
        if s.role == LEADER and e.term == s.leader_term:
            return s, []
        if e.term > s.term or s.role != LEADER:
            # our own record from an earlier life: not ours to act on
            return _higher_term(s, e.term, None, now) if e.term > s.term else (s, [])
        return s, []
    if e.term > s.term:
        return _higher_term(s, e.term, e.node, now)
    # same term
    claimant = s.best.get(e.term)
    theirs = (e.node, s.members.get(e.node, claimant[1] if claimant and claimant[0] == e.node
                                    else 0.0))
    if s.role == LEADER:
        # two leaders of one term (claims crossed under load): the better-ranked one
        # keeps it on both sides, whoever recorded which claim
        theirs = (e.node, s.ranks.get(e.node, theirs[1]))
        if (claimant is not None and claimant[0] == e.node) or _better(theirs,
                                                                       (s.me, s.flops)):
            return replace(s, role=FOLLOWER, leader=e.node, leader_seen_at=now), [
                StepDown(s.term, f"{e.node} holds a better claim to term {e.term}"),
                LeaderChanged(e.node, e.term)]
        return s, [AssertLeader(s.leader_term)]
    if claimant is not None and claimant[0] != e.node and _better(claimant, theirs) \
            and claimant[0] == s.me:
        return s, []
    acts: list[Action] = [] if s.leader == e.node else [LeaderChanged(e.node, e.term)]
    return replace(s, role=FOLLOWER, claim_term=0, leader=e.node, leader_term=e.term,
                   leader_seen_at=now, leaderless_since=None), acts


def _hold(s: ElectionState, now: float) -> float:
    """After another node's claim: give it its window before counting as leaderless."""
    return now + s.params.claim_window + s.params.rank_step


def _tick(s: ElectionState, now: float) -> tuple[ElectionState, list[Action]]:
    p = s.params
    if s.role == CANDIDATE:
        if now - s.claim_at < p.claim_window:
            return s, []
        best = s.best.get(s.claim_term)
        if s.term == s.claim_term and best is not None and best[0] == s.me:
            s = replace(s, role=LEADER, leader=s.me, leader_term=s.claim_term,
                        leader_seen_at=now, leaderless_since=None)
            return s, [BecomeLeader(s.claim_term), LeaderChanged(s.me, s.claim_term)]
        return replace(s, role=FOLLOWER, claim_term=0, leaderless_since=_hold(s, now)), []
    if s.role == LEADER:
        return s, []
    if leader_alive(s, now):
        return (replace(s, leaderless_since=None) if s.leaderless_since is not None else s), []
    acts: list[Action] = []
    if s.leader is not None:
        acts.append(LeaderChanged(None, s.term))
        s = replace(s, leader=None)
    since = s.leaderless_since
    if since is None:
        since = now
        s = replace(s, leaderless_since=now)
    ranked = order(s.members)
    rank = ranked.index(s.me)
    start = max(since, s.started + p.settle)
    if now < start + rank * p.rank_step:
        return s, acts
    term = s.term + 1
    s = replace(s, term=term, role=CANDIDATE, claim_term=term, claim_at=now)
    s = _record_claim(s, s.me, term, s.flops)
    return s, acts + [Claim(term)]
