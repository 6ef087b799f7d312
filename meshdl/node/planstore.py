"""The issued-plan envelope and the one plan store of a node (or client).

``IssuedPlan(plan, plan_id, term, leader)`` is what a leader issues: the plan the
planner made and who issued it for which term. It is built once, never patched: the
``Plan`` inside is a copy whose ``plan_id``/``term`` equal the envelope's (the data
plane reads them off the plan it holds). On the wire it is a ``PlanMessage`` (id,
term, plan dict), unchanged.

``PlanStore`` holds every plan a node issued or saw retained on the broker, keyed by
id, bounded (least recently used dropped), and whether it is *adopted*: a plan of the
current or a newer term that passed the agent's checks. ``fence(term)`` un-adopts
plans of older terms (they stay known, so a new leader can recover their requests
and clear them). The agent, its leader duties, its handlers and its data plane all
read this one store; so do the test harness and the client.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan

MAX_PLANS = 256


@dataclass(frozen=True)
class IssuedPlan:
    """A plan as issued by ``leader`` in ``term`` under id ``plan_id``."""

    plan: Plan
    plan_id: str
    term: int
    leader: str = ""

    def __post_init__(self) -> None:
        if not self.plan_id:
            raise PlanError("an issued plan needs a plan id")
        if self.plan.plan_id != self.plan_id or self.plan.term != self.term:
            raise PlanError(f"plan {self.plan.plan_id!r} (term {self.plan.term}) does not "
                            f"match its envelope {self.plan_id!r} (term {self.term}); build it "
                            "with IssuedPlan.issue or IssuedPlan.from_message")

    @classmethod
    def issue(cls, plan: Plan, term: int, leader: str = "",
              meta: Mapping[str, Any] | None = None, notes: list[str] | None = None
              ) -> "IssuedPlan":
        """Issue ``plan`` (made by the planner, with its content-hash id) for ``term``:
        a copy carries the term, the issuer in ``meta["leader"]`` and any extra
        ``meta``/``notes``; ``plan`` itself is left as it was."""
        if not plan.plan_id:
            from meshdl.planner.base import plan_id
            plan = dataclasses.replace(plan, plan_id=plan_id(plan))
        m = dict(plan.meta)
        if leader:
            m["leader"] = leader
        m.update(meta or {})
        copy = dataclasses.replace(plan, term=int(term), meta=m,
                                   notes=[*plan.notes, *(notes or [])])
        return cls(copy, copy.plan_id, int(term), leader)

    @classmethod
    def from_message(cls, msg: Any) -> "IssuedPlan":
        """The envelope of a received ``PlanMessage`` (raises PlanError if malformed):
        the message's id and term are the plan's."""
        d = dict(msg.plan) if isinstance(msg.plan, Mapping) else msg.plan
        if not isinstance(d, dict):
            raise PlanError(f"plan {msg.plan_id!r}: the plan must be a mapping")
        plan = Plan.from_dict({**d, "plan_id": msg.plan_id, "term": int(msg.term)})
        issuer = plan.meta.get("leader") if isinstance(plan.meta, dict) else None
        return cls(plan, msg.plan_id, int(msg.term), issuer if isinstance(issuer, str) else "")

    def message(self, ts: float):
        from meshdl.wire.control import PlanMessage
        return PlanMessage(self.plan_id, self.term, self.plan.to_dict(), ts)


class PlanStore:
    """Plans by id: every one seen (bounded, LRU) and which of them are adopted.
    Thread-safe; every method is short."""

    def __init__(self, max_plans: int = MAX_PLANS) -> None:
        self.max_plans = max_plans
        self._lock = threading.RLock()
        self._plans: OrderedDict[str, IssuedPlan] = OrderedDict()
        self._adopted: set[str] = set()
        self._fence = 0
        self.evicted = 0

    # ------------------------------------------------------------ writes
    def seen(self, issued: IssuedPlan) -> None:
        """A plan retained on the broker (any term): known, not (re-)adopted. A plan
        adopted under the same id and term stays adopted."""
        with self._lock:
            old = self._plans.get(issued.plan_id)
            if old is not None and old.term != issued.term:
                self._adopted.discard(issued.plan_id)
            self._put(issued)

    def adopt(self, issued: IssuedPlan) -> bool:
        """Adopt ``issued`` unless its term is below the fence; True when it is new here
        (a new id, a new term, or not adopted before)."""
        with self._lock:
            if issued.term < self._fence:
                self.seen(issued)
                return False
            old = self._plans.get(issued.plan_id)
            new = (old is None or old.term != issued.term
                   or issued.plan_id not in self._adopted)
            if new:
                self._put(issued)
            else:
                self._plans.move_to_end(issued.plan_id)
            self._adopted.add(issued.plan_id)
            return new

    def drop(self, plan_id: str) -> IssuedPlan | None:
        with self._lock:
            self._adopted.discard(plan_id)
            return self._plans.pop(plan_id, None)

    def fence(self, term: int) -> list[str]:
        """Raise the fence to ``term``: adopted plans of older terms are un-adopted
        (returned), later plans of older terms are refused."""
        with self._lock:
            if term <= self._fence:
                return []
            self._fence = term
            old = [p for p in self._adopted if self._plans[p].term < term]
            self._adopted.difference_update(old)
            return old

    def _put(self, issued: IssuedPlan) -> None:
        self._plans[issued.plan_id] = issued
        self._plans.move_to_end(issued.plan_id)
        while len(self._plans) > self.max_plans:
            pid, _ = self._plans.popitem(last=False)
            self._adopted.discard(pid)
            self.evicted += 1

    # ------------------------------------------------------------ reads
    @property
    def term(self) -> int:
        """The fence: the newest term whose plans this store adopts."""
        return self._fence

    def get(self, plan_id: str) -> Plan | None:
        """An adopted plan by id (the data plane's read)."""
        ip = self.issued(plan_id)
        return None if ip is None else ip.plan

    def issued(self, plan_id: str) -> IssuedPlan | None:
        """An adopted plan's envelope by id."""
        with self._lock:
            if plan_id not in self._adopted:
                return None
            self._plans.move_to_end(plan_id)
            return self._plans[plan_id]

    def known(self, plan_id: str) -> IssuedPlan | None:
        """Any plan seen under this id, adopted or not."""
        with self._lock:
            return self._plans.get(plan_id)

    def plans(self) -> dict[str, Plan]:
        """Every adopted plan."""
        with self._lock:
            return {p: self._plans[p].plan for p in self._plans if p in self._adopted}

    def retained(self) -> dict[str, IssuedPlan]:
        """Every plan seen, adopted or not."""
        with self._lock:
            return dict(self._plans)

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)

    def __contains__(self, plan_id: object) -> bool:
        with self._lock:
            return plan_id in self._adopted
