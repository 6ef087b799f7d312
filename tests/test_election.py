"""Leader election: the pure state machine (tables, a simulated network), then whole
agents over in-memory channels (MemoryBroker: wills, retained records, no network)."""
from __future__ import annotations

import heapq
import random
import time

import pytest

from meshdl.node import election as el

P = el.Params(settle=0.4, claim_window=0.3, rank_step=0.4, leader_grace=1.5)


def run(state, events):
    """Feed (time, event) pairs; return the final state and every action with its time."""
    out = []
    for t, ev in events:
        state, acts = el.step(state, ev, t)
        out += [(t, a) for a in acts]
    return state, out


def kinds(actions):
    return [type(a).__name__ for _, a in actions]


# ------------------------------------------------------------------ ordering
@pytest.mark.parametrize("members, expect", [
    ({"a": 1.0, "b": 2.0, "c": 3.0}, ["c", "b", "a"]),
    ({"b": 2.0, "a": 2.0, "c": 1.0}, ["a", "b", "c"]),        # tie -> smaller id
    ({"n10": 5e9, "n2": 5e9, "x": 1e9}, ["n10", "n2", "x"]),   # string order, not numeric
])
def test_order(members, expect):
    assert el.order(members) == expect


# ------------------------------------------------------------------ tables
def test_lone_node_claims_after_settle_and_leads_after_window():
    s = el.initial("a", 1e9, 0.0, P)
    s, acts = run(s, [(0.1, el.Tick()), (0.39, el.Tick()), (0.41, el.Tick()),
                      (0.6, el.Tick()), (0.72, el.Tick())])
    assert [(round(t, 2), a) for t, a in acts] == [
        (0.41, el.Claim(1)), (0.72, el.BecomeLeader(1)), (0.72, el.LeaderChanged("a", 1))]
    assert s.is_leader and s.term == 1


@pytest.mark.parametrize("me, flops, other, oflops, wins", [
    ("a", 2e9, "b", 1e9, True),      # more FLOP/s wins
    ("b", 1e9, "a", 2e9, False),
    ("a", 1e9, "b", 1e9, True),      # tie: smaller id
    ("b", 1e9, "a", 1e9, False),
])
def test_competing_claims_same_term(me, flops, other, oflops, wins):
    s = el.initial(me, flops, 0.0, P)
    s, acts = run(s, [(0.5, el.Tick()), (0.55, el.ClaimSeen(other, 1, oflops)),
                      (0.9, el.Tick())])
    assert acts[0][1] == el.Claim(1)
    assert (el.BecomeLeader(1) in [a for _, a in acts]) is wins
    assert s.term == 1 and s.is_leader is wins


def test_known_leader_means_no_claim():
    s = el.initial("a", 9e9, 0.0, P)
    s, acts = run(s, [(0.0, el.Members({"b": 1e9})), (0.1, el.LeaderSeen("b", 4)),
                      (1.0, el.Tick()), (5.0, el.Tick())])
    assert kinds(acts) == ["LeaderChanged"]
    assert s.leader == "b" and s.term == 4 and s.role == el.FOLLOWER


def test_leader_death_best_claims_at_once_next_waits_rank_step():
    base = [(0.0, el.Members({"a": 3e9, "b": 2e9, "c": 1e9})), (0.1, el.LeaderSeen("c", 7))]
    a = el.initial("a", 3e9, 0.0, P)
    b = el.initial("b", 2e9, 0.0, P)
    dead = (5.0, el.Members({"a": 3e9, "b": 2e9}))
    a, acts_a = run(a, base + [dead, (5.0, el.Tick())])
    b, acts_b = run(b, base + [dead, (5.2, el.Tick()), (5.39, el.Tick()), (5.41, el.Tick())])
    assert (5.0, el.Claim(8)) in acts_a
    assert [t for t, x in acts_b if isinstance(x, el.Claim)] == [5.41]   # rank 1: +0.4 s


