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

Quorum mode (``Params.quorum``, a secure mesh, where every vote is signed by an
enrolled device and checked before it gets here):
- A voter votes (``Vote``) for the claimant of a term only if the claimant is the
  best live member it knows (``order(members)[0]``, figures capped by the enrolled
  profiles), and at most once per term.
- A candidate becomes leader only with votes from a majority of the live members it
  knows (itself included), after its claim window; without them it gives up after
  ``vote_window`` and, leaderless again, claims later like anyone else.
- A leader record (``LeaderSeen.voters``: the verified voters it carries) is acted
  on only if its voters plus this node (when it ranks the leader best) are a
  majority of the live members; otherwise it is held (``pending``, looked at again
  when the members change), the node votes for it if it ranks its leader best (so
  the leader can re-publish its record with one more vote), and an ``Ignored``
  action reports it. A claim from a node that is not the best live member does not
  move the term or unseat anyone: a stolen weaker device cannot jump terms.
- A cleared leader record (an empty payload: unsigned, so any device may send it)
  does not un-seat a leader that is still a live member (``Kept``); its death shows
  as its signed offline will or heartbeat silence, which take it out of ``Members``.
  The leader itself re-publishes its record when it sees it cleared.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping, Union

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
    voters: frozenset = frozenset()     # verified voters (quorum mode only)


@dataclass(frozen=True)
class VoteSeen:
    """A (signed, verified) vote of ``voter`` for ``candidate`` in ``term``."""
    voter: str
    candidate: str
    term: int


@dataclass(frozen=True)
class LeaderCleared:
    """The retained leader record was cleared (the leader's will, a step-down, or, on a
    secure mesh, any device: an empty payload is unsigned)."""


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


Event = Union[Members, LeaderSeen, LeaderCleared, ClaimSeen, TermSeen, VoteSeen, Tick]


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


@dataclass(frozen=True)
class Vote:
    """Publish a vote for ``candidate`` in ``term`` (quorum mode)."""
    term: int
    candidate: str


@dataclass(frozen=True)
class Kept:
    """Quorum mode: the leader record was cleared but its leader is live: still followed."""
    node: str
    term: int


@dataclass(frozen=True)
class Ignored:
    """A leader record or claim not acted on (quorum mode): log it."""
    node: str
    term: int
    reason: str


Action = Union[Claim, BecomeLeader, StepDown, AssertLeader, LeaderChanged, Vote, Ignored, Kept]


# ------------------------------------------------------------------ state
@dataclass(frozen=True)
class Params:
    settle: float = 0.4
    claim_window: float = 0.3
    rank_step: float = 0.4
    leader_grace: float = 1.5
    quorum: bool = False           # leadership needs votes from a majority (secure mesh)
    vote_window: float = 1.5       # a candidate without a majority by then gives up


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
    votes: Mapping[int, frozenset] = field(default_factory=dict)  # term -> voters for me
    voted: Mapping[int, str] = field(default_factory=dict)        # term -> my vote
    pending: LeaderSeen | None = None     # a leader record waiting for its quorum

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", MappingProxyType(dict(self.members)))
        object.__setattr__(self, "best", MappingProxyType(dict(self.best)))
        object.__setattr__(self, "ranks", MappingProxyType(dict(self.ranks)))
        object.__setattr__(self, "votes", MappingProxyType(dict(self.votes)))
        object.__setattr__(self, "voted", MappingProxyType(dict(self.voted)))

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
        if s.pending is not None and s.params.quorum:
            pending, s = s.pending, replace(s, pending=None)
            s, acts = _on_leader(s, pending, now)
    elif isinstance(event, VoteSeen):
        s, acts = _on_vote(s, event)
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
        s, acts = (_on_claim_quorum if s.params.quorum else _on_claim)(s, event, now)
    elif isinstance(event, LeaderSeen):
        s, acts = _on_leader(s, event, now)
    elif isinstance(event, LeaderCleared):
        if s.role == LEADER:
            acts.append(AssertLeader(s.leader_term))
        elif s.leader is not None and s.params.quorum and s.leader in s.members:
            # anyone may clear the record (empty payloads are unsigned): leadership
            # comes from verified records and ends with the leader's liveness (its
            # signed offline will, or heartbeat silence, takes it out of the members)
            acts.append(Kept(s.leader, s.leader_term))
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


# ------------------------------------------------------------------ quorum mode
def best_live(s: ElectionState) -> str:
    """The best live member this node knows (itself included)."""
    return order(s.members)[0]


def supporters(s: ElectionState, candidate: str, voters: frozenset) -> frozenset:
    """The live members backing ``candidate``: its voters, plus this node if it ranks
    the candidate best."""
    out = frozenset(v for v in voters if v in s.members)
    return out | {s.me} if best_live(s) == candidate else out


def has_quorum(s: ElectionState, candidate: str, voters: frozenset) -> bool:
    """True when a majority of the live members back ``candidate``."""
    return 2 * len(supporters(s, candidate, voters)) > len(s.members)


