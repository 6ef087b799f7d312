#!/usr/bin/env python
"""Compare meshdl's planning strategies on DISNET's scenario suite (predicted figures).

    python tools/bench_planners.py [--quick] [--out results/planners]

Scenarios: meshes disnet-net0..3, (source, sink) pairs (8->4 first), B_max 10..50
Mbit/s in steps of 5, models vgg16_bn / resnet18 / mobilenet_v2 at 224. Every
registered strategy that applies is scored by the same simulator at alpha = 1 (meshdl
and disnet also at alpha = 0: meshdl's energy is checked against every plan);
strategies not registered yet, or that refuse a scenario, are skipped with a message.
Also: meshdl vs optimal on small meshes (home-4, 5- and 6-device subgraphs of the
DISNET meshes; alpha 0, 0.5, 1), an alpha sweep (energy/latency trade-off) and
planning time (median of 3) on distcnn-50 and a 500-device random mesh (distcnn is
skipped beyond 100 devices).

Writes scenarios.csv, optimal.csv, alpha.csv, timing.csv, summary.md and PNG plots
to --out (default results/planners/, gitignored) and prints the figures.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import meshdl
from meshdl.errors import MeshdlError
from meshdl.graph.model_graph import trace
from meshdl.planner import plan, strategies

PAIRS = [("8", "4"), ("0", "9"), ("3", "5")]
MODELS = ["vgg16_bn", "resnet18", "mobilenet_v2"]


def geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def run_plan(g, mesh, strategy, **kw):
    t = time.perf_counter()
    try:
        p = plan(g, mesh, strategy, **kw)
    except MeshdlError as exc:
        return None, time.perf_counter() - t, str(exc).split(";")[0]
    return p, time.perf_counter() - t, ""


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


ALPHA_AWARE = ("meshdl", "disnet")    # strategies whose plan depends on alpha


def scenarios(graphs, args, names):
    """Every strategy at alpha = 1; meshdl and disnet also at alpha = 0 (the energy
    check: meshdl's alpha-0 plan against every plan of the scenario)."""
    rows, skipped = [], {}
    caps = [10, 30, 50] if args.quick else list(range(10, 55, 5))
    pairs = PAIRS[:1] if args.quick else PAIRS
    for model, g in graphs.items():
        for net in range(4):
            mesh = meshdl.load_topology(f"disnet-net{net}")
            for src, snk in pairs:
                for cap in caps:
                    runs = [(s, 1.0) for s in names] + [(s, 0.0) for s in ALPHA_AWARE
                                                        if s in names]
                    for s, alpha in runs:
                        if s == "optimal" and len(mesh.devices) > 6:
                            continue
                        p, dt, why = run_plan(g, mesh, s, source=src, sink=snk, alpha=alpha,
                                              bandwidth_cap_mbps=cap)
                        if p is None:
                            skipped.setdefault(s, why)
                            continue
                        rows.append({"model": model, "mesh": mesh.name, "source": src,
                                     "sink": snk, "cap_mbps": cap, "strategy": s,
                                     "alpha": alpha, "latency_s": p.latency_s,
                                     "energy_j": p.energy_j,
                                     "devices": len({t.device for t in p.tasks()}),
                                     "plan_s": dt})
            print(f"  {model} on disnet-net{net}: done", flush=True)
    return rows, skipped


def _key(r):
    return (r["model"], r["mesh"], r["source"], r["sink"], r["cap_mbps"])


def checks(rows):
    """Per scenario: meshdl (alpha 1) slower than local; meshdl's objective above
    local's at alpha 0 or 1 (objective relative to local, so local scores 1); meshdl's
    alpha-0 energy above the least energy of any plan of the scenario."""
    by: dict = {}
    for r in rows:
        by.setdefault(_key(r), {})[(r["strategy"], r["alpha"])] = r
    slower, obj_worse, energy_worse = [], [], []
    for k, v in by.items():
        loc = v.get(("local", 1.0))
        for a in (1.0, 0.0):
            m = v.get(("meshdl", a))
            if m is None or loc is None:
                continue
            obj = a * m["latency_s"] / loc["latency_s"] + (1 - a) * m["energy_j"] / loc["energy_j"]
            if obj > 1 + 1e-9:
                obj_worse.append((k, a, obj))
            if a == 1.0 and m["latency_s"] > loc["latency_s"] * (1 + 1e-9):
                slower.append(k)
        m0 = v.get(("meshdl", 0.0))
        if m0 is not None:
            least = min(v.values(), key=lambda r: r["energy_j"])
            if m0["energy_j"] > least["energy_j"] * (1 + 1e-9):
                energy_worse.append((k, least["strategy"], least["alpha"],
                                     m0["energy_j"], least["energy_j"]))
    return slower, obj_worse, energy_worse


def ratios(rows, names):
    """Geometric mean over scenarios of other/meshdl latency (and energy)."""
    by = {}
    for r in rows:
        if r["alpha"] == 1.0:
            by.setdefault(_key(r), {})[r["strategy"]] = r
    out = {}
    for s in names:
        if s == "meshdl":
            continue
        lat = [v[s]["latency_s"] / v["meshdl"]["latency_s"] for v in by.values()
               if s in v and "meshdl" in v]
        en = [v[s]["energy_j"] / v["meshdl"]["energy_j"] for v in by.values()
              if s in v and "meshdl" in v]
        if lat:
            out[s] = (geomean(lat), geomean(en), len(lat), min(lat))
    return out


def small_meshes(quick: bool):
    """home-4 and subgraphs of the DISNET meshes around (8 -> 4): 5 devices, and in the
    full run 6 (the source, the sink and the devices nearest the source)."""
    import networkx as nx
    out = [(meshdl.load_topology("home-4"), "pi4-a", "pi4-a")]
    for net in (range(2) if quick else range(4)):
        base = meshdl.load_topology(f"disnet-net{net}")
        near = list(nx.bfs_tree(base.graph, "8"))
        for n in ((5,) if quick else (5, 6)):
            devs = list(dict.fromkeys(["8", "4", *near]))[:n]
            sub = base.subgraph(devs, name=f"disnet-net{net}-{n}")
            if sub.is_connected():
                out.append((sub, "8", "4"))
    return out


def optimal_rows(graphs, args):
    rows = []
    meshes = small_meshes(args.quick)
    models = [m for m in graphs if m != "vgg16_bn"] or list(graphs)
    for model in models[:1] if args.quick else models:
        g = graphs[model]
        for mesh, src, snk in meshes:
            if model != models[0] and len(mesh.devices) > 5:
                continue                  # exhaustive search time grows fast
            caps = [None] if args.quick or model != models[0] or len(mesh.devices) > 5 \
                else [None, 10]
            for cap in caps:
                for alpha in (0.0, 0.5, 1.0):
                    kw = dict(source=src, sink=snk, alpha=alpha, bandwidth_cap_mbps=cap)
                    o, to, _ = run_plan(g, mesh, "optimal", **kw)
                    m, tm, _ = run_plan(g, mesh, "meshdl", **kw)
                    if o is None or m is None:
                        continue
                    rows.append({"model": model, "mesh": mesh.name, "cap_mbps": cap,
                                 "alpha": alpha, "optimal_latency_s": o.latency_s,
                                 "meshdl_latency_s": m.latency_s,
                                 "optimal_objective": o.meta["search"]["objective"],
                                 "meshdl_objective": m.meta["search"]["objective"],
                                 "ratio": m.meta["search"]["objective"]
                                 / o.meta["search"]["objective"],
                                 "optimal_plan_s": to, "meshdl_plan_s": tm})
        print(f"  {model}: {len(rows)} cases", flush=True)
    return rows


def alpha_sweep(g, args):
    """meshdl on vgg16_bn, disnet-net0 8 -> 4, 10 Mbit/s, alpha 0..1; the objective of
    meshdl's plan and of local's (relative to local, so local scores 1)."""
    mesh = meshdl.load_topology("disnet-net0")
    kw = dict(source="8", sink="4", bandwidth_cap_mbps=10)
    loc, _, _ = run_plan(g, mesh, "local", alpha=1.0, **kw)
    rows = []
    for i in range(0, 11, 2 if args.quick else 1):
        a = i / 10
        p, dt, _ = run_plan(g, mesh, "meshdl", alpha=a, **kw)
        rows.append({"alpha": a, "latency_s": p.latency_s, "energy_j": p.energy_j,
                     "objective": a * p.latency_s / loc.latency_s
                     + (1 - a) * p.energy_j / loc.energy_j,
                     "devices": len({t.device for t in p.tasks()}), "plan": structure(p),
                     "plan_s": dt})
    return rows


def structure(p) -> str:
    """What a plan does (stages, devices, tiles), without its alpha or id."""
    return ";".join(f"{s.start}-{s.end}:" + ",".join(
        f"{t.device}{'' if t.out_region is None else t.out_region.to_list()}" for t in s.tasks)
        for s in p.stages)


def sweep_facts(rows):
    """(distinct plans, monotone): energy never rises as alpha falls, latency never
    rises as alpha grows."""
    rows = sorted(rows, key=lambda r: r["alpha"])
    mono = all(b["latency_s"] <= a["latency_s"] * (1 + 1e-9)
               and a["energy_j"] <= b["energy_j"] * (1 + 1e-9) for a, b in zip(rows, rows[1:]))
    return len({r["plan"] for r in rows}), mono


MAX_DISTCNN = 100     # distcnn's programme has N^2 variables per layer: skip larger meshes


def timing(g, names):
    """Median of 3 planning times (time.perf_counter) after one warm-up call."""
    rows = []
    cases = [("distcnn-50", meshdl.load_topology("distcnn-50"), None),
             ("random-500", meshdl.mesh.random_mesh(500, seed=1), "n000")]
    for label, mesh, src in cases:
        for s in ("meshdl", "distcnn"):
            if s not in names:
                print(f"  {s}: not registered, skipped")
                continue
            if s == "distcnn" and len(mesh.devices) > MAX_DISTCNN:
                rows.append({"mesh": label, "strategy": s, "plan_s": None,
                             "latency_s": None, "note": "skipped (too large)"})
                continue
            opts = {"time_limit": 20.0} if s == "distcnn" else {}
            reps = 3 if s == "meshdl" else 1
            p, _, why = run_plan(g, mesh, s, source=src, sink=src, alpha=1.0, **opts)
            times = []
            for _ in range(reps if p is not None else 0):
                p, dt, why = run_plan(g, mesh, s, source=src, sink=src, alpha=1.0, **opts)
                times.append(dt)
            rows.append({"mesh": label, "strategy": s,
                         "plan_s": sorted(times)[len(times) // 2] if times else None,
                         "latency_s": p.latency_s if p else None, "note": why})
    return rows


def plots(out: Path, rows, alpha_rows, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    for model in models:
        fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=False)
        for net, ax in enumerate(axes):
            for s in names:
                pts = sorted((r["cap_mbps"], r["latency_s"]) for r in rows
                             if r["model"] == model and r["strategy"] == s
                             and r["alpha"] == 1.0
                             and r["mesh"] == f"disnet-net{net}" and r["source"] == "8")
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=s)
            ax.set_title(f"{model}, disnet-net{net}, 8->4", fontsize=9)
            ax.set_xlabel("B_max (Mbit/s)")
            ax.set_yscale("log")
        axes[0].set_ylabel("predicted latency (s)")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"latency_{model}.png", dpi=100)
        plt.close(fig)
    if alpha_rows:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([r["latency_s"] for r in alpha_rows], [r["energy_j"] for r in alpha_rows],
                marker="o")
        for r in alpha_rows:
            ax.annotate(f"{r['alpha']:.1f}", (r["latency_s"], r["energy_j"]), fontsize=7)
        ax.set_xlabel("predicted latency (s)")
        ax.set_ylabel("predicted energy (J)")
        ax.set_title("meshdl alpha sweep: vgg16_bn, disnet-net0 8->4, 10 Mbit/s", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "alpha_sweep.png", dpi=100)
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/planners", help="output directory")
    ap.add_argument("--quick", action="store_true", help="a smaller run (minutes)")
    ap.add_argument("--models", nargs="*", default=None, help=f"default: {MODELS}")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = strategies()
    wanted = ["meshdl", "disnet", "modnn", "deepslicing", "deepthings", "local", "optimal",
              "dsl", "distcnn"]
    for s in wanted:
        if s not in names:
            print(f"strategy {s!r} is not registered yet: skipped")
    names = [s for s in wanted if s in names] + [s for s in names if s not in wanted]
    models = args.models or (["vgg16_bn", "resnet18"] if args.quick else MODELS)
    print(f"tracing {', '.join(models)} at 224x224 ...", flush=True)
    graphs = {m: trace(meshdl.models.build(m), (1, 3, 224, 224), name=m) for m in models}

    print("DISNET scenario suite ...", flush=True)
    rows, skipped = scenarios(graphs, args, names)
    for s, why in skipped.items():
        print(f"  {s}: skipped in some scenarios ({why})")
    write_csv(out / "scenarios.csv", rows)
    rat = ratios(rows, names)
    slower, obj_worse, energy_worse = checks(rows)
    print("optimal on small meshes ...", flush=True)
    opt = optimal_rows(graphs, args)
    write_csv(out / "optimal.csv", opt)
    print("alpha sweep ...", flush=True)
    first = graphs[models[0]]
    alpha_rows = alpha_sweep(first, args)
    write_csv(out / "alpha.csv", alpha_rows)
    print("planning time ...", flush=True)
    g_t = graphs.get("vgg16_bn") or first
    tim = timing(g_t, names)
    write_csv(out / "timing.csv", tim)
    plots(out, rows, alpha_rows, names)

    n_scen = len({_key(r) for r in rows})
    lines = ["# meshdl planners: predicted figures", "",
             f"{len(rows)} plans over {n_scen} scenarios (every strategy at alpha = 1; "
             f"{', '.join(ALPHA_AWARE)} also at alpha = 0).", "",
             "| meshdl vs | latency ratio (geomean, other/meshdl) | min | energy ratio | "
             "scenarios |",
             "|---|---|---|---|---|"]
    for s, (lat, en, n, lo) in rat.items():
        lines.append(f"| {s} | {lat:.2f}x | {lo:.2f}x | {en:.2f}x | {n} |")
    lines += ["", f"scenarios where meshdl (alpha 1) is slower than local: {len(slower)}",
              f"scenario x alpha (0, 1) where meshdl's objective is above local's: "
              f"{len(obj_worse)}",
              f"scenarios where meshdl at alpha 0 uses more energy than some plan of the "
              f"scenario: {len(energy_worse)}"]
    lines += [f"  - {k}: meshdl {e:.3f} J > {s} (alpha {a:g}) {lo:.3f} J"
              for k, s, a, e, lo in energy_worse[:10]]
    lines += [""]
    if opt:
        worst = max(r["ratio"] for r in opt)
        lines += [f"meshdl / optimal objective over {len(opt)} small-mesh cases: worst "
                  f"{worst:.3f}, geomean {geomean([r['ratio'] for r in opt]):.3f}, "
                  f"cases above 1.05: {sum(r['ratio'] > 1.05 for r in opt)}", "",
                  "| model | mesh | cap | alpha | meshdl / optimal objective | optimal s | "
                  "meshdl s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['mesh']} | {r['cap_mbps'] or '-'} | {r['alpha']:g} | "
                  f"{r['ratio']:.3f} | {r['optimal_plan_s']:.1f} | {r['meshdl_plan_s']:.2f} |"
                  for r in opt]
        lines += [""]
    distinct, mono = sweep_facts(alpha_rows)
    lines += [f"alpha sweep ({models[0]}, disnet-net0 8->4, 10 Mbit/s): {distinct} distinct "
              f"plans, monotone: {mono}; objective relative to local (local = 1)", "",
              "| alpha | latency s | energy J | objective | devices |", "|---|---|---|---|---|"]
    lines += [f"| {r['alpha']:.1f} | {r['latency_s']:.3f} | {r['energy_j']:.2f} | "
              f"{r['objective']:.3f} | {r['devices']} |" for r in alpha_rows]
    lines += ["", "| planning (median of 3) | strategy | time ms | latency s |",
              "|---|---|---|---|"]
    lines += [f"| {r['mesh']} | {r['strategy']} | "
              f"{r['note'] or '-' if r['plan_s'] is None else round(r['plan_s'] * 1e3)} | "
              f"{r['latency_s'] if r['latency_s'] is None else round(r['latency_s'], 3)} |"
              for r in tim]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
