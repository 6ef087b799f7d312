"""The client's job protocol machine (meshdl.node.jobproto): pure, driven directly."""
from __future__ import annotations

import pytest

from meshdl.node import jobproto as jp


def run(a, *events):
    effects = []
    for e in events:
        a, more = jp.step(a, e)
        effects += more
    return a, effects


def test_request_is_resent_until_planned_then_input_starts():
    a, eff = jp.start("j1", now=0.0, deadline=30.0, leader="n1")
    assert eff == [jp.SendRequest()]
    a, eff = run(a, jp.Tick(0.5), jp.Tick(1.01), jp.Tick(1.5), jp.Tick(2.2))
    assert eff == [jp.SendRequest(), jp.SendRequest()] and a.sends == 3
    a, eff = run(a, jp.JobPlanned("p1", 3))
    assert a.phase == jp.PLANNED and eff == [jp.StartInput("p1")]
    a, eff = run(a, jp.JobPlanned("p1", 3), jp.Tick(5.0))     # a duplicate answer
    assert eff == []


def test_leader_change_resends_at_once():
    a, _ = jp.start("j", 0.0, 30.0, leader="old")
    a, eff = run(a, jp.LeaderSeen(None), jp.LeaderSeen("new", 4))
    assert eff == [jp.SendRequest()] and a.leader == "new"
    a, eff = run(a, jp.LeaderSeen("new", 4))                  # no change: no resend
    assert eff == []


def test_outcomes_are_named():
    a, _ = jp.start("j", 0.0, 30.0)
    done, eff = run(a, jp.JobFailed("model unknown", by_leader=True))
    assert done.phase == jp.FAILED and "refused job j: model unknown" in eff[0].reason
    none, eff = run(a, jp.NoMesh("no live members on mesh 'm'"))
    assert none.phase == jp.FAILED and "no live members" in eff[0].reason
    late, eff = run(a, jp.Tick(31.0))
    assert late.phase == jp.RETRY and "no answer from the leader" in eff[0].reason

    run_, _ = run(a, jp.JobPlanned("p", 1), jp.InputSent(("a", "b"), 3))
    assert run_.phase == jp.RUNNING
    for ev, words in ((jp.Offline("b"), "device b of plan p went offline"),
                      (jp.Silent("a", 2.6), "device a of plan p stopped responding"),
                      (jp.PlanCleared("p"), "superseded plan p"),
                      (jp.Result(False, "sink x could not stitch"), "could not stitch"),
                      (jp.JobFailed("piece lost"), "piece lost"),
                      (jp.Tick(40.0), "0/3 tasks reported")):
        end, eff = run(run_, ev)
        assert end.phase == jp.RETRY and words in eff[0].reason, (ev, eff)
    ok, eff = run(run_, jp.TaskReport("t1"), jp.Result(True))
    assert ok.phase == jp.DONE and eff == [jp.Finish(jp.DONE, "")]


def test_irrelevant_events_do_not_end_an_attempt():
    a, _ = jp.start("j", 0.0, 30.0)
    a, _ = run(a, jp.JobPlanned("p", 1), jp.InputSent(("a",), 1))
    a, eff = run(a, jp.Offline("z"), jp.Silent("z", 9.0), jp.PlanCleared("q"),
                 jp.NoMesh("x"), jp.LeaderSeen("n", 2))
    assert a.phase == jp.RUNNING and eff == []
    a, eff = run(a, jp.TaskReport("t"), jp.PlanCleared("p"))   # started: plan kept
    assert a.phase == jp.RUNNING
    ended, _ = run(a, jp.Result(True))
    assert run(ended, jp.Offline("a")) == (ended, [])           # ended stays ended
    with pytest.raises(TypeError):
        jp.step(a, object())
