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
    return "\n".join([head, body, *extra])


def plan_json(plan: Plan, indent: int | None = 2) -> str:
    return json.dumps(plan.to_dict(), indent=indent, sort_keys=True, default=str)


def compare_table(plans: Mapping[str, Plan | None], reference: str | None = None) -> str:
    """Strategies side by side: latency, energy, devices, stages, speed-up vs reference
    (default ``local`` when present). A missing plan (None) shows as skipped."""
    ref = reference if reference is not None else ("local" if plans.get("local") else None)
    ref_lat = plans[ref].latency_s if ref and plans.get(ref) else None
    rows = []
    for name, p in plans.items():
        if p is None:
            rows.append([name, "skipped", "-", "-", "-", "-"])
            continue
        devs = sorted({t.device for t in p.tasks()})
        speed = (f"{ref_lat / p.latency_s:.2f}x" if ref_lat and p.latency_s else "-")
        rows.append([name, _fmt_s(p.latency_s), _fmt_j(p.energy_j), len(devs),
                     len(p.stages), speed])
    return _table(["strategy", "latency", "energy", "devices", "stages",
                   f"speed-up vs {ref or '-'}"], rows)


def _layout(mesh) -> dict[str, tuple[float, float]]:
    pos = {d: dev.meta.get("pos") for d, dev in mesh.devices.items()}
    if all(p is not None and len(p) >= 2 for p in pos.values()):
        return {d: (float(p[0]), float(p[1])) for d, p in pos.items()}
    import networkx as nx
    lay = nx.spring_layout(mesh.graph, seed=7)
    return {d: (float(x), float(y)) for d, (x, y) in lay.items()}


def plan_png(plan: Plan, mesh, path: str | Path, title: str | None = None) -> Path:
    """Draw ``plan`` on ``mesh`` into a PNG file; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    pos = _layout(mesh)
    stages_of: dict[str, list[int]] = {}
    for t in plan.tasks():
        stages_of.setdefault(t.device, [])
        if t.stage not in stages_of[t.device]:
            stages_of[t.device].append(t.stage)
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 6.5))
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
    small = len(mesh.devices) <= 40
    for d, (x, y) in pos.items():
        st = stages_of.get(d)
        color = cmap(st[0] % 10) if st else "#eeeeee"
        size = 260 if st else (120 if small else 25)
        edge = "black" if d in (plan.source, plan.sink) else "#777777"
        ax.scatter([x], [y], s=size, color=color, edgecolors=edge,
                   linewidths=2 if edge == "black" else 0.6, zorder=3)
        if small or st or d in (plan.source, plan.sink):
            label = d + ("".join(f" s{k}" for k in st[1:]) if st and len(st) > 1 else "")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, 9),
                        ha="center", fontsize=7, zorder=4)
    handles = [Line2D([], [], marker="o", ls="", color=cmap(s.index % 10),
                      label=f"stage {s.index}: ops [{s.start},{s.end}) x{len(s.tasks)}")
               for s in plan.stages]
    handles.append(Line2D([], [], color="#d62728", lw=2.5, label="routes used"))
    handles.append(Line2D([], [], ls="", label=f"latency {_fmt_s(plan.latency_s)}"))
    handles.append(Line2D([], [], ls="", label=f"energy {_fmt_j(plan.energy_j)}"))
    ax.legend(handles=handles, loc="best", fontsize=7, framealpha=0.85)
    ax.set_title(title or f"{plan.model} on {mesh.name} by '{plan.strategy}' "
                          f"({plan.source} -> {plan.sink})", fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["plan_table", "plan_json", "plan_png", "compare_table"]
