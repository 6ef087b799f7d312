"""The leader's job protocol machine (meshdl.node.leaderproto): pure, driven directly."""
from __future__ import annotations

import pytest

from meshdl.node import jobproto as jp
from meshdl.node import leaderproto as lp
from meshdl.wire.control import JobRequest, JobStatus

R = lp.StandingRequest("tiny_cnn")
MEMBERS = frozenset({"a", "b", "c"})


def run(s, *events):
    effects = []
    for e in events:
        s, more = lp.step(s, e)
        effects += more
    return s, effects


def req(job, client="cl", request=R, now=0.0, deadline_s=30.0):
    return lp.JobRequested(job, client, request, now, deadline_s)


def leader(**kw):
    return lp.initial("a", 3, members=MEMBERS, **kw)


def planned(s, request=R, pid="p1", devices=("a", "b")):
    return lp.step(s, lp.PlanIssued(request, pid, devices, s.members))


def test_request_is_planned_once_then_answered_from_the_current_plan():
    s, eff = run(leader(), req("j1"), req("j2"))
    assert eff == [lp.MakePlan(R)]                    # two jobs, one planning
    s, eff = planned(s)
    assert eff == [jp.JobPlanned("p1", 3, "j1"), jp.JobPlanned("p1", 3, "j2")]
    assert s.waiting == () and s.plan_of(R) == "p1"
    s, eff = run(s, req("j3"))
    assert eff == [jp.JobPlanned("p1", 3, "j3")]     # no re-planning
    # the answers are the client's machine's messages, on the wire as job statuses
    st = jp.to_status(eff[0], 1.0)
    assert st == JobStatus("j3", "planned", "p1", 3, 1.0)
    assert jp.from_status(st, requesting=True) == eff[0]
    a, _ = jp.start("j3", 0.0, 30.0)
    a, out = jp.step(a, jp.from_status(st, True))
    assert a.phase == jp.PLANNED and out == [jp.StartInput("p1")]


def test_duplicate_request_is_idempotent():
    s, _ = run(leader(), req("j1"))
    s, eff = run(s, req("j1"), req("j1"))              # re-sent while planning
    assert eff == []
    s, eff = planned(s)
    assert eff == [jp.JobPlanned("p1", 3, "j1")]
    s2, eff = run(s, req("j1"), req("j1"))             # re-sent after the answer was lost
    assert eff == [jp.JobPlanned("p1", 3, "j1")] * 2 and s2.planning == frozenset()
    bad = lp.JobRequested("j9", "cl", None, 0.0, 30.0, "alpha 3 must be in [0, 1]")
    s, eff = run(s, bad, bad)
    assert eff == [jp.JobFailed("alpha 3 must be in [0, 1]", True, "j9")] * 2


def test_members_change_replans_before_answering():
    s, _ = run(leader(), req("j1"))
    s, _ = planned(s)
    s, eff = run(s, lp.MembersChanged(frozenset({"a", "b", "c", "d"}), 1.0))
    assert eff == []                                   # nobody lost: nothing fails
    s, eff = run(s, req("j2", now=1.0))
    assert eff == [lp.MakePlan(R)]                     # made on other members: plan again
    s, eff = planned(s, pid="p2", devices=("a", "d"))
    assert eff == [jp.JobPlanned("p2", 3, "j2")]


def test_member_dropped_fails_running_jobs_with_a_named_reason():
    s, _ = run(leader(), req("j1", deadline_s=10.0), req("j2", client="other",
                                                          deadline_s=10.0))
    s, _ = planned(s, devices=("a", "b"))
    s, _ = run(s, req("j3", deadline_s=0.5))          # answered, deadline passes soon
    s, eff = run(s, lp.MembersChanged(frozenset({"a", "c"}), 2.0,
                                      (("b", "stopped responding (no heartbeat for 2.5 s)"),)))
    assert [e.job for e in eff] == ["j1", "j2"]        # j3 is past its deadline
    assert all(isinstance(e, jp.JobFailed) and not e.by_leader for e in eff)
    assert "device b stopped responding (no heartbeat for 2.5 s) during job j1 (plan p1)" \
        in eff[0].reason
    # at the client, a failure of a running attempt is a named retry
    a, _ = jp.start("j1", 0.0, 30.0)
    a, _ = jp.step(a, jp.JobPlanned("p1", 3))
    a, _ = jp.step(a, jp.InputSent(("a", "b"), 2))
    a, out = jp.step(a, eff[0])
    assert a.phase == jp.RETRY and "device b stopped responding" in out[0].reason
    # the failed job re-sent is planned afresh, on the members left
    s, eff = run(s, req("j1", now=2.0))
    assert eff == [lp.MakePlan(R)]
    s, eff = run(s, lp.MembersChanged(frozenset({"a"}), 3.0))
    assert eff == []                                   # nothing answered used c


