"""Decoding and checking of every control message the agent folds (control thread).

Each ``on_<tag>(agent, topic, payload, retained)`` validates the topic and the
frame; anything malformed or foreign raises WireError (the agent logs and drops
it). A frame whose ids disagree with its topic is foreign.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from meshdl.errors import WireError
from meshdl.node import election as el
from meshdl.mesh.state import NodeCleared
from meshdl.node.membership import state_event, telemetry_event
from meshdl.node.planstore import IssuedPlan
from meshdl.security.limits import RateLimiter
from meshdl.security.bounds import MAX_TERM_STEP, BoundsError, sanitise, term_step_ok
from meshdl.wire import topics
from meshdl.wire.control import (Campaign, JobRequest, LeaderInfo, NodeState, PlanMessage,
                                 Telemetry, decode_control)

log = logging.getLogger(__name__)


def _parse(agent, topic: str, kind: str) -> topics.ParsedTopic:
    p = topics.parse(topic)
    if p.kind != kind or p.mesh != agent.mesh_name:
        raise WireError(f"topic {topic!r} is not a {kind} topic of mesh {agent.mesh_name}")
    return p


def _term_ok(agent, term: int, what: str) -> None:
    """Terms only grow by bounded steps (meshdl.security.bounds.term_step_ok)."""
    s = agent._elect
    known = s.term if s is not None else 0
    if not term_step_ok(known, term):
        raise BoundsError(f"{what} has term {term}, more than {MAX_TERM_STEP} past the "
                          f"known term {known}: dropped")


def on_state(agent, topic: str, payload: Any, retained: bool) -> None:
    p = _parse(agent, topic, "state")
    if not len(payload):                        # a cleared record: forget the node
        if agent.membership.apply(NodeCleared(p.node)):
            agent.members_changed()
        return
    st = decode_control(payload, NodeState)
    if st.node != p.node:
        raise WireError(f"state of {st.node!r} published on {p.node!r}'s topic")
    if st.online and not retained:
        agent.heard(st.node)
    if agent.membership.apply(state_event(st)):
        log.info("members: %s", ", ".join(agent.membership.state.online))
        agent.members_changed()


def on_telemetry(agent, topic: str, payload: Any, retained: bool) -> None:
    p = _parse(agent, topic, "telemetry")
    if not len(payload):
        return
    msg = decode_control(payload, Telemetry)
    if msg.node != p.node:
        raise WireError(f"telemetry of {msg.node!r} published on {p.node!r}'s topic")
    if msg.node == agent.node_id:
        return              # our own: folded when published (NodeAgent._maybe_telemetry)
    before = agent.membership.state.links
    agent.membership.apply(telemetry_event(msg))
    if agent.membership.state.links != before:
        agent.links_changed()


def on_election(agent, topic: str, payload: Any, retained: bool) -> None:
    _parse(agent, topic, "election")
    c = decode_control(payload, Campaign)
    _term_ok(agent, c.term, "campaign of " + sanitise(c.node))
    if c.kind == "campaign":
        agent._elect_step(el.ClaimSeen(c.node, c.term, c.priority))
    elif c.kind == "vote" and c.vote_for:
        agent._elect_step(el.VoteSeen(c.node, c.vote_for, c.term))


def on_leader(agent, topic: str, payload: Any, retained: bool) -> None:
    _parse(agent, topic, "leader")
    if not len(payload):
        agent._elect_step(el.LeaderCleared())
        return
    info = decode_control(payload, LeaderInfo)
    _term_ok(agent, info.term, "leader record of " + sanitise(info.node))
    # votes: on a secure mesh the SecureBus verified them (the voters' ids remain)
    agent._elect_step(el.LeaderSeen(info.node, info.term, frozenset(info.votes)))


def on_plan(agent, topic: str, payload: Any, retained: bool) -> None:
    p = _parse(agent, topic, "plan")
    seen = getattr(agent, "plan_seen", None)
    if seen is not None:
        seen(p.plan_id)
    if not len(payload):
        agent.adopt_plan(p.plan_id, None)
        return
    msg = decode_control(payload, PlanMessage)
    _term_ok(agent, msg.term, "plan " + sanitise(p.plan_id))
    if msg.plan_id != p.plan_id:
        raise WireError(f"plan {msg.plan_id!r} published on plan/{p.plan_id}")
    agent.adopt_plan(p.plan_id, msg)


def on_job(agent, topic: str, payload: Any, retained: bool) -> None:
    p = _parse(agent, topic, "job")
    job = decode_control(payload, JobRequest)
    if job.job != p.job:
        raise WireError(f"job {job.job!r} requested on job/{p.client}/{p.job}")
    if job.client != p.client:
        raise WireError(f"request of client {job.client!r} on client {p.client!r}'s topic")
    agent.note_client(job.job, p.client)        # a sink sends a big answer to it
    if not agent.is_leader and agent.leader is not None:
        return                                  # the leader answers it
    limiter = getattr(agent, "job_limiter", None)
    if limiter is None:                          # one per agent, made on first use
        limiter = agent.job_limiter = RateLimiter()
    if not limiter.allow(job.client, time.monotonic()):
        raise BoundsError(f"job {sanitise(job.job)} of client {sanitise(job.client)} refused: "
                          "over the job request rate limit")
    if agent.is_leader:
        agent.job_request(job)
    else:
        agent.early_job(job)                    # no leader known: a fail-over is under way


def on_set_link(agent, topic: str, p: Any, retained: bool) -> None:
    """A debug/test probe changing an emulated link's figures (real nodes ignore it)."""
    if not agent.emulate:
        log.warning("ignored set_link from %s: only emulated nodes take link figures",
                    p.sender)
        return
    peer = p.link["peer"]
    agent._overrides[peer] = {k: float(v) for k, v in p.link.items()
                              if k in ("bandwidth_bps", "latency_s") and v is not None}
    log.info("emulated link %s-%s set to %s", agent.node_id, peer, agent._overrides[peer])
    agent._tele_at = 0.0


def adopt_plan(agent, plan_id: str, msg: PlanMessage | None) -> None:
    """Adopt (or drop) a retained plan in the node's plan store: older terms are
    fenced off; a plan of a term whose leader we know must come from that leader."""
    store = agent.plan_store
    if msg is None:
        store.drop(plan_id)
        if agent._duties is not None:
            agent._duties.plan_seen(plan_id, None)
        return
    issued = IssuedPlan.from_message(msg)
    if msg.term < store.term:
        store.seen(issued)
        if agent._duties is not None:
            agent._duties.plan_seen(plan_id, msg.term)
        log.debug("ignored plan %s of old term %d (< %d)", plan_id, msg.term, store.term)
        return
    s = agent._elect
    if issued.leader and s and s.leader_term == msg.term and s.leader and \
            issued.leader != s.leader:
        store.seen(issued)
        log.warning("ignored plan %s: term %d belongs to %s, not %s", plan_id, msg.term,
                    s.leader, issued.leader)
        return
    agent._raise_fence(msg.term)
    agent._elect_step(el.TermSeen(msg.term))
    agent.adopt_issued(issued)
    if agent._duties is not None:
        agent._duties.plan_seen(plan_id, msg.term)
