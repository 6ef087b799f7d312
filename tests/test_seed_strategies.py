"""The seed strategies against the seeds' golden numbers, and every plan runs exactly."""
from __future__ import annotations

import pytest
import torch

import meshdl
from meshdl.errors import PlanError
from meshdl.graph.tiling import split_ratio
from meshdl.mesh import Device, Link, Mesh, Power
from meshdl.planner.base import PlanRequest
from meshdl.planner.data.seeds import DISNET_ES_SWEEP, DSL_LAYERS
from meshdl.planner.disnet import disnet_decisions, disnet_stage_bounds, parts_for, plan_disnet
from meshdl.planner.distcnn import distcnn_place, graph_layers, plan_distcnn, seed_alexnet
from meshdl.planner.dsl import dsl_cut_from_layer_table, min_cut_chain


@pytest.fixture(scope="module")
def net0():
    return meshdl.load_topology("disnet-net0")


@pytest.fixture(scope="module")
def d50():
    return meshdl.load_topology("distcnn-50")


@pytest.fixture(scope="module")
def vgg_small():
    return meshdl.trace(meshdl.models.build("vgg16_bn"), (1, 3, 64, 64), name="vgg16_bn")


@pytest.fixture(scope="module")
def alexnet():
    return meshdl.trace(meshdl.models.build("alexnet"), (1, 3, 224, 224), name="alexnet")


# ----- DISNET ------------------------------------------------------------------------
def test_disnet_golden_scenario(net0):
    d = disnet_decisions(net0, [6, 5, 4, 3], 0.5, "8", "4", power_grouping="seed")
    assert d.path == ["8", "6", "2", "7", "4"]
    assert d.points == ["4", "4", "4", "4"]
    assert d.devices == [["9", "3", "7", "8", "4", "1"], ["9", "3", "7", "8", "4"],
                         ["9", "3", "7", "8"], ["9", "3", "7"]]
    assert d.ratios == [[9, 8, 7, 6, 4, 2], [9, 8, 7, 6, 4], [9, 8, 7, 6], [9, 8, 7]]
    rows = split_ratio(224, d.ratios[0])
    assert sum(rows) == 224 and rows == [56, 50, 44, 37, 25, 12]   # seed: [57,50,43,37,24,12]


def test_disnet_plan_golden_vgg224(net0):
    g = meshdl.trace(meshdl.models.build("vgg16_bn"), (1, 3, 224, 224), name="vgg16_bn")
    p = plan_disnet(g, net0, PlanRequest("8", "4", options={"es": 0.5,
                                                            "power_grouping": "seed"}))
    meta = p.meta["disnet"]
    assert meta["first_layer_rows"] == [56, 50, 44, 37, 25, 12]
    # the seed's stages: feature layers [0,4) [4,9) [9,14) [14,18), FC on the last point
    assert [s.start for s in p.stages][:4] == disnet_stage_bounds(g)[:4] == [0, 10, 23, 34]
    assert [[t.device for t in s.tasks] for s in p.stages[:4]] == meta["devices"]
    first = p.stages[0]
    assert sum(t.out_region.rows for t in first.tasks) == g.tensor_shape(first.end)[-2]
    assert p.stages[-1].tasks[0].device == "4" and p.stages[-1].end == len(g.ops)


@pytest.mark.parametrize("net", sorted(DISNET_ES_SWEEP))
def test_disnet_es_sweep_reproduced_with_seed_quirk(net):
    case = DISNET_ES_SWEEP[net]
    mesh = meshdl.load_topology(net)
    for es, want in case["points"].items():
        d = disnet_decisions(mesh, [6, 5, 4, 3], es, case["source"], case["sink"],
                             power_grouping="seed",
                             seed_last_neighbour=case["last_neighbour"])
        assert d.points == list(want), (net, es)
        # execution points move forward along the path only
        idx = [d.path.index(p) for p in d.points]
        assert idx == sorted(idx)


def test_disnet_es_changes_decisions_and_alpha_fallback():
    mesh = meshdl.load_topology("disnet-net3")
    d0 = disnet_decisions(mesh, [6, 5, 4, 3], 0.0, "3", "4", power_grouping="seed")
    assert d0.points == ["8", "4", "4", "4"]                  # es = 0 matches the seed
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), (1, 3, 32, 32), name="tiny_cnn")
    by_alpha = plan_disnet(g, mesh, PlanRequest("3", "4", alpha=0.0,
                                                options={"power_grouping": "seed"}))
    assert by_alpha.meta["disnet"]["points"][0] == "8"       # alpha stands in for es


def test_disnet_parts_table_and_errors(net0):
    assert parts_for(10) == [6, 5, 4, 3] and parts_for(12) == [7, 7, 4, 3]
    assert parts_for(2) == [2, 2, 2, 2] and parts_for(50) == [7, 7, 4, 3]
    with pytest.raises(PlanError, match="es"):
        disnet_decisions(net0, [6], 1.5, "8", "4")
    with pytest.raises(PlanError, match="seed power group"):
        disnet_decisions(meshdl.load_topology("home-4"), [2], 0.5,
                         *sorted(meshdl.load_topology("home-4").devices)[:2],
                         power_grouping="seed")


def test_disnet_bounded_path_enumeration(d50):
    d = disnet_decisions(d50, [7, 7, 4, 3], 0.5, "u00", "u01", max_paths=2000)
    assert d.paths_seen <= 2000 and d.path[0] == "u00" and d.path[-1] == "u01"