def test_old_term_leader_record_is_ignored():
    s = el.initial("a", 1e9, 0.0, P)
    s, acts = run(s, [(0.0, el.LeaderSeen("b", 5)), (0.1, el.LeaderSeen("c", 3))])
    assert s.leader == "b" and s.term == 5


def test_leader_steps_down_for_higher_term_from_better_node():
    s = el.initial("b", 1e9, 0.0, P)
    s, _ = run(s, [(0.5, el.Tick()), (0.9, el.Tick())])
    assert s.is_leader
    s, acts = run(s, [(1.0, el.LeaderSeen("a", 2))])
    assert kinds(acts) == ["StepDown", "LeaderChanged"] and s.leader == "a"


def test_leader_counter_claims_a_stale_worse_claim():
    s = el.initial("a", 5e9, 0.0, P)
    s, _ = run(s, [(0.0, el.Members({"z": 1e9})), (0.5, el.Tick()), (0.9, el.Tick())])
    assert s.is_leader and s.term == 1
    s, acts = run(s, [(2.0, el.ClaimSeen("z", 2, 1e9)), (2.1, el.Tick()), (2.35, el.Tick())])
    assert [a for _, a in acts] == [
        el.StepDown(1, "re-claiming leadership over z's term 2 with term 3"), el.Claim(3),
        el.BecomeLeader(3), el.LeaderChanged("a", 3)]


def test_cleared_leader_record_is_reasserted_by_the_leader():
    s = el.initial("a", 1e9, 0.0, P)
    s, _ = run(s, [(0.5, el.Tick()), (0.9, el.Tick())])
    s, acts = run(s, [(1.0, el.LeaderCleared())])
    assert [a for _, a in acts] == [el.AssertLeader(1)]


def test_own_record_from_an_earlier_life_starts_a_new_term():
    s = el.initial("a", 1e9, 0.0, P)
    s, acts = run(s, [(0.0, el.LeaderSeen("a", 3)), (0.75, el.Tick()), (1.1, el.Tick())])
    assert el.BecomeLeader(4) in [a for _, a in acts]


# ------------------------------------------------------------------ simulated network
@pytest.mark.parametrize("n, seed", [(2, 1), (3, 2), (5, 3), (8, 4), (12, 5), (20, 6)])
def test_simulated_mesh_elects_one_leader_per_term_and_fails_over(n, seed):
    """Random start times and delivery delays (< claim window), then the leader
    crashes: one leader per term, and the best survivor leads within 3 s."""
    leaders: dict[int, set[str]] = {}
    sim_state = {}

    def fake_handle(node, acts, at):
        for a in acts:
            if isinstance(a, el.BecomeLeader):
                leaders.setdefault(a.term, set()).add(node)
                sim_state.setdefault("first", at)
                sim_state["last_leader"] = (node, a.term, at)
            for target in sim_state["nodes"]:
                if isinstance(a, el.Claim):
                    sim_state["send"](target, el.ClaimSeen(node, a.term,
                                                           sim_state["flops"][node]), at)
                elif isinstance(a, (el.BecomeLeader, el.AssertLeader)):
                    sim_state["send"](target, el.LeaderSeen(node, a.term), at)

    rng = random.Random(seed)
    flops = {f"n{i}": rng.choice([1e9, 2e9, 2e9, 4e9]) for i in range(n)}
    sim_state["nodes"] = list(flops)
    sim_state["flops"] = flops
    _sim_network(n, seed, flops, sim_state, fake_handle, kill_at=3.0)
    for term, who in leaders.items():
        assert len(who) == 1, f"term {term} had leaders {who}"
    crashed = sim_state.get("crashed")
    assert crashed is not None
    node, term, at = sim_state["last_leader"]
    assert node != crashed[0] and at - crashed[1] < 3.0
    survivors = [nd for nd in flops if nd != crashed[0]]
    assert node == el.order({k: flops[k] for k in survivors})[0]


