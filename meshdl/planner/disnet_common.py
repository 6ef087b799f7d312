"""Helpers the seed strategies (disnet, baselines, dsl, distcnn) share: natural device
order, stage ranges of a graph, and stages over a range that mixes tileable and whole
parts."""
from __future__ import annotations

import re
from typing import Sequence

from meshdl.errors import PlanError
from meshdl.graph import ModelGraph
from meshdl.graph.plan import Region, Stage
from meshdl.graph.tiling import grid_regions, make_stage, row_regions
from meshdl.planner.data.seeds import DISNET_VGG_FEATURE_LAYERS

_POOLS = ("maxpool2d", "avgpool2d")


def natural_key(device_id: str) -> tuple:
    """Sort "2" before "10" and "u2" before "u10"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(device_id)))


def feature_layer_ends(g: ModelGraph) -> list[int] | None:
    """End positions of the "feature layers" of a VGG-like first spatial run (a layer is
    a conv with the batchnorm/activation ops after it, or a pooling op), or None when
    the run has no such structure or a layer does not end at a cut point."""
    if not g.spatial_runs or g.spatial_runs[0][0] != 0:
        return None
    a, b = g.spatial_runs[0]
    starts = [i for i in range(a, b) if g.ops[i].kind in ("conv2d", *_POOLS)]
    if not starts or starts[0] != a:
        return None
    ends = starts[1:] + [b]
    if any(p not in g.positions for p in ends):
        return None
    return ends


def vgg_feature_bounds(g: ModelGraph, layer_bounds: Sequence[int]) -> list[int] | None:
    """Positions of feature-layer indices ``layer_bounds`` (e.g. (4, 9, 14, 18)) when the
    graph is VGG16-like (18 feature layers), else None."""
    ends = feature_layer_ends(g)
    if ends is None or len(ends) != DISNET_VGG_FEATURE_LAYERS:
        return None
    return [0] + [ends[i - 1] for i in layer_bounds]


def equal_flop_bounds(g: ModelGraph, parts: int) -> list[int]:
    """[0, c1, ..., end]: the graph's tileable part (position 0 to the end of its last
    spatial run) cut at cut points into ``parts`` ranges of roughly equal FLOPs (fewer
    when there are not enough cut points). The rest of the model is the head."""
    if not g.spatial_runs:
        raise PlanError(f"{g.name} has no tileable (spatial) layers, so it cannot be split "
                        "into row tiles; use a vertical-only strategy such as 'dsl' or "
                        "'distcnn'")
    end = g.spatial_runs[-1][1]
    inner = [p for p in g.positions if 0 < p < end]
    total = g.flops_between(0, end)
    bounds = [0]
    for j in range(1, parts):
        target = total * j / parts
        cands = [p for p in inner if p > bounds[-1]]
        if not cands:
            break
        best = min(cands, key=lambda p: (abs(g.flops_between(0, p) - target), p))
        if best < end:
            bounds.append(best)
    bounds.append(end)
    return sorted(set(bounds))


def row_tiles(g: ModelGraph, b: int, devices: Sequence[str],
              ratios: Sequence[float]) -> list[tuple[Region, str]]:
    """Row bands of the tensor at position b in proportion to ``ratios`` (largest
    remainder: they sum to the height), one per device; with fewer rows than devices,
    the devices with the smallest ratios are dropped."""
    rows = int(g.tensor_shape(b)[-2])
    order = sorted(range(len(devices)), key=lambda i: (-ratios[i], i))[:rows]
    keep = sorted(order)
    regions = row_regions(g.tensor_shape(b), [ratios[i] for i in keep])
    return [(r, devices[i]) for r, i in zip(regions, keep)]


def grid_tiles(g: ModelGraph, b: int, rows: int, cols: int,
               devices: Sequence[str]) -> list[tuple[Region, str]]:
    """An even rows x cols grid at position b (shrunk to fit), tile n on devices[n % len]."""
    h, w = g.tensor_shape(b)[-2:]
    regions = grid_regions(g.tensor_shape(b), min(rows, int(h)), min(cols, int(w)))
    return [(r, devices[n % len(devices)]) for n, r in enumerate(regions)]


def add_range(g: ModelGraph, stages: list[Stage], a: int, b: int,
              tiles_for, whole_device: str) -> None:
    """Append stages for ops [a, b): tileable parts get ``tiles_for(q)`` tiles (q = the
    part's end position), parts that cannot be tiled run whole on ``whole_device``."""
    for p, q, spatial in g.split_ranges(a, b):
        tiles = tiles_for(q) if spatial else [(None, whole_device)]
        if len(tiles) == 1 and tiles[0][0] is not None:
            tiles = [(None, tiles[0][1])]
        stages.append(make_stage(g, len(stages), p, q, tiles))
