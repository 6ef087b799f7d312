"""Reduce points on a real mesh: SE tiles exchange partials between devices (real
mosquitto, in-process data planes), and the answer equals meshdl.execute's."""
from __future__ import annotations

import pytest
import torch

import meshdl
from meshdl.client import MeshClient
from meshdl.node.harness import InProcessMesh, finish_plan
from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


def test_se_model_tiles_on_the_mesh_with_partials_exchange(tmp_path):
    from meshdl.data import data_dir
    name = "mobilenet_v3_small"
    model = meshdl.models.build(name)
    shape = (1, 3, 96, 112)
    g = meshdl.trace(model, shape, name=name)
    mesh = meshdl.load_topology("home-4")
    # one device holds two tiles of the stage: phases must not deadlock
    devices = ["pi4-a", "pi4-b", "pi4-a", "nano"]
    plan = meshdl.manual_plan(g, cuts=[], grids=[(2, 2)], source="pi4-a", sink="pi4-b")
    for t in plan.tasks():
        t.device = devices[int(t.id.split("t")[-1])] if t.stage == 0 else "pi4-b"
    assert plan.stages[0].phases > 2
    finish_plan(plan, g, mesh, 1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    want = meshdl.execute(plan, g, x)
    conf = tmp_path / "broker.conf"
    conf.write_text((data_dir("broker") / "plain.conf").read_text())
    with EmbeddedBroker(str(conf), backend="mosquitto", workdir=tmp_path / "b") as b:
        with InProcessMesh(b.url, mesh, mesh_name="se", fixed={name: plan}) as m:
            with MeshClient(b.url, "se") as c:
                r = c.infer(x, model=name, timeout=90)
            sent = sum(p.stats["pieces_in"] for p in m.planes.values())
    with torch.no_grad():
        ref = model(x)
    assert (r.output - want).abs().max().item() == 0.0          # the same task code
    assert (r.output - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert sent > 4 * 4 * len(plan.stages[0].reduces) // 2      # partials crossed the mesh