def _sim_network(n, seed, flops, sim_state, handler, kill_at, max_delay=0.05, until=7.0,
                 params=P, each_tick=None):
    rng = random.Random(seed * 7 + 1)
    start = {nd: rng.uniform(0, 0.6) for nd in flops}
    states = {nd: el.initial(nd, f, start[nd], params) for nd, f in flops.items()}
    sim_state["states"] = states
    alive = set(flops)
    q: list = []
    counter = [0]
    now = [0.0]

    def push(at, target, ev):
        counter[0] += 1
        heapq.heappush(q, (at, counter[0], target, ev))

    sim_state["send"] = lambda target, ev, at: push(at + rng.uniform(0.001, max_delay),
                                                   target, ev)
    views = {nd: {} for nd in flops}
    for nd in flops:
        for other in flops:
            push(max(start[nd], start[other]) + rng.uniform(0.001, max_delay), other,
                 ("birth", nd))
    t = 0.0
    while t < until:
        t = round(t + 0.02, 4)
        while q and q[0][0] <= t:
            at, _, target, ev = heapq.heappop(q)
            if target not in alive:
                continue
            if isinstance(ev, tuple):
                if ev[0] == "birth":
                    views[target][ev[1]] = flops[ev[1]]
                else:
                    views[target].pop(ev[1], None)
                ev = el.Members(dict(views[target]))
            states[target], acts = el.step(states[target], ev, max(at, start[target]))
            handler(target, acts, at)
        for nd in sorted(alive):
            if t >= start[nd]:
                states[nd], acts = el.step(states[nd], el.Tick(), t)
                handler(nd, acts, t)
        if each_tick is not None:
            each_tick(t)
        if "crashed" not in sim_state and t >= kill_at:
            lead = [nd for nd in alive if states[nd].is_leader]
            assert len(lead) == 1, f"leaders before the crash: {lead}"
            sim_state["crashed"] = (lead[0], t)
            alive.discard(lead[0])
            for other in alive:
                push(t + 0.002, other, ("death", lead[0]))
                push(t + 0.002, other, el.LeaderCleared())
    for nd, s in states.items():
        assert s.term >= 1 or nd in sim_state.get("mute", ())


# ------------------------------------------------------------------ quorum mode (secure mesh)
Q = el.Params(settle=0.4, claim_window=0.3, rank_step=0.4, leader_grace=1.5, quorum=True,
              vote_window=1.0)
THREE = {"a": 3e9, "b": 2e9, "c": 1e9}


def test_quorum_lone_node_leads_with_its_own_vote():
    s = el.initial("a", 1e9, 0.0, Q)
    s, acts = run(s, [(0.41, el.Tick()), (0.72, el.Tick())])
    assert kinds(acts) == ["Claim", "BecomeLeader", "LeaderChanged"]


def test_quorum_candidate_waits_for_a_majority_of_votes():
    s = el.initial("a", 3e9, 0.0, Q)
    s, acts = run(s, [(0.0, el.Members(THREE)), (0.41, el.Tick()), (0.8, el.Tick()),
                      (0.9, el.VoteSeen("c", "b", 1)),          # a vote for someone else
                      (0.95, el.VoteSeen("b", "a", 1))])
    assert [(t, a) for t, a in acts if not isinstance(a, el.LeaderChanged)] == [
        (0.41, el.Claim(1)), (0.95, el.BecomeLeader(1))]
    assert s.votes[1] == {"a", "b"}


def test_quorum_candidate_without_votes_gives_up():
    s = el.initial("a", 3e9, 0.0, Q)
    s, acts = run(s, [(0.0, el.Members(THREE)), (0.41, el.Tick()), (1.0, el.Tick()),
                      (1.5, el.Tick())])
    assert kinds(acts) == ["Claim"] and s.role == el.FOLLOWER


