"""The issued-plan envelope and the node's one plan store (meshdl.node.planstore)."""
from __future__ import annotations

import pytest

import meshdl
from meshdl.errors import PlanError
from meshdl.node.planstore import IssuedPlan, PlanStore
from meshdl.wire.control import PlanMessage, decode_control, encode_control


@pytest.fixture(scope="module")
def plan():
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), (1, 3, 32, 32), name="tiny_cnn")
    return meshdl.plan(g, meshdl.load_topology("home-4"), strategy="meshdl")


def test_issue_copies_never_patches(plan):
    before = plan.to_dict()
    ip = IssuedPlan.issue(plan, 7, "pi4-a", {"request": {"model": "tiny_cnn"}}, ["a note"])
    assert plan.to_dict() == before                       # the planner's plan is untouched
    assert (ip.plan_id, ip.term, ip.leader) == (plan.plan_id, 7, "pi4-a")
    assert ip.plan.term == 7 and ip.plan.plan_id == plan.plan_id
    assert ip.plan.meta["leader"] == "pi4-a" and ip.plan.notes[-1] == "a note"
    with pytest.raises(Exception):
        ip.term = 8                                       # frozen
    with pytest.raises(PlanError, match="envelope"):
        IssuedPlan(plan, plan.plan_id, 9, "x")            # the plan says term 0


def test_wire_roundtrip_keeps_the_format(plan):
    ip = IssuedPlan.issue(plan, 3, "n1")
    msg = decode_control(encode_control(ip.message(1.0)), PlanMessage)
    assert msg.plan_id == ip.plan_id and msg.term == 3 and msg.plan["term"] == 3
    back = IssuedPlan.from_message(msg)
    assert back == IssuedPlan(back.plan, ip.plan_id, 3, "n1")
    assert back.plan.to_dict() == ip.plan.to_dict()
    # the message's id and term win over what the plan dict claims
    odd = PlanMessage(ip.plan_id, 5, {**ip.plan.to_dict(), "term": 1}, 1.0)
    assert IssuedPlan.from_message(odd).plan.term == 5
    with pytest.raises(PlanError):
        IssuedPlan.from_message(PlanMessage("x", 1, {"version": 99}, 1.0))


def test_store_adopts_fences_and_stays_bounded(plan):
    s = PlanStore(max_plans=4)
    a1 = IssuedPlan.issue(plan, 1, "a")
    assert s.adopt(a1) and not s.adopt(a1)                # new once
    assert s.get(plan.plan_id).term == 1 and plan.plan_id in s
    a2 = IssuedPlan.issue(plan, 2, "b")                   # same id, newer term: new again
    assert s.adopt(a2) and s.issued(plan.plan_id).leader == "b"
    assert s.fence(3) == [plan.plan_id]                   # older term: no longer adopted
    assert s.get(plan.plan_id) is None and s.known(plan.plan_id) is a2
    assert not s.adopt(IssuedPlan.issue(plan, 2, "b"))    # below the fence: refused
    assert s.term == 3 and s.fence(2) == []
    s.drop(plan.plan_id)
    assert s.known(plan.plan_id) is None
    others = []
    for i in range(10):                                   # bounded, oldest first out
        p = IssuedPlan.issue(plan.__class__(**{**plan.__dict__, "plan_id": f"p{i}"}), 3, "c")
        others.append(p)
        s.adopt(p)
    assert len(s) == 4 and set(s.plans()) == {"p6", "p7", "p8", "p9"} and s.evicted == 6
    s.get("p6")                                           # a read keeps a plan recent
    s.adopt(IssuedPlan.issue(plan.__class__(**{**plan.__dict__, "plan_id": "pX"}), 3, "c"))
    assert "p6" in s and "p7" not in s
    s.seen(IssuedPlan.issue(plan.__class__(**{**plan.__dict__, "plan_id": "old"}), 1, "z"))
    assert s.known("old") is not None and "old" not in s and "old" in s.retained()
