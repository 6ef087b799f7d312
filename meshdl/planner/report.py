"""Plans for people: a text table, JSON, a PNG of the mesh, and a comparison table.

``plan_table(plan, g)`` and ``compare_table(plans)`` return strings; ``plan_json``
returns a JSON string; ``plan_png(plan, mesh, path)`` draws the mesh with matplotlib
(Agg): devices coloured by the stage they run, the plan's routes highlighted, and a
legend with the predicted time and energy. Positions come from device ``meta["pos"]``
when every device has one, else from a spring layout with a fixed seed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from meshdl.graph.plan import Plan


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1.0 else f"{x:.3f} s"


def _fmt_j(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} J"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def plan_table(plan: Plan, g=None) -> str:
    """One row per task: stage, ops, device, output tile, input region, GFLOPs, finish."""
    score = plan.meta.get("score", {}) if isinstance(plan.meta, Mapping) else {}
    finish = score.get("stage_finish_s", [])
    rows = []
    for s in plan.stages:
        ops = f"[{s.start}, {s.end})"
        if g is not None and s.end - 1 < len(g.ops):
            ops += f" {g.ops[s.start].name}..{g.ops[s.end - 1].name}"
        for t in s.tasks:
            rows.append([s.index, ops, t.device,
                         "whole" if t.out_region is None else t.out_region.to_list(),
                         "whole" if t.in_region is None else t.in_region.to_list(),
                         f"{t.flops / 1e9:.3f}",
                         _fmt_s(finish[s.index]) if s.index < len(finish) else "-"])
    head = (f"plan {plan.plan_id or '(unsaved)'}: {plan.model} by '{plan.strategy}' "
            f"(alpha={plan.alpha}), {plan.source} -> {plan.sink}: "
            f"latency {_fmt_s(plan.latency_s)}, energy {_fmt_j(plan.energy_j)}")
    body = _table(["stage", "ops", "device", "out tile [h0,h1,w0,w1]", "in region",
                   "GFLOP", "stage done"], rows)
    extra = [f"note: {n}" for n in plan.notes]
    multi = sorted((k, v) for k, v in plan.routes.items() if len(v) > 2)
    direct = sum(1 for v in plan.routes.values() if len(v) == 2)
    if plan.routes:
        extra.append(f"routes: {direct} direct links" + (", relayed:" if multi else ""))
        extra += [f"  {k.replace('>', ' -> ')}: {' - '.join(v)}" for k, v in multi]
    if score:
        extra.append(f"moved {score.get('bytes_moved', 0) / 2**20:.2f} MiB over links in "
                     f"{score.get('transfers', 0)} transfers")
        energy = score.get("energy_by_device") or {}
        if energy:
            top = sorted(energy.items(), key=lambda kv: -kv[1])
            extra.append("energy by device: " + ", ".join(f"{d} {e:.2f} J" for d, e in top))
    extra += _stream_lines(plan, g)
    return "\n".join([head, body, *extra])


def _stream_lines(plan: Plan, g=None) -> list[str]:
    """The throughput objective's prediction and the replicas frames alternate over."""
    meta = plan.meta if isinstance(plan.meta, Mapping) else {}
    stream = meta.get("stream")
    if not isinstance(stream, Mapping):
        return []
    out = [f"stream: {stream.get('fps', 0):.2f} frames/s predicted over "
           f"{stream.get('replicas', 1)} plan(s), frame latency p50 "
           f"{_fmt_s(stream.get('latency_p50_s'))} p95 {_fmt_s(stream.get('latency_p95_s'))}"
           f"; bottleneck: {stream.get('bottleneck', '?')}"]
    weights = meta.get("replica_weights") or []
    for n, d in enumerate(meta.get("replicas") or [], start=1):
        try:
            rep = Plan.from_dict(d)
        except Exception:           # a malformed replica is shown as such, not raised
            out.append(f"replica {n}: (malformed)")
            continue
        share = (weights[n] / sum(weights)) if len(weights) > n else None
        stages = "; ".join(f"[{s.start},{s.end}) on {','.join(t.device for t in s.tasks)}"
                           for s in rep.stages)
        out.append(f"replica {n} ({rep.plan_id}"
                   + (f", {share:.0%} of frames" if share is not None else "") + f"): {stages}")
    return out