def test_quorum_voter_votes_only_for_the_best_live_member_once_per_term():
    s = el.initial("c", 1e9, 0.0, Q)
    s, acts = run(s, [(0.0, el.Members(THREE)),
                      (0.1, el.ClaimSeen("b", 5, 9e15)),     # not the best: no vote, no term
                      (0.2, el.ClaimSeen("a", 1, 3e9)),
                      (0.3, el.ClaimSeen("a", 1, 3e9))])
    assert [a for _, a in acts if isinstance(a, el.Vote)] == [el.Vote(1, "a")]
    assert isinstance(acts[0][1], el.Ignored) and s.term == 1


def test_quorum_record_without_majority_is_ignored_and_leader_keeps_its_place():
    four = {**THREE, "w": 5e8}
    c = el.initial("c", 1e9, 0.0, Q)
    c, acts = run(c, [(0.0, el.Members(four)),
                      (0.1, el.LeaderSeen("a", 3, frozenset({"a", "b", "c"}))),
                      (0.2, el.ClaimSeen("w", 60, 5e8)),             # a weak thief jumps terms
                      (0.3, el.LeaderSeen("w", 60, frozenset({"w"}))),
                      (5.0, el.Tick())])
    assert c.leader == "a" and c.term == 3
    assert [type(a).__name__ for _, a in acts] == ["LeaderChanged", "Ignored", "Ignored"]
    a = el.initial("a", 3e9, 0.0, Q)
    a, acts = run(a, [(0.0, el.Members(four)), (0.41, el.Tick()),
                      (0.5, el.VoteSeen("b", "a", 1)), (0.6, el.VoteSeen("c", "a", 1)),
                      (0.8, el.Tick()), (1.0, el.LeaderSeen("w", 60, frozenset({"w"})))])
    assert a.is_leader and a.leader_term == 1
    assert acts[-1][1] == el.AssertLeader(1)          # its record overwrites the thief's


def test_quorum_joiner_holds_the_record_until_it_knows_the_members_then_votes():
    s = el.initial("d", 1e8, 0.0, Q)
    s, acts = run(s, [(0.0, el.LeaderSeen("a", 2, frozenset({"a"}))),    # retained first
                      (0.1, el.Members({"a": 3e9}))])
    # a alone elected a; with d there are two members: a's vote + d's own backing
    assert s.leader == "a" and el.Vote(2, "a") in [a for _, a in acts]
    lead = el.initial("a", 3e9, 0.0, Q)
    lead, acts = run(lead, [(0.41, el.Tick()), (0.72, el.Tick()),
                            (1.0, el.Members({"d": 1e8})), (1.1, el.VoteSeen("d", "a", 1))])
    assert acts[-1][1] == el.AssertLeader(1) and lead.votes[1] == {"a", "d"}


def _quorum_handler(sim_state):
    def handle(node, acts, at):
        states = sim_state["states"]
        for a in acts:
            if isinstance(a, el.BecomeLeader):
                sim_state.setdefault("leaders", {}).setdefault(a.term, set()).add(node)
                sim_state["last_leader"] = (node, a.term, at)
            for target in sim_state["nodes"]:
                if isinstance(a, el.Claim):
                    sim_state["send"](target, el.ClaimSeen(node, a.term,
                                                           sim_state["flops"][node]), at)
                elif isinstance(a, el.Vote):
                    sim_state["send"](target, el.VoteSeen(node, a.candidate, a.term), at)
                elif isinstance(a, (el.BecomeLeader, el.AssertLeader)):
                    voters = states[node].votes.get(a.term, frozenset({node}))
                    sim_state["send"](target, el.LeaderSeen(node, a.term, voters), at)
    return handle