def _keep_recent(d: Mapping[int, Any], term: int) -> dict[int, Any]:
    return {t: v for t, v in d.items() if t >= term - 4}


def _vote(s: ElectionState, term: int, candidate: str) -> tuple[ElectionState, list[Action]]:
    if term in s.voted or candidate == s.me:       # one vote per term
        return s, []
    voted = _keep_recent(s.voted, term)
    voted[term] = candidate
    return replace(s, voted=voted), [Vote(term, candidate)]


def _on_vote(s: ElectionState, v: VoteSeen) -> tuple[ElectionState, list[Action]]:
    if not s.params.quorum or v.candidate != s.me:
        return s, []
    mine = s.claim_term if s.role == CANDIDATE else (s.leader_term if s.role == LEADER else 0)
    if v.term != mine or v.voter in s.votes.get(v.term, frozenset()):
        return s, []
    votes = _keep_recent(s.votes, v.term)
    votes[v.term] = votes.get(v.term, frozenset({s.me})) | {v.voter}
    s = replace(s, votes=votes)
    # a leader re-publishes its record with the new vote (nodes that joined after its
    # election see the majority grow); a candidate waits for its tick
    return s, ([AssertLeader(s.leader_term)] if s.role == LEADER else [])


def _on_claim_quorum(s: ElectionState, c: ClaimSeen, now: float
                     ) -> tuple[ElectionState, list[Action]]:
    """Quorum mode: only a claim of the best live member moves anything here."""
    if c.node == s.me or c.term < s.term:
        return s, []
    if c.node not in s.members or best_live(s) != c.node:
        return s, [Ignored(c.node, c.term, f"claim of a node that is not the best live member "
                                           f"(best: {best_live(s)})")]
    acts: list[Action] = []
    if c.term > s.term:
        s, acts = _higher_term(s, c.term, None, now)
    elif s.role == CANDIDATE and s.claim_term == c.term:
        s = replace(s, role=FOLLOWER, claim_term=0, leaderless_since=_hold(s, now))
    s, more = _vote(s, c.term, c.node)
    return s, acts + more


def _on_leader_quorum(s: ElectionState, e: LeaderSeen, now: float
                      ) -> tuple[ElectionState, list[Action]] | None:
    """None when the record has its quorum (handled as usual), else what to do."""
    if e.node == s.me or e.term < s.term or e.term < s.leader_term:
        return None
    if has_quorum(s, e.node, e.voters):
        return None
    backing = len(supporters(s, e.node, e.voters))
    acts: list[Action] = [Ignored(e.node, e.term, f"{backing} of {len(s.members)} live "
                                                  f"members back it (no majority)")]
    s = replace(s, pending=e)
    if best_live(s) == e.node and s.me not in e.voters:
        s, more = _vote(s, e.term, e.node)
        acts += more
    if s.role == LEADER:
        acts.append(AssertLeader(s.leader_term))      # put our record back
    return s, acts


def _on_leader(s: ElectionState, e: LeaderSeen, now: float) -> tuple[ElectionState, list[Action]]:
    if s.params.quorum:
        held = _on_leader_quorum(s, e, now)
        if held is not None:
            return held
        if s.pending is not None and s.pending.term <= e.term:
            s = replace(s, pending=None)
        explicit = frozenset(v for v in e.voters if v in s.members)
        if e.node != s.me and s.me not in e.voters and 2 * len(explicit) <= len(s.members):
            # we back it but its signed votes are no majority yet: add ours, so that
            # clients (who count signed votes only) see the majority too
            s, vote = _vote(s, e.term, e.node)
            s, acts = _on_leader(replace(s, params=replace(s.params, quorum=False)), e, now)
            return replace(s, params=replace(s.params, quorum=True)), vote + acts
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
        won = s.term == s.claim_term and best is not None and best[0] == s.me
        if won and p.quorum and not has_quorum(
                s, s.me, s.votes.get(s.claim_term, frozenset({s.me}))):
            if now - s.claim_at < p.vote_window:
                return s, []                       # waiting for votes
            won = False
        if won:
            s = replace(s, role=LEADER, leader=s.me, leader_term=s.claim_term,
                        leader_seen_at=now, leaderless_since=None)
            return s, [BecomeLeader(s.claim_term), LeaderChanged(s.me, s.claim_term)]
        # quorum mode: the best live member tries again at once (only it can win)
        return replace(s, role=FOLLOWER, claim_term=0,
                       leaderless_since=now if p.quorum else _hold(s, now)), []
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
    if p.quorum and rank > 0:
        return s, acts           # only the best live member can win votes: it claims
    start = max(since, s.started + p.settle)
    if now < start + rank * p.rank_step:
        return s, acts
    term = s.term + 1
    s = replace(s, term=term, role=CANDIDATE, claim_term=term, claim_at=now,
                votes={**_keep_recent(s.votes, term), term: frozenset({s.me})})
    s = _record_claim(s, s.me, term, s.flops)
    return s, acts + [Claim(term)]