# ----- DSL ---------------------------------------------------------------------------
def test_dsl_seed_data_full_offload():
    cut = dsl_cut_from_layer_table()
    assert cut.edge_layers == 1                               # only the input on the edge
    assert cut.predicted_s == pytest.approx(0.891, abs=1e-3)
    input_xfer = DSL_LAYERS[0][3]
    cloud = sum(r[4] for r in DSL_LAYERS)
    assert input_xfer == pytest.approx(0.6846, abs=1e-4)
    assert input_xfer + cloud == pytest.approx(cut.predicted_s)
    assert cut.all_edge_s == pytest.approx(4.30, abs=5e-3)


def test_dsl_cut_is_contiguous_and_optimal():
    # a chain where the reverse-edge-less cut would go edge -> cloud -> edge:
    # layer 2 is cheap on the edge and expensive in the cloud, shipping is cheap
    edge = [0.0, 5.0, 0.1, 5.0]
    cloud = [0.0, 0.1, 9.0, 0.1]
    xfer = [1.0, 0.2, 0.2, 0.2]
    cut = min_cut_chain(edge, cloud, xfer)
    brute = min(sum(edge[:k]) + (xfer[k - 1] if k < 4 else 0) + sum(cloud[k:])
                for k in range(1, 5))
    assert cut.predicted_s == pytest.approx(brute) == pytest.approx(cut.cut_value)


# ----- distributedCNNs ---------------------------------------------------------------
def _two_unit_mesh():
    devs = {"opi": Device("opi", "orangepi_zero", 480e6, 131072 * 1024, Power(2.4, 1.6, 1.5)),
            "bbb": Device("bbb", "beaglebone_ai", 300e6, 524288 * 1024, Power(5, 3, 2.9))}
    return Mesh("two", devs, (Link("opi", "bbb", 72.2e6, 0.0),))


def test_distcnn_fc6_never_on_orangepi(d50, alexnet):
    pl = distcnn_place([seed_alexnet()], ["opi"], ["opi"], _two_unit_mesh())
    assert pl.units[0][5] == "bbb" and pl.status == "optimal"
    assert pl.units[0][:5] == ["opi"] * 5                     # the faster unit otherwise
    src = next(d for d in sorted(d50.devices) if d50.devices[d].profile == "orangepi_zero")
    p = plan_distcnn(alexnet, d50, PlanRequest(src, src))
    where = p.meta["distcnn"]["units"][0]
    assert p.meta["distcnn"]["layers"][5] == "classifier_1"   # fc6
    assert d50.devices[where[5]].profile != "orangepi_zero"
    pl = distcnn_place([seed_alexnet()], [src], [src], d50)
    assert d50.devices[pl.units[0][5]].profile != "orangepi_zero"


def test_distcnn_seed_alexnet_on_one_pi(d50):
    pl = distcnn_place([seed_alexnet()], ["u00"], ["u00"], d50.with_latency(0))
    assert d50.devices["u00"].profile == "rpi3bplus_seed"
    assert pl.latency_s[0] == pytest.approx(1.295, abs=1e-3)   # 725.2 MFLOP / 560 MFLOP/s


def test_distcnn_several_models_at_once(d50):
    pl = distcnn_place([seed_alexnet()] * 3, ["u00", "u10", "u20"], ["u01", "u11", "u21"],
                       d50, time_limit=20)
    assert len(pl.units) == 3 and all(len(u) == 8 for u in pl.units)
    assert pl.objective_s == pytest.approx(sum(pl.latency_s), rel=1e-6)
    for unit in d50.devices:       # memory holds across all three models
        used = sum(seed_alexnet().m[j] for u in pl.units for j, w in enumerate(u) if w == unit)
        assert used <= d50.devices[unit].memory_bytes


def test_distcnn_infeasible_memory_says_which_layer():
    small = _two_unit_mesh().subgraph(["opi"])
    with pytest.raises(PlanError, match=r"fc6 .*largest device memory is 128\.0 MiB"):
        distcnn_place([seed_alexnet()], ["opi"], ["opi"], small)


def test_distcnn_alexnet_layers_match_seed(alexnet):
    bounds, table = graph_layers(alexnet)
    assert len(table.c) == 8 and table.m[5] == pytest.approx(151011328)


# ----- every strategy runs exactly ---------------------------------------------------
@pytest.mark.parametrize("strategy", ["disnet", "modnn", "deepslicing", "deepthings",
                                      "dsl", "distcnn"])
def test_every_seed_strategy_runs_exactly(strategy, net0, vgg_small):
    plan = meshdl.plan(vgg_small, net0, strategy=strategy, source="8", sink="4", alpha=0.5)
    assert plan.latency_s is not None and plan.latency_s > 0
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = vgg_small.forward(x)
    y = meshdl.execute(plan, vgg_small, x)
    assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert strategy in meshdl.strategies()


@pytest.mark.parametrize("strategy", ["disnet", "modnn", "deepslicing", "deepthings"])
def test_seed_strategies_on_other_models(strategy, net0):
    g = meshdl.trace(meshdl.models.build("resnet18"), (1, 3, 64, 64), name="resnet18")
    plan = meshdl.plan(g, net0, strategy=strategy, source="8", sink="4")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = g.forward(x)
    y = meshdl.execute(plan, g, x)
    assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_modnn_gathers_through_the_source(net0, vgg_small):
    plan = meshdl.plan(vgg_small, net0, strategy="modnn", source="8", sink="4")
    devs = plan.meta["modnn"]["devices"]
    assert devs[0] == "8" and len(devs) <= 7
    workers = [k for k in plan.routes if "8" not in k.split(">")]
    assert workers and all("8" in plan.routes[k] for k in workers)