@pytest.mark.parametrize("n, seed", [(3, 2), (4, 1), (5, 3), (8, 4)])
def test_quorum_simulated_mesh_elects_the_best_and_fails_over_despite_a_thief(n, seed):
    """Quorum mode with a weak stolen device among the members that claims ever
    higher terms and announces itself leader every tick: it never leads anywhere,
    one leader per term, the best survivor leads after the crash (the honest
    survivors are a majority of the live members: a silent thief counts against them)."""
    sim_state: dict = {}
    rng = random.Random(seed)
    flops = {f"n{i}": rng.choice([1e9, 2e9, 2e9, 4e9]) for i in range(n)}
    flops["thief"] = 1e8
    sim_state["nodes"] = [nd for nd in flops if nd != "thief"]
    sim_state["flops"] = flops
    sim_state["mute"] = ("thief",)            # its own machine's actions go nowhere
    handler = _quorum_handler(sim_state)
    jumps = [1000]

    def thief(t):
        jumps[0] += 7
        for target in sim_state["nodes"]:
            sim_state["send"](target, el.ClaimSeen("thief", jumps[0], 1e8), t)
            sim_state["send"](target, el.LeaderSeen("thief", jumps[0], frozenset({"thief"})), t)

    honest = {k: v for k, v in flops.items()}
    _sim_network(n, seed, honest, sim_state, lambda nd, acts, at: handler(nd, acts, at)
                 if nd != "thief" else None, kill_at=3.0, params=Q, each_tick=thief,
                 until=8.0)
    for term, who in sim_state["leaders"].items():
        assert len(who) == 1 and "thief" not in who, (term, who)
    crashed = sim_state["crashed"]
    node, term, at = sim_state["last_leader"]
    assert node != crashed[0] and at - crashed[1] < 4.0
    survivors = [nd for nd in flops if nd not in (crashed[0], "thief")]
    assert node == el.order({k: flops[k] for k in survivors})[0]
    for nd, s in sim_state["states"].items():
        if nd not in ("thief", crashed[0]):
            assert s.leader == node and s.term < 1000


# ------------------------------------------------------------------ agents over MemoryBus
from meshdl.mesh import Device, Power  # noqa: E402
from meshdl.node.agent import NodeAgent  # noqa: E402
from meshdl.node.config import DuplicateNodeError, NodeConfig, Timing  # noqa: E402
from meshdl.node.status import MeshWatcher  # noqa: E402
from meshdl.transport.memory import MemoryBroker  # noqa: E402

FAST = Timing(dup_window=0.1, settle=0.15, claim_window=0.15, rank_step=0.2,
              leader_grace=0.5, telemetry_period=0.5, replan_debounce=0.05)


def mem_agent(broker, node_id, flops, mesh="m", models=("tiny_cnn",), timing=FAST):
    dev = Device(node_id, "generic", flops, 1 << 30, Power(3.0, 1.0, 1.0, 0.5))
    cfg = NodeConfig(node_id=node_id, mesh=mesh, emulate=True, models=models, timing=timing)
    return NodeAgent(cfg, device=dev, base=None,
                     bus_factory=lambda cid, will: broker.bus(cid, will), dataplane=False)


def crash(agent):
    """SIGKILL, in memory: stop the threads, drop both connections with their wills."""
    agent._stopped.set()
    agent._closed = True
    if agent._duties is not None:
        agent._duties.stop()
    if agent._leader_bus is not None:
        agent._leader_bus.crash()
    agent.bus.crash()


@pytest.fixture
def membroker():
    return MemoryBroker()


def test_memory_agents_elect_the_best_and_fail_over(membroker):
    # started one after the other: a settle long enough for every birth to arrive
    # before the first claim, however loaded the machine (the best must win term 1)
    # (torch imported first: a leader importing it while planning starves this thread)
    import dataclasses
    import meshdl
    meshdl.trace(meshdl.models.build("tiny_cnn"), (1, 3, 32, 32))
    settled = dataclasses.replace(FAST, settle=1.5)
    agents = {n: mem_agent(membroker, n, f, timing=settled).start()
              for n, f in (("a", 1e9), ("b", 3e9), ("c", 2e9))}
    watch = MeshWatcher(membroker.bus("watch"), "m")
    try:
        snap = watch.wait_for(lambda s: s.leader is not None and len(s.online) == 3, 10)
        assert snap is not None and snap.leader.node == "b"
        t0 = time.monotonic()
        crash(agents["b"])
        snap = watch.wait_for(lambda s: s.leader is not None and s.leader.node == "c", 5)
        assert snap is not None and snap.leader.term > 1
        assert time.monotonic() - t0 < 3.0
        assert snap.states["b"].online is False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (agents["a"].leader == "c"
                                                   and agents["a"].term() == snap.leader.term):
            time.sleep(0.02)
        assert agents["a"].leader == "c"
    finally:
        for n, a in agents.items():
            if n != "b":
                a.stop()


