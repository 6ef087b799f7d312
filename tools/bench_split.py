#!/usr/bin/env python3
"""Split-engine benchmark: what exact micro-splits cost inside one process.

(a) a 1-tile plan through ``meshdl.execute`` vs the model's plain forward pass
    (target <= 1.05x), timed interleaved in one run;
(b) for 2, 4, 6 and 9 tiles: total FLOPs of all tasks / model FLOPs (the halo
    recompute) and the time ratio, for three ways of cutting the spatial part:
    - per-block: a stage at every cut point, each tiled (halo exchange at every block);
    - per-resolution: a stage per feature-map resolution, each tiled;
    - fused: the whole spatial run as one tiled stage (DeepThings-style, no exchange).

(c) squeeze-and-excitation models (``--se-models``): the share of FLOPs a single-stage
    plan tiles (reduce points split as per-tile partials), the share without them (each
    SE pool ending the run, as before issue 9), the halo recompute, and the partial-sum
    traffic of the all-to-all exchanges vs the feature-map pieces. CSV in results/.

    python tools/bench_split.py [--models vgg16_bn,resnet18,mobilenet_v2] [--repeat 5]
        [--se-models mobilenet_v3_small,mobilenet_v3_large,efficientnet_b0]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import meshdl

GRIDS = {2: (2, 1), 4: (2, 2), 6: (3, 2), 9: (3, 3)}


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Median time of each function, measured round-robin so load hits all alike."""
    for fn in fns.values():
        fn()   # warm-up
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            samples[k] += timed(fn, 1)
    return {k: statistics.median(v) for k, v in samples.items()}


def cuts_per_resolution(g) -> list[int]:
    """Indices into g.cut_points where the spatial size changes after the cut."""
    out = []
    for i, p in enumerate(g.cut_points):
        nxt = g.positions[g.positions.index(p) + 1]
        a, b = g.tensor_shape(p), g.tensor_shape(nxt)
        if len(a) == 4 and len(b) == 4 and a[-2:] != b[-2:]:
            out.append(i)
    return out


def styles(g) -> dict[str, list[int]]:
    run_end = g.spatial_runs[0][1] if g.spatial_runs else len(g.ops)
    per_block = [i for i, p in enumerate(g.cut_points) if p <= run_end]
    return {"per-block": per_block, "per-resolution": cuts_per_resolution(g), "fused": []}


