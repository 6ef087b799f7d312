"""``meshdl models inspect NAME``: how much of a model meshdl can tile, and what ends each
spatial run."""
from __future__ import annotations

import click


def split_report(g) -> list[str]:
    """Lines describing ``g``'s spatial runs, reduce points and run enders."""
    from meshdl.cli.models_cmd import flops_text
    total = g.flops or 1.0
    lines = [f"{g.name}: {flops_text(g.flops).strip()}, {len(g.ops)} ops, "
             f"{len(g.cut_points)} cut points; tileable share of FLOPs: "
             f"{100.0 * g.tiled_flops() / total:.1f}%"]
    runs = g.spatial_runs
    for a, b in runs:
        reduces = g.reduce_ops(a, b)
        note = f", {len(reduces)} reduce points (split as per-tile partials)" if reduces else ""
        lines.append(f"  spatial run ops [{a}, {b}): {100.0 * g.flops_between(a, b) / total:5.1f}%"
                     f" of FLOPs{note}")
    enders = {op.index: op for op in g.run_enders()}
    at = 0
    for a, b in runs + [(len(g.ops), len(g.ops))]:
        if a > at:
            whole = [enders[i] for i in range(at, a) if i in enders]
            what = ", ".join(f"{op.name} ({op.kind}: {op.reason})" for op in whole[:3])
            if not what:
                heads = [g.ops[i] for i in range(at, a) if g.roles[i] == "reduce"]
                what = (f"{heads[0].name} ({heads[0].kind}: global pooling to a vector, the "
                        "classifier head)" if heads else "")
            lines.append(f"  runs whole  ops [{at}, {a}): "
                         f"{100.0 * g.flops_between(at, a) / total:5.1f}% of FLOPs; ended by "
                         f"{what or 'a non-map tensor'}")
        at = max(at, b)
    return lines


@click.command("inspect")
@click.argument("name")
@click.option("--input-size", "size", default=None, metavar="HxW",
              help="Trace at this image size instead of the model's default.")
def inspect(name: str, size: str | None) -> None:
    """Trace zoo model NAME and print the tileable share of its FLOPs, its spatial runs
    (with reduce points) and the op that ends each run."""
    import warnings

    import meshdl
    from meshdl import models as zoo
    from meshdl.errors import MeshdlError
    info = zoo.info(name)
    shape = tuple(info.input_shape)
    if size:
        try:
            h, w = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise MeshdlError(f"--input-size {size!r} must look like 224x224") from None
        shape = (*shape[:-2], h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", meshdl.SplitWarning)
        g = meshdl.trace(zoo.build(name), shape, name=name)
    click.echo("\n".join(split_report(g)))
