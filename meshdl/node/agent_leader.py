"""NodeAgent's election effects and leader hand-over (split from
``meshdl.node.agent``): stepping the pure election state machine, acting on its
actions (claim, become leader, assert, step down), the leader record and its will
connection, starting/stopping ``LeaderDuties``, term fencing of the plan store (``node.planstore``),
requests held while leaderless, and the deputy's graph warm-up.
``_AgentLeader`` is a mixin of ``NodeAgent``; everything runs on the control thread."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from meshdl.errors import MeshdlError
from meshdl.node import election as el
from meshdl.node.leader import duties_for
from meshdl.security.bounds import sanitise
from meshdl.transport.bus import Will, private_client_id
from meshdl.wire import topics
from meshdl.wire.control import Campaign, JobRequest, LeaderInfo, encode_control

log = logging.getLogger("meshdl.node.agent")


class _AgentLeader:
    """Election effects and leader duties of a ``NodeAgent`` (mixin)."""

    def _maybe_warm(self) -> None:
        """The deputy (best non-leader) traces the default models ahead of time, so a
        fail-over re-plans in milliseconds instead of paying torch's import."""
        s = self._elect
        if self._warmed or s.leader is None or s.is_leader:
            return
        ranked = [n for n in el.order(s.members) if n != s.leader]
        if not ranked or ranked[0] != self.node_id:
            return
        self._warmed = True
        from meshdl.node.leader import default_models

        def warm() -> None:
            for model in default_models(self):
                if self._stopped.is_set():
                    return
                try:
                    self.graphs.get(model)
                except Exception as exc:   # a bad model name shows when planning
                    log.debug("warm-up of %s failed: %s", model, exc)
        self._spawn(warm, "warm-graphs")

    def _raise_fence(self, term: int) -> None:
        old = self.plan_store.fence(term)
        if old:
            log.info("term %d: dropped %d plan(s) of older terms", term, len(old))

    def job_request(self, job: JobRequest) -> None:
        if self._duties is not None:
            self._duties.job_request(job)

    def early_job(self, job: JobRequest) -> None:
        """A request that reached no leader (fail-over under way): keep it a few
        seconds; whoever of us wins the election answers it."""
        now = time.monotonic()
        self._early_jobs = [(t, j) for t, j in self._early_jobs if now - t < 5.0][-63:]
        self._early_jobs.append((now, job))

    def _elect_step(self, event: Any) -> None:
        s, actions = el.step(self._elect, event, time.monotonic())
        self._elect = s
        for a in actions:
            self._act(a)

    def _election(self, term: int, kind: str, vote_for: str = "") -> bytes:
        """An election message of this node, numbered in its session (``Campaign``), so
        a receiver refuses it if it is ever replayed."""
        return encode_control(Campaign(self.node_id, term, kind, float(self._device.flops),
                                       vote_for, time.time(), self.session,
                                       next(self._election_seq)))

    def _act(self, a: Any) -> None:
        m = self.mesh_name
        if isinstance(a, el.Claim):
            log.info("%s claims term %d", self.node_id, a.term)
            self.bus.publish(topics.election(m), self._election(a.term, "campaign"), qos=1)
        elif isinstance(a, el.BecomeLeader):
            log.info("%s is the leader of term %d", self.node_id, a.term)
            self._raise_fence(a.term)
            self._publish_leader(a.term)
            self._open_leader_bus()
            self._start_duties(a.term)
            early, self._early_jobs = self._early_jobs, []
            for t, job in early:
                if time.monotonic() - t < 5.0:
                    self._duties.job_request(job)
        elif isinstance(a, el.Vote):
            log.info("%s votes for %s in term %d", self.node_id, a.candidate, a.term)
            self.bus.publish(topics.election(m), self._election(a.term, "vote", a.candidate),
                             qos=1)
        elif isinstance(a, el.Ignored):
            log.warning("ignored %s's leadership of term %d: %s", sanitise(a.node), a.term,
                        a.reason)
        elif isinstance(a, el.Kept):
            log.warning("ignored a clear of the leader record: %s (term %d) is live, still "
                        "following it", sanitise(a.node), a.term)
        elif isinstance(a, el.AssertLeader):
            self._publish_leader(a.term)
        elif isinstance(a, el.StepDown):
            log.info("%s steps down from term %d: %s", self.node_id, a.term, a.reason)
            self._stop_duties()
        elif isinstance(a, el.LeaderChanged):
            log.info("leader is now %s (term %d)", a.node or "(none)", a.term)
            if a.node is not None:
                self._raise_fence(a.term)

    def _publish_leader(self, term: int) -> None:
        self.bus.publish(topics.leader(self.mesh_name),
                         encode_control(LeaderInfo(self.node_id, term, time.time())),
                         qos=1, retain=True)

    def _open_leader_bus(self) -> None:
        """A second connection whose only job is its will: clear the leader record
        if this process dies."""
        def connect() -> None:
            try:
                lb = self._bus_factory(private_client_id(f"meshdl-lead-{self.node_id[:32]}"),
                                       Will(topics.leader(self.mesh_name), b"", 1, True))
            except MeshdlError as exc:
                log.warning("leader will connection failed: %s", exc)
                return
            with self._lock:
                if self.is_leader and self._leader_bus is None and not self._closed:
                    self._leader_bus, lb = lb, None
            if lb is not None:
                lb.close()
        threading.Thread(target=connect, daemon=True, name="leader-will").start()

    def _start_duties(self, term: int) -> None:
        self._stop_duties(close_bus=False)
        self._duties = duties_for(self, term)
        self._duties.start()

    def _stop_duties(self, close_bus: bool = True, wait: float = 0.0) -> None:
        duties, self._duties = self._duties, None
        if duties is not None:
            duties.stop(wait)
            if duties.thread.is_alive():    # still making a plan: stop() waits for it
                self._helpers = [h for h in self._helpers if h.is_alive()] + [duties.thread]
        if close_bus:
            with self._lock:
                lb, self._leader_bus = self._leader_bus, None
            if lb is not None:
                lb.close()