def test_leader_change_stops_answering_and_the_new_leader_plans_afresh():
    s, _ = run(leader(), req("j1"))
    s, _ = planned(s)
    s, eff = run(s, req("j2"), lp.LeaderChanged("b", 4), req("j1"), req("j3"))
    assert eff == [jp.JobPlanned("p1", 3, "j2")]       # nothing after the change
    assert not s.active and s.waiting == ()
    s, eff = run(s, lp.PlanIssued(R, "p9", ("a",), MEMBERS))
    assert eff == []
    b = lp.initial("b", 4, members=MEMBERS)            # the new leader: the same job
    b, eff = run(b, req("j1"))
    assert eff == [lp.MakePlan(R)]
    b, eff = planned(b, pid="p1")                      # same content, the new term
    assert eff == [jp.JobPlanned("p1", 4, "j1")]
    same, eff = run(b, lp.LeaderChanged("b", 4))       # its own record: still leads
    assert same.active and eff == []


def test_per_client_queue_is_bounded_and_named():
    s = leader(params=lp.Params(per_client=2, max_waiting=3))
    s, eff = run(s, req("j1"), req("j2"), req("j3"))
    assert eff[:1] == [lp.MakePlan(R)] and len(s.waiting) == 2
    assert isinstance(eff[1], jp.JobFailed) and eff[1].job == "j3" and eff[1].by_leader
    assert "client cl already has 2 job(s) waiting" in eff[1].reason
    s, eff = run(s, req("k1", client="other"), req("k2", client="third"))
    assert eff[-1].job == "k2" and "3 jobs waiting" in eff[-1].reason
    s, eff = planned(s)
    assert [e.job for e in eff] == ["j1", "j2", "k1"]
    assert all(isinstance(e, jp.JobPlanned) for e in eff)


def test_refusal_and_deadline_reach_every_waiting_job():
    s, _ = run(leader(), req("j1", deadline_s=5.0), req("j2", deadline_s=50.0))
    s, eff = run(s, lp.Tick(6.0))
    assert [e.job for e in eff] == ["j1"] and "before its deadline" in eff[0].reason
    s, eff = run(s, lp.PlanRefused(R, "sink x is not online"))
    assert eff == [jp.JobFailed("sink x is not online", True, "j2")]
    assert s.plan_of(R) is None and s.planning == frozenset()


def test_standing_requests_are_bounded_defaults_kept():
    d = lp.StandingRequest("resnet18")
    s = lp.initial("a", 1, defaults=(d,), members=MEMBERS, params=lp.Params(max_requests=3))
    for i in range(6):
        s, _ = run(s, req(f"j{i}", request=lp.StandingRequest(f"m{i}")))
    assert s.requests[0] == d and len(s.requests) == 3
    assert [r.model for r in s.requests[1:]] == ["m4", "m5"]
    m5 = lp.StandingRequest("m5")
    s, eff = planned(s, request=m5, pid="p5")
    assert eff == [jp.JobPlanned("p5", 1, "j5")] and s.plan_of(m5) == "p5"
    s, _ = run(s, lp.Replan("m4"))                     # another model's: p5 stays
    assert s.plan_of(m5) == "p5"
    s, _ = run(s, lp.Replan("m5"))                     # a hand-made plan withdrawn
    assert s.plan_of(m5) is None
    s, eff = run(s, req("j6", request=m5))
    assert eff == [lp.MakePlan(m5)]


def test_from_wire_names_a_bad_option():
    ev = lp.JobRequested.from_wire(JobRequest("j", "c", options={"alpha": 3}),
                                   R, now=1.0)
    assert ev.request is None and "alpha 3" in ev.error
    ok = lp.JobRequested.from_wire(JobRequest("j", "c", "vgg16", deadline_s=12.0), R, 1.0)
    assert ok.request == lp.StandingRequest("vgg16") and ok.deadline_s == 12.0
    with pytest.raises(TypeError):
        lp.step(leader(), object())