def bench_model(name: str, repeat: int) -> list[dict]:
    model = meshdl.models.build(name)
    g = meshdl.trace(model, (1, 3, 224, 224), name=name)
    x = torch.randn(1, 3, 224, 224)
    one = meshdl.manual_plan(g, grids=[(1, 1)])
    rows = []
    with torch.no_grad():
        t = interleaved({"forward": lambda: model(x), "1-tile": lambda: meshdl.execute(one, g, x)},
                        repeat)
        rows.append({"model": name, "style": "1 tile", "tiles": 1, "flops_ratio": 1.0,
                     "time_ratio": t["1-tile"] / t["forward"], "forward_ms": t["forward"] * 1e3,
                     "split_ms": t["1-tile"] * 1e3})
        ref = model(x)
        for style, cuts in styles(g).items():
            for n, grid in GRIDS.items():
                plan = meshdl.manual_plan(g, cuts=cuts, grids=[grid] * (len(cuts) + 1))
                flops = sum(task.flops for task in plan.tasks()) / g.flops
                t = interleaved({"forward": lambda: model(x),
                                 "split": lambda: meshdl.execute(plan, g, x)},
                                max(2, repeat // 2))
                y = meshdl.execute(plan, g, x)
                rel = ((y - ref).abs().max() / ref.abs().max()).item()
                rows.append({"model": name, "style": style, "tiles": n, "flops_ratio": flops,
                             "time_ratio": t["split"] / t["forward"],
                             "forward_ms": t["forward"] * 1e3, "split_ms": t["split"] * 1e3,
                             "stages": len(plan.stages), "rel_diff": rel})
    return rows


def share_without_reduce_points(g) -> float:
    """Tiled FLOP share if every global reduction ended the spatial run."""
    pos = [p for p in g.positions if len(g.tensor_shape(p)) == 4 or p in (0, len(g.ops))]
    tiled = sum(g.flops_between(a, b) for a, b in zip(pos, pos[1:])
                if g.is_spatial(a, b) and not g.reduce_ops(a, b))
    return tiled / g.flops


def bench_se(name: str, repeat: int) -> list[dict]:
    model = meshdl.models.build(name)
    g = meshdl.trace(model, (1, 3, 224, 224), name=name)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    rows = []
    for n, grid in GRIDS.items():
        plan = meshdl.manual_plan(g, grids=[grid])
        tiled = [s for s in plan.stages if s.tiled]
        stage_flops = sum(g.flops_between(s.start, s.end) for s in tiled)
        task_flops = sum(t.flops for s in tiled for t in s.tasks)
        partial_bytes = sum(r.nbytes * len(s.tasks) * (len(s.tasks) - 1)
                            for s in tiled for r in s.reduces)
        piece_bytes = sum(g.tensor_bytes(s.start) + g.tensor_bytes(s.end) for s in tiled)
        t = interleaved({"forward": lambda: model(x), "split": lambda: meshdl.execute(plan, g, x)},
                        max(2, repeat // 2))
        y = meshdl.execute(plan, g, x)
        rows.append({"model": name, "tiles": n, "tiled_share": stage_flops / g.flops,
                     "share_without": share_without_reduce_points(g),
                     "halo_overhead": task_flops / max(stage_flops, 1.0) - 1.0,
                     "reduce_points": sum(len(s.reduces) for s in tiled),
                     "partial_bytes": partial_bytes, "map_bytes": piece_bytes,
                     "time_ratio": t["split"] / t["forward"],
                     "rel_diff": ((y - ref).abs().max() / ref.abs().max()).item()})
    return rows


def se_table(names: list[str], repeat: int) -> None:
    print("\n| SE model | tiles | tiled FLOP share (1 stage) | share if SE ended runs | "
          "halo FLOPs overhead | reduce points | partial-sum bytes (all-to-all) | stage "
          "in+out map bytes | time ratio | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        for r in bench_se(name, repeat):
            rows.append(r)
            print(f"| {r['model']} | {r['tiles']} | {100 * r['tiled_share']:.1f}% | "
                  f"{100 * r['share_without']:.1f}% | {100 * r['halo_overhead']:.1f}% | "
                  f"{r['reduce_points']} | {r['partial_bytes']} | {r['map_bytes']} | "
                  f"{r['time_ratio']:.2f} | {r['rel_diff']:.1e} |", flush=True)
    out = Path("results")
    out.mkdir(exist_ok=True)
    with open(out / "bench_split_se.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg16_bn,resnet18,mobilenet_v2")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--se-models", default="mobilenet_v3_small,mobilenet_v3_large,efficientnet_b0",
                    help="squeeze-excite models for table (c); empty to skip")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of "
          f"{args.repeat} interleaved runs; ratios are split / plain forward")
    print("| model | style | tiles | stages | task FLOPs / model FLOPs | time ratio | "
          "forward ms | split ms | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        for r in bench_model(name, args.repeat):
            print(f"| {r['model']} | {r['style']} | {r['tiles']} | {r.get('stages', 2)} | "
                  f"{r['flops_ratio']:.3f} | {r['time_ratio']:.3f} | {r['forward_ms']:.1f} | "
                  f"{r['split_ms']:.1f} | {r.get('rel_diff', 0.0):.1e} |", flush=True)
    se = [n.strip() for n in args.se_models.split(",") if n.strip()]
    if se:
        se_table(se, args.repeat)


if __name__ == "__main__":
    main()