def plan_json(plan: Plan, indent: int | None = 2) -> str:
    return json.dumps(plan.to_dict(), indent=indent, sort_keys=True, default=str)


def objective(plan: Plan, ref: Plan, alpha: float) -> float | None:
    """The quantity the ``meshdl`` strategy minimises at ``alpha``: latency and energy
    relative to ``ref`` (the whole model on the source, i.e. the ``local`` plan)."""
    if not (plan.latency_s and plan.energy_j is not None and ref.latency_s and ref.energy_j):
        return None
    return (alpha * plan.latency_s / ref.latency_s
            + (1.0 - alpha) * plan.energy_j / ref.energy_j)


def compare_table(plans: Mapping[str, Plan | None], reference: str | None = None,
                  alpha: float | None = None) -> str:
    """Strategies side by side: latency, energy, devices, stages, speed-up vs reference
    (default ``local`` when present) and, given ``alpha``, the objective
    ``alpha*latency/latency_ref + (1-alpha)*energy/energy_ref`` (lower is better; the
    best is starred). A missing plan (None) shows as skipped."""
    ref = reference if reference is not None else ("local" if plans.get("local") else None)
    ref_plan = plans.get(ref) if ref else None
    ref_lat = ref_plan.latency_s if ref_plan else None
    objs = {name: objective(p, ref_plan, alpha) for name, p in plans.items()
            if p is not None and ref_plan is not None and alpha is not None}
    best = min((v, k) for k, v in objs.items() if v is not None)[1] if any(
        v is not None for v in objs.values()) else None
    with_obj = alpha is not None and ref_plan is not None
    rows = []
    for name, p in plans.items():
        if p is None:
            rows.append([name, "skipped", "-", "-", "-", "-"] + (["-"] if with_obj else []))
            continue
        devs = sorted({t.device for t in p.tasks()})
        speed = (f"{ref_lat / p.latency_s:.2f}x" if ref_lat and p.latency_s else "-")
        row = [name, _fmt_s(p.latency_s), _fmt_j(p.energy_j), len(devs), len(p.stages),
               speed]
        if with_obj:
            o = objs.get(name)
            row.append("-" if o is None else f"{o:.3f}" + (" *" if name == best else ""))
        rows.append(row)
    headers = ["strategy", "latency", "energy", "devices", "stages",
               f"speed-up vs {ref or '-'}"]
    if with_obj:
        headers.append(f"objective at alpha={alpha:g}")
    out = _table(headers, rows)
    if with_obj:
        out += (f"\nobjective = alpha*latency/latency_{ref} + (1-alpha)*energy/energy_{ref} "
                "(lower is better; * = best): what the meshdl strategy minimises")
    return out


def _layout(mesh) -> dict[str, tuple[float, float]]:
    pos = {d: dev.meta.get("pos") for d, dev in mesh.devices.items()}
    if all(p is not None and len(p) >= 2 for p in pos.values()):
        return {d: (float(p[0]), float(p[1])) for d, p in pos.items()}
    import networkx as nx
    lay = nx.spring_layout(mesh.graph, seed=7)
    return {d: (float(x), float(y)) for d, (x, y) in lay.items()}


