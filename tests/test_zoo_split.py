"""Every zoo model x several hand-built plans equals the unsplit model."""
from __future__ import annotations

import pytest
import torch

import meshdl

HEAVY = {"mobilenet_v3_large", "efficientnet_b0"}     # SE nets with many reduce points
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n
          for n in meshdl.models.names()]


def plans_for(g):
    n = len(g.cut_points)
    few = sorted({max(0, n // 4), n // 2, max(0, 3 * n // 4)})
    return {
        "1 tile": dict(cuts=[], grids=[(1, 1)]),
        "rows 9:8:7:6:4:2": dict(cuts=[], row_ratios=[[9, 8, 7, 6, 4, 2]]),
        "2x2": dict(cuts=[], grids=[(2, 2)]),
        "4x3": dict(cuts=[], grids=[(4, 3)]),
        "vertical cuts": dict(cuts=few, grids=[(1, 1)] * (len(few) + 1)),
        "cuts + mixed tiles": dict(cuts=few, grids=[(2, 2), (3, 1), (1, 3), (2, 1)][:len(few) + 1],
                                   row_ratios=None),
    }


@pytest.fixture(scope="module", params=MODELS)
def traced(request):
    name = request.param
    model = meshdl.models.build(name)
    shape = meshdl.models.info(name).input_shape
    g = meshdl.trace(model, shape, name=name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x)
    return g, x, ref


def test_every_plan_matches_the_unsplit_model(traced):
    g, x, ref = traced
    bound = 1e-4 * ref.abs().max().item()
    for label, spec in plans_for(g).items():
        plan = meshdl.manual_plan(g, **spec)
        y = meshdl.execute(plan, g, x)
        diff = (y - ref).abs().max().item()
        assert diff <= bound, f"{g.name} {label}: max diff {diff:.3g} > {bound:.3g}"
        assert y.argmax().item() == ref.argmax().item(), f"{g.name} {label}: top-1 changed"
        tiles = sum(len(s.tasks) for s in plan.stages)
        if label != "1 tile" and label != "vertical cuts":
            assert tiles > len(plan.stages), f"{g.name} {label}: nothing was tiled"
