"""The leader's edge (node.leader.LeaderDuties around the leaderproto machine) on a
real mosquitto, through the test harness, whose MiniLeader is that same edge."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import meshdl
from meshdl.client import MeshClient
from meshdl.errors import JobError
from meshdl.node.harness import InProcessMesh
from meshdl.node.leader import make_plan
from meshdl.node.leaderproto import StandingRequest
from meshdl.transport.paho_bus import PahoBus
from meshdl.wire import topics
from meshdl.wire.control import JobRequest, JobStatus, decode_control, encode_control

MESH = "edge"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    d = tmp_path_factory.mktemp("edge")
    with EmbeddedBroker(backend="mosquitto", workdir=d / "b") as b:
        with InProcessMesh(b.url, meshdl.load_topology("home-4"), mesh_name=MESH) as m:
            with MeshClient(b.url, MESH) as c:
                yield b, m, c


def statuses(url: str, client: str):
    got: list[JobStatus] = []
    cv = threading.Condition()

    def on(topic, payload, retained):
        with cv:
            got.append(decode_control(payload, JobStatus))
            cv.notify_all()
    bus = PahoBus(url)
    bus.subscribe(topics.job_all(MESH, "status", client), on, qos=1)
    return bus, got, cv


def wait(cv, pred, timeout=30.0):
    end = time.monotonic() + timeout
    with cv:
        while not pred() and time.monotonic() < end:
            cv.wait(0.1)
        return pred()


def test_jobs_are_exact_and_a_resent_request_is_answered_without_planning(home):
    b, m, c = home
    model = meshdl.models.build("tiny_cnn")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    r = c.infer(x, model="tiny_cnn", alpha=1.0, timeout=60)
    assert (r.output - model(x)).abs().max().item() <= 1e-4 * model(x).abs().max().item()
    issued = m.book.store.issued(r.plan.plan_id)
    assert issued.leader == "mini-leader" and issued.term == m.book.term
    assert r.plan.term == issued.term and r.plan.meta["request"]["model"] == "tiny_cnn"
    made = m.leader.duties.plans_made
    bus, got, cv = statuses(b.url, "tester")
    try:
        job = topics.job_name("tester", "dup-1")
        req = JobRequest(job, "tester", "tiny_cnn", "meshdl",
                         options={"alpha": 1.0, "input_shape": [1, 3, 32, 32]})
        for _ in range(3):                     # the client re-sends: the same answer
            bus.publish(topics.job(MESH, job, "request"), encode_control(req), qos=1)
        assert wait(cv, lambda: len(got) >= 3)
        assert {(s.state, s.detail) for s in got} == {("planned", r.plan.plan_id)}
        assert m.leader.duties.plans_made == made           # no planning for them
        assert m.leader.duties.state.answered[job].plan_id == r.plan.plan_id
    finally:
        bus.close()


def test_an_unplannable_request_fails_fast_with_its_reason(home):
    _, m, c = home
    t0 = time.monotonic()
    with pytest.raises(JobError, match="refused job .*sink ghost is not online"):
        c.infer(torch.zeros(1, 3, 32, 32), model="tiny_cnn", sink="ghost", timeout=30)
    assert time.monotonic() - t0 < 10


def test_plan_show_and_the_leader_make_the_same_plan(home):
    _, m, _ = home
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), (1, 3, 32, 32), name="tiny_cnn")
    req = StandingRequest("tiny_cnn", "meshdl", 1.0)
    shown = make_plan(req, m.mesh, g)
    ours = m.leader.duties._plan(req, m.mesh)
    assert ours.plan_id == shown.plan_id and ours.plan.term == m.book.term
    assert shown.term == 0 and shown.meta["request"] == ours.plan.meta["request"]


def test_plans_of_requests_the_lru_drops_are_cleared(home):
    from meshdl.node.graphs import GraphCache
    from meshdl.node.leader import LeaderDuties
    from meshdl.node.planstore import PlanStore
    b, m, _ = home
    store = PlanStore()
    answers: dict[str, str] = {}
    cv = threading.Condition()

    def on_status(topic, payload, retained):
        st = decode_control(payload, JobStatus)
        with cv:
            answers[st.job] = st.detail
            cv.notify_all()
    with PahoBus(b.url) as bus:
        bus.subscribe(topics.job_all("lru", "status", "t"), on_status, qos=1)
        duties = LeaderDuties(me="L", mesh_name="lru", term=1, bus=bus,
                              live_mesh=lambda: m.mesh, graphs=GraphCache(), defaults=[],
                              store=store, adopt=store.adopt, max_requests=2)
        duties.start()
        try:
            end = time.monotonic() + 10                 # its first full (empty) re-plan done:
            while duties.replans < 1 and time.monotonic() < end:    # no later one clears
                time.sleep(0.02)
            pids = []
            for i, source in enumerate(("pi4-a", "pi4-b", "nano")):   # 3 requests, room for 2
                job = topics.job_name("t", f"lru-{i}")
                duties.job_request(JobRequest(job, "t", "tiny_cnn", "local", options={
                    "source": source, "alpha": 1.0, "input_shape": [1, 3, 32, 32]}))
                assert wait(cv, lambda: job in answers), f"no answer to {job}"
                pids.append(answers[job])
            assert len(set(pids)) == 3
            end = time.monotonic() + 10
            while store.known(pids[0]) is not None and time.monotonic() < end:
                time.sleep(0.05)
            assert store.known(pids[0]) is None                  # dropped request: cleared
            assert store.known(pids[1]) is not None and store.known(pids[2]) is not None
            assert [r.source for r in duties.state.requests] == ["pi4-b", "nano"]
        finally:
            duties.stop()