def test_memory_duplicate_id_is_refused(membroker):
    first = mem_agent(membroker, "a", 1e9).start()
    try:
        with pytest.raises(DuplicateNodeError, match="already online"):
            mem_agent(membroker, "a", 1e9).start()
        assert first.wait(0.3) is False            # the first node keeps running
    finally:
        first.stop()


def test_memory_simultaneous_duplicates_one_survives(membroker):
    import threading
    results = {}

    def go(tag):
        try:
            results[tag] = mem_agent(membroker, "x", 1e9).start()
        except DuplicateNodeError as exc:
            results[tag] = exc
    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results.values() if isinstance(r, NodeAgent)]
    assert len(ok) == 1, results
    ok[0].stop()


def test_memory_old_term_plans_are_fenced(membroker):
    from meshdl.wire import topics
    from meshdl.wire.control import PlanMessage, encode_control
    a = mem_agent(membroker, "a", 1e9, models=()).start()
    pub = membroker.bus("test")
    try:
        from meshdl.wire.control import NodeState
        pub.publish(topics.node_state("m", "a9"), encode_control(
            NodeState("a9", True, 1, "generic", 9e9, 1 << 30, {"compute_w": 1, "tx_w": 1})),
            retain=True)
        pub.publish(topics.leader("m"), encode_control(el_leader("a9", 5)), retain=True)
        deadline = time.monotonic() + 3
        while a.term() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.term() == 5
        plan = {"version": 1, "model": "tiny_cnn", "input_shape": [1, 3, 8, 8], "num_ops": 1,
                "stages": [], "source": "a", "sink": "a"}
        pub.publish(topics.plan("m", "old"), encode_control(PlanMessage("old", 4, plan)))
        pub.publish(topics.plan("m", "new"), encode_control(PlanMessage("new", 5, plan)))
        deadline = time.monotonic() + 3
        while a.plan("new") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.plan("new") is not None and a.plan("old") is None
    finally:
        a.stop()


def el_leader(node, term):
    from meshdl.wire.control import LeaderInfo
    return LeaderInfo(node, term)


def test_two_leaders_of_one_term_resolve_by_rank():
    """Claims crossed under load and both nodes lead term 2 without having recorded
    the other's claim: on seeing each other's record, the worse steps down and the
    better re-asserts, on both sides (no endless flapping of the leader record)."""
    from meshdl.node import election as el
    good, bad = ("n1", 3e9), ("n2", 1e9)
    states = {}
    for me, other in ((good, bad), (bad, good)):
        s = el.initial(me[0], me[1], 0.0)
        s, _ = el.step(s, el.Members({me[0]: me[1], other[0]: other[1]}), 0.0)
        s = el.ElectionState(**{**s.__dict__, "role": el.LEADER, "leader": me[0],
                                "term": 2, "leader_term": 2, "best": {}})
        states[me[0]] = s
    g, acts_g = el.step(states["n1"], el.LeaderSeen("n2", 2), 1.0)
    b, acts_b = el.step(states["n2"], el.LeaderSeen("n1", 2), 1.0)
    assert g.is_leader and any(isinstance(a, el.AssertLeader) for a in acts_g)
    assert not b.is_leader and b.leader == "n1"
    assert any(isinstance(a, el.StepDown) for a in acts_b)
