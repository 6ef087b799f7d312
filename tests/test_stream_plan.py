"""Streams in the cost model (simulate_stream) and the throughput objective."""
from __future__ import annotations

import pytest

import meshdl
from meshdl.errors import PlanError
from meshdl.planner import simulate, simulate_stream
from meshdl.planner.stream import bottleneck, percentile, round_robin, steady_fps
from meshdl.planner.throughput import replicas, stream_window


@pytest.fixture(scope="module")
def home():
    return meshdl.load_topology("home-4")


@pytest.fixture(scope="module")
def graph():
    return meshdl.trace(meshdl.models.build("mobilenet_v2"), (1, 3, 224, 224),
                        name="mobilenet_v2")


@pytest.fixture(scope="module")
def latency_plan(graph, home):
    return meshdl.plan(graph, home, alpha=1.0)


def test_one_frame_is_the_single_inference(graph, home, latency_plan):
    s = simulate_stream(latency_plan, graph, home, n_frames=1)
    assert s.latency_p50_s == pytest.approx(simulate(latency_plan, graph, home).latency_s)


def test_window_of_one_means_no_overlap(graph, home, latency_plan):
    one = simulate(latency_plan, graph, home).latency_s
    s = simulate_stream(latency_plan, graph, home, n_frames=8, window=1)
    assert s.fps == pytest.approx(1.0 / one, rel=1e-6)
    assert s.latency_p95_s == pytest.approx(one)


def test_pipelining_is_bounded_by_the_bottleneck(graph, home, latency_plan):
    period, name = bottleneck(latency_plan, graph, home)
    assert name.startswith(("compute on", "link"))
    one = simulate(latency_plan, graph, home).latency_s
    piped = simulate_stream(latency_plan, graph, home, n_frames=40, window=6)
    assert piped.fps <= 1.0 / period * 1.03             # no schedule beats the bound
    assert piped.fps > 1.0 / one                        # overlap helps
    # a slow camera sets the rate; frames then do not queue
    slow = simulate_stream(latency_plan, graph, home, n_frames=20, rate_fps=0.5 / one)
    assert slow.fps == pytest.approx(0.5 / one, rel=0.02)
    assert slow.latency_p95_s == pytest.approx(one, rel=0.02)


def test_round_robin_follows_weights():
    got = round_robin([3.0, 1.0], 8)
    assert got.count(0) == 6 and got.count(1) == 2
    assert got[:4].count(1) == 1                          # smooth, not bursty
    with pytest.raises(PlanError):
        round_robin([1.0, 0.0], 4)
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert steady_fps([1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_throughput_objective_beats_latency_plans_on_a_stream(graph, home, latency_plan):
    thr = meshdl.plan(graph, home, objective="throughput")
    assert thr.meta["objective"] == "throughput"
    plans, weights = replicas(thr)
    assert all(p.plan_id for p in plans) and len(weights) == len(plans)
    w = stream_window(len(plans))
    s_thr = simulate_stream(plans, graph, home, n_frames=48, window=w, weights=weights)
    s_lat = simulate_stream(latency_plan, graph, home, n_frames=48, window=w)
    assert s_thr.fps >= s_lat.fps
    best_single = max(d.flops for d in home.devices.values()) / graph.flops
    assert s_thr.fps > 1.2 * best_single                 # several devices at work
    for p in plans:
        meshdl.graph.check_plan(p, graph)
    # the stored prediction is the one simulate_stream makes
    assert thr.meta["stream"]["fps"] == pytest.approx(s_thr.fps, rel=0.05)


def test_objectives_are_checked_and_map_to_alpha(graph, home):
    with pytest.raises(PlanError, match="objective"):
        meshdl.plan(graph, home, objective="speed")
    assert meshdl.plan(graph, home, objective="latency").alpha == 1.0
    assert meshdl.plan(graph, home, objective="energy").alpha == 0.0
    with pytest.raises(PlanError):
        simulate_stream([], graph, home)


def test_leader_requests_carry_the_objective():
    from meshdl.node.leader import StandingRequest
    from meshdl.wire.control import JobRequest
    base = StandingRequest("resnet18")
    req = StandingRequest.from_job(JobRequest("j1", "c", "resnet18", "meshdl",
                                              options={"objective": "throughput"}), base)
    assert req.objective == "throughput" and req != base    # a separate standing plan
    with pytest.raises(PlanError, match="objective"):
        StandingRequest.from_job(JobRequest("j2", "c", "resnet18", "meshdl",
                                            options={"objective": "fast"}), base)
    plan_meta = {"meta": {"request": {"model": "resnet18", "objective": "throughput"}}}
    assert StandingRequest.from_plan(plan_meta).objective == "throughput"


def test_stream_paths_take_globs_and_refuse_videos(tmp_path):
    from meshdl.cli.infer_cmd import stream_paths
    from meshdl.errors import ImageError
    from PIL import Image
    for name in ("b.jpg", "a.png", "c.txt"):
        p = tmp_path / name
        if name.endswith("txt"):
            p.write_text("x")
        else:
            Image.new("RGB", (8, 8)).save(p)
    assert [p.name for p in stream_paths(str(tmp_path / "*"))] == ["a.png", "b.jpg"]
    assert [p.name for p in stream_paths(str(tmp_path))] == ["a.png", "b.jpg"]
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 16)
    with pytest.raises(ImageError, match="extract frames"):
        stream_paths(str(video))
    with pytest.raises(ImageError, match="no images match"):
        stream_paths(str(tmp_path / "*.jpeg"))
