"""Pure helpers of tools/bench_mesh_netns.py: the best single device, the input's hop
to it, the arms' alternation and the plan column."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_mesh_netns as bn  # noqa: E402


@pytest.fixture(scope="module")
def jetson():
    import meshdl
    mesh = meshdl.load_topology("home-jetson")
    g = meshdl.trace(meshdl.models.build("resnet18"), input_shape=(1, 3, 224, 224),
                     name="resnet18")
    return mesh, g


def test_input_hop_is_the_star_path_of_the_input(jetson):
    mesh, g = jetson
    src = mesh.defaults["source"]
    dev, pred = bn.best_single(g, mesh, src)
    assert dev != src                    # on home-jetson the best single is not the source
    hop = bn.input_hop_s(g, mesh, src, dev)
    nbytes = 4 * math.prod(g.input_shape)
    # store and forward: the source's uplink, then the device's downlink
    assert hop == pytest.approx(mesh.star.path_time(src, dev, nbytes), rel=0.02)
    assert 0 < hop < pred
    assert bn.input_hop_s(g, mesh, src, src) == 0.0


def test_best_single_is_the_fastest_whole_model_device(jetson):
    from meshdl.planner.local import whole_plan
    from meshdl.planner.simulate import simulate
    mesh, g = jetson
    src = mesh.defaults["source"]
    dev, pred = bn.best_single(g, mesh, src)
    for d in mesh.devices:
        assert simulate(whole_plan(g, d, src, src), g, mesh).latency_s >= pred - 1e-12


def test_arms_alternate_so_each_goes_first_half_the_time():
    orders = [bn.arm_order(i) for i in range(6)]
    assert all(sorted(o) == ["meshdl", "single"] for o in orders)
    assert sum(o[0] == "meshdl" for o in orders) == 3
    assert orders[0] != orders[1]


def test_plan_label_marks_the_best_single_plan():
    assert bn.plan_label("pi5", "pi5") == "pi5 (= best single)"
    assert bn.plan_label("jetson+pi4-a", "jetson") == "jetson+pi4-a"


def test_shipped_counts_the_input_hop_from_the_send():
    # sent at 10.0; stage 0 ran 0.5 s from the device holding the input and ended at
    # 10.8 (held at 10.3); the sink held the answer 0.6 s after the device held the input
    total, hop = bn.shipped_s(10.0, 10.8, 0.5, 0.6)
    assert hop == pytest.approx(0.3)
    assert total == pytest.approx(0.9)


def test_below_one_counts_only_rows_on_another_plan():
    rows = [{"vs_best_single": 0.999, "plan": "pi5", "best_single": "pi5"},
            {"vs_best_single": 0.97, "plan": "jetson+pi4-a", "best_single": "jetson"},
            {"vs_best_single": 1.4, "plan": "jetson+pi4-a", "best_single": "jetson"},
            {"vs_best_single": None, "plan": "pi5", "best_single": "pi4"}]
    assert bn.below_on_other_plan(rows) == 1