def plan_png(plans, mesh, path: str | Path, title: str | None = None) -> Path:
    """Draw one plan, or several as panels of one figure, on ``mesh`` into the PNG file
    ``path`` (exactly that file); returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [plans] if isinstance(plans, Plan) else list(plans)
    n = len(items)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 6.5 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    pos = _layout(mesh)
    for ax, plan in zip(axes.flat, items):
        _draw(ax, plan, mesh, pos, title if n == 1 else None)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _stage_colors(n: int):
    import matplotlib.pyplot as plt
    if n <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = plt.get_cmap("tab20")
        return [cmap(i) for i in range(n)]
    cmap = plt.get_cmap("turbo")
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _draw(ax, plan: Plan, mesh, pos, title: str | None) -> None:
    """One plan on one axes: each device a disc split into one wedge per stage it runs,
    routes in red, the source and sink ringed (both in the legend)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, Wedge

    stages_of: dict[str, list[int]] = {}
    for t in plan.tasks():
        lst = stages_of.setdefault(t.device, [])
        if t.stage not in lst:
            lst.append(t.stage)
    index_of = {s.index: i for i, s in enumerate(plan.stages)}
    colors = _stage_colors(len(plan.stages))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-9)
    small = len(mesh.devices) <= 40
    r_used = span * (0.045 if small else 0.02)
    r_idle = r_used * 0.55
    for link in mesh.links:
        (x0, y0), (x1, y1) = pos[link.a], pos[link.b]
        ax.plot([x0, x1], [y0, y1], color="#cccccc", lw=1, zorder=1)
    used = set()
    for path_ in plan.routes.values():
        for u, v in zip(path_, path_[1:]):
            used.add(frozenset((u, v)))
    for key in sorted(used, key=sorted):
        u, v = sorted(key)
        if u in pos and v in pos:
            ax.plot([pos[u][0], pos[v][0]], [pos[u][1], pos[v][1]], color="#d62728",
                    lw=2.5, alpha=0.7, zorder=2)
    for d, (x, y) in pos.items():
        st = sorted(stages_of.get(d, []), key=lambda k: index_of.get(k, k))
        if st:
            step = 360.0 / len(st)
            for i, k in enumerate(st):
                ax.add_patch(Wedge((x, y), r_used, 90 + i * step, 90 + (i + 1) * step,
                                   facecolor=colors[index_of.get(k, 0) % len(colors)],
                                   edgecolor="white", lw=0.5, zorder=3))
        else:
            ax.add_patch(Circle((x, y), r_idle, facecolor="#eeeeee", edgecolor="#999999",
                                lw=0.6, zorder=3))
        r = r_used if st else r_idle
        if d == plan.source:
            ax.add_patch(Circle((x, y), r * 1.25, fill=False, edgecolor="black", lw=2,
                                zorder=4))
        if d == plan.sink:
            ax.add_patch(Circle((x, y), r * (1.45 if d == plan.source else 1.25),
                                fill=False, edgecolor="#1f77b4", lw=2, ls="--", zorder=4))
        if small or st or d in (plan.source, plan.sink):
            label = d + (" (" + ",".join(f"s{k}" for k in st) + ")" if len(st) > 1 else "")
            ax.annotate(label, (x, y + r * 1.5), ha="center", va="bottom", fontsize=7,
                        zorder=5)
    handles = [Line2D([], [], marker="o", ls="", markersize=8, color=colors[i],
                      label=f"stage {s.index}: ops [{s.start},{s.end}) x{len(s.tasks)}")
               for i, s in enumerate(plan.stages)]
    handles.append(Line2D([], [], color="#d62728", lw=2.5, label="routes used"))
    handles.append(Line2D([], [], marker="o", ls="", markersize=10, markerfacecolor="none",
                          markeredgecolor="black", markeredgewidth=2,
                          label=f"source ({plan.source})"))
    handles.append(Line2D([], [], marker="o", ls="", markersize=12, markerfacecolor="none",
                          markeredgecolor="#1f77b4", markeredgewidth=2,
                          label=f"sink ({plan.sink}), dashed"))
    handles.append(Line2D([], [], marker="o", ls="", markersize=7, color="#eeeeee",
                          markeredgecolor="#999999", label="idle device"))
    handles.append(Line2D([], [], ls="", label=f"latency {_fmt_s(plan.latency_s)}"))
    handles.append(Line2D([], [], ls="", label=f"energy {_fmt_j(plan.energy_j)}"))
    ax.legend(handles=handles, loc="best", fontsize=7, framealpha=0.85)
    ax.set_title(title or f"{plan.model} on {mesh.name} by '{plan.strategy}' "
                          f"({plan.source} -> {plan.sink})", fontsize=10)
    pad = r_used * 2.5
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
    ax.set_ylim(min(ys) - pad, max(ys) + pad * 1.5)
    ax.set_aspect("equal")
    ax.set_axis_off()


__all__ = ["plan_table", "plan_json", "plan_png", "compare_table", "objective"]
