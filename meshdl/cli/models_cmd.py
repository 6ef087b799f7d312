"""``meshdl models``: the model zoo."""
from __future__ import annotations

import click


def flops_text(flops: float) -> str:
    """FLOPs with sensible digits at every scale (1 multiply-add = 2 FLOPs)."""
    for unit, scale in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:7.4g} {unit}"
    return f"{flops:7.4g} FLOPs"


def bytes_text(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:7.4g} {unit}"
    return f"{n:7.4g} B  "


@click.command()
@click.option("--trace", "do_trace", is_flag=True,
              help="Also trace each model (a few seconds each; progress on stderr): FLOPs "
              "(1 multiply-add = 2 FLOPs), weight size, ops, cut points.")
def models(do_trace: bool) -> None:
    """List the model zoo. Descriptions give multiply-adds as GMACs; --trace counts
    FLOPs (2 per multiply-add), the unit the planner and device profiles use."""
    from meshdl import models as zoo
    rows = []
    names = zoo.names()
    for k, name in enumerate(names, 1):
        info = zoo.info(name)
        extra = ""
        if do_trace:
            import meshdl
            click.echo(f"[{k}/{len(names)}] tracing {name} ...", err=True)
            g = meshdl.trace(zoo.build(name), info.input_shape, name=name)
            extra = (f"  {flops_text(g.flops)}  {bytes_text(g.weight_bytes)}  "
                     f"{len(g.ops):3d} ops  {len(g.cut_points):3d} cuts")
        weights = "pretrained" if info.pretrained_available else "seeded init"
        rows.append(f"{name:20s} {str(tuple(info.input_shape)):18s} {weights:12s}{extra}"
                    f"  {info.description}")
    click.echo("\n".join(rows))
